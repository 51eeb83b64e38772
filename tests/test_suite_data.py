"""The embedded task data (suites/embedded): integrity, disjoint splits, determinism, lm-eval wiring."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITES = ROOT / "suites"
EMB = SUITES / "embedded"
SCRIPT = ROOT / "scripts" / "build_task_data.py"
SPLITS = ("train", "validation", "test")


def _load_script():
    spec = importlib.util.spec_from_file_location("build_task_data", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["build_task_data"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def manifest():
    return json.loads((EMB / "data" / "MANIFEST.json").read_text())


@pytest.fixture(scope="module")
def data(manifest):
    out = {}
    for task in manifest["tasks"]:
        out[task] = {}
        for s in SPLITS:
            with open(EMB / "data" / task / f"{s}.jsonl", encoding="utf-8") as f:
                out[task][s] = [json.loads(line) for line in f]
    return out


def _mc_tasks(manifest):
    return [t for t in manifest["tasks"] if t != "news"]


# ---------------------------------------------------------------- integrity

def test_manifest_matches_files(manifest):
    for task, entry in manifest["tasks"].items():
        for s in SPLITS:
            blob = (EMB / "data" / task / f"{s}.jsonl").read_bytes()
            assert hashlib.sha256(blob).hexdigest() == entry["sha256"][s], f"{task}/{s} changed since it was built"
            assert blob.count(b"\n") == entry["counts"][s], f"{task}/{s} count"
    on_disk = {p.name for p in (EMB / "data").iterdir() if p.is_dir()}
    assert on_disk == set(manifest["tasks"])


def test_suites_stay_small():
    """Task data and configs stay small; the pools' expert weights have their own budget (test_zoo_pool,
    test_zoo_wild)."""
    experts = (SUITES / "embedded" / "experts", SUITES / "wild" / "experts")
    total = sum(p.stat().st_size for p in SUITES.rglob("*")
                if p.is_file() and not any(e in p.parents for e in experts))
    assert total < 5_000_000, f"suites/ (without the expert adapters) is {total / 1e6:.1f} MB"


def test_sizes_are_what_the_benchmark_needs(manifest):
    for task in _mc_tasks(manifest):
        c = manifest["tasks"][task]["counts"]
        assert 100 <= c["test"] <= 300, (task, c)
        assert c["validation"] >= 40, (task, c)
        assert c["train"] >= 60, (task, c)


def test_every_task_has_yaml_and_sources_documented(manifest):
    doc = (SUITES / "DATA_SOURCES.md").read_text()
    for task, entry in manifest["tasks"].items():
        assert (EMB / "tasks" / f"{entry['lm_eval_task']}.yaml").is_file()
        assert f"`{task}`" in doc, f"{task} missing from DATA_SOURCES.md"
        for s in SPLITS:
            assert str(entry["counts"][s]) in doc, f"{task}/{s} count missing from DATA_SOURCES.md"


# ---------------------------------------------------------------- disjoint splits

def test_splits_are_disjoint_by_id_and_by_question(data):
    for task, splits in data.items():
        for key in ("id", "query", "text"):
            seen: dict[str, str] = {}
            for s in SPLITS:
                vals = [r[key] for r in splits[s] if key in r]
                assert len(vals) == len(set(vals)), f"{task}/{s}: duplicate {key}"
                for v in vals:
                    assert v not in seen, f"{task}: {key} {v[:60]!r} is in {seen[v]} and {s}"
                    seen[v] = s


def test_shared_groups_stay_in_one_split(data):
    # The two medical tasks use one split of the WordNet synsets.
    for s in SPLITS:
        assert {r["id"] for r in data["medical_terms"][s]} == {r["id"] for r in data["medical_defs"][s]}
    # Antonyms: no word is a cue (or an answer) in two splits.
    words = {}
    for s in SPLITS:
        for r in data["antonyms"][s]:
            cue = re.search(r'opposite of "(.+)"\?', r["query"]).group(1)
            for w in (cue, r["choices"][r["gold"]]):
                assert words.setdefault(w, s) == s, f"antonyms: {w!r} in {words[w]} and {s}"
    # Analogies: no word pair of a test/validation question occurs in a training question.
    def pairs(rows):
        out = set()
        for r in rows:
            _sec, a, b, c, d = r["id"].split(":")
            out |= {(a, b), (c, d)}
        return out
    tr = pairs(data["analogies"]["train"])
    assert not (pairs(data["analogies"]["test"]) & tr)
    assert not (pairs(data["analogies"]["validation"]) & tr)
    # Elements: the three questions about one element share its split.
    el = {}
    for s in SPLITS:
        for r in data["elements"][s]:
            name = r["id"].split(":")[0]
            assert el.setdefault(name, s) == s


# ---------------------------------------------------------------- item content

def test_multiple_choice_schema(data, manifest):
    for task in _mc_tasks(manifest):
        for s in SPLITS:
            for r in data[task][s]:
                n = 2 if task == "sentiment" else 4
                assert len(r["choices"]) == n, (task, r["id"])
                assert 0 <= r["gold"] < n
                assert len({c.casefold() for c in r["choices"]}) == n, (task, r["id"], r["choices"])
                assert r["query"].endswith("Answer:") and all(c and c == c.strip() for c in r["choices"])
    assert all(r.get("solution", "").endswith(f"The answer is {r['choices'][r['gold']]}.")
               for r in data["gsm8k_mc"]["train"])


def test_gold_position_and_labels_are_balanced(data, manifest):
    # A systematic position bias would let a model score without reading the question.
    for task in _mc_tasks(manifest):
        rows = [r for s in SPLITS for r in data[task][s]]
        n = len(rows[0]["choices"])
        freq = Counter(r["gold"] for r in rows)
        for pos in range(n):
            assert abs(freq[pos] / len(rows) - 1 / n) < 0.08, (task, freq)


def test_numeric_distractors_do_not_reveal_the_answer(data):
    # Neither "largest", "smallest" nor "the one in the middle" finds the gold much above chance.
    from fractions import Fraction

    for task in ("gsm8k_mc", "gsm8k_calc"):
        rows = [r for s in SPLITS for r in data[task][s]]
        for rank in range(4):
            hits = sum(sorted(range(4), key=lambda i: Fraction(r["choices"][i]))[rank] == r["gold"] for r in rows)
            assert hits / len(rows) < 0.33, (task, rank, hits / len(rows))


def test_gsm8k_calc_gold_is_the_value_of_the_expression(data):
    # Independent of the builder: Python's own arithmetic on the (digits-and-operators) text.
    for s in SPLITS:
        for r in data["gsm8k_calc"][s]:
            expr = re.search(r"What is (.+)\?\nAnswer:$", r["query"]).group(1)
            assert re.fullmatch(r"[\d.+\-*/() ]+", expr), expr
            value = eval(expr, {"__builtins__": {}})  # noqa: S307 - digits and operators only
            assert abs(value - float(r["choices"][r["gold"]])) < 1e-9 * max(1, abs(value)), (expr, r)
            for i, c in enumerate(r["choices"]):
                if i != r["gold"]:
                    assert abs(float(c) - value) > 1e-9, (expr, c)


def test_elements_questions_agree_with_each_other(data):
    # symbol -> name and name -> symbol items of one element must name the same pair.
    for s in SPLITS:
        by = {}
        for r in data["elements"][s]:
            name, kind = r["id"].split(":")
            by.setdefault(name, {})[kind] = r
        for name, items in by.items():
            sym = items["to_symbol"]["choices"][items["to_symbol"]["gold"]]
            assert f"the symbol {sym}?" in items["from_symbol"]["query"]
            assert items["from_symbol"]["choices"][items["from_symbol"]["gold"]] == name


def test_sentiment_labels_match_the_source_balance(data):
    rows = [r for s in SPLITS for r in data["sentiment"][s]]
    assert len(rows) == 200 and Counter(r["gold"] for r in rows) == {0: 100, 1: 100}


# ---------------------------------------------------------------- determinism of the builder

def test_split_keys_is_deterministic_disjoint_and_order_free():
    b = _load_script()
    keys = [f"k{i}" for i in range(50)]
    s1 = b.split_keys(keys, "t", 10, 5)
    s2 = b.split_keys(list(reversed(keys)) + keys[:3], "t", 10, 5)  # order and duplicates do not matter
    assert s1 == s2
    assert [len(s1[s]) for s in ("test", "validation", "train")] == [10, 5, 35]
    assert set(s1["test"]) | set(s1["validation"]) | set(s1["train"]) == set(keys)
    assert not (set(s1["test"]) & set(s1["validation"])) and not (set(s1["test"]) & set(s1["train"]))
    assert b.split_keys(keys, "other", 10, 5)["test"] != s1["test"]  # the name seeds the shuffle
    assert len(b.split_keys(keys, "t", 10, 5, n_train=7)["train"]) == 7
    with pytest.raises(ValueError):
        b.split_keys(keys[:5], "t", 4, 2)


_DETERMINISM_PROBE = r"""
import hashlib, json, sys
sys.path.insert(0, sys.argv[1])
import build_task_data as b
from fractions import Fraction
out = {}
out["split"] = b.split_keys({f"w{i}" for i in range(40)}, "probe", 8, 4)
rows = [{"key": f"g{i}", "question": f"Tom has {i + 3} apples and buys {2 * i + 1} more. How many?",
         "gold": str(3 * i + 4), "solution": "", "calcs": [(f"{i + 3}+{2 * i + 1}", str(3 * i + 4))]}
        for i in range(30)]
out["gsm8k"] = [b.gsm8k_mc(r) for r in rows]
out["calc"] = [b.gsm8k_calc_mc(e, v) for e, (v, _) in sorted(b.gsm8k_calc_pool(rows).items())]
secs = {s: [(f"a{s}{i}", f"b{s}{i}") for i in range(12)] for s in b.ANALOGY_SECTIONS}
out["analogies"] = b.analogy_items(secs)
pairs = [("adj", f"x{i}", f"y{i}") for i in range(20)] + [("adj", "x0", "z0")]
comp = b.antonym_components(pairs)
out["antonyms"] = b.antonym_items(pairs, set(comp.values()), comp)
print(hashlib.sha256(json.dumps(out, sort_keys=True).encode()).hexdigest())
"""


def test_builder_output_does_not_depend_on_hash_seed(tmp_path):
    # Set iteration order changes with PYTHONHASHSEED; the builder must sort everything it iterates.
    probe = tmp_path / "probe.py"
    probe.write_text(_DETERMINISM_PROBE)
    digests = set()
    for seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        r = subprocess.run([sys.executable, str(probe), str(SCRIPT.parent)], capture_output=True, text=True,
                           env=env, check=True)
        digests.add(r.stdout.strip())
    assert len(digests) == 1


def test_make_mc_places_gold_where_it_says():
    b = _load_script()
    for i in range(30):
        it = b.make_mc(f"id{i}", "Question: q?\nAnswer:", "gold", ["d1", "d2", "d3"], "probe")
        assert it["choices"][it["gold"]] == "gold" and sorted(it["choices"]) == ["d1", "d2", "d3", "gold"]
        assert it == b.make_mc(f"id{i}", "Question: q?\nAnswer:", "gold", ["d1", "d2", "d3"], "probe")
    with pytest.raises(ValueError):
        b.make_mc("x", "q", "Gold", ["gold", "a", "b"], "probe")


def test_quiz_field_parser():
    b = _load_script()
    assert b._quiz_first("Cameroon") == "Cameroon"
    assert b._quiz_first("Yaound['e|e'|e]") == "Yaounde"
    assert b._quiz_first("Central Africa{n Rep{ublic}}") == "Central African Republic"
    assert b._quiz_first("Vienna|Wien") == "Vienna"
    assert b._quiz_first("Port[-| ]au[-| ]Prince") == "Port-au-Prince"
    assert b._quiz_all("Ireland|Eire") == ["Ireland", "Eire"]


# ---------------------------------------------------------------- lm-eval wiring

def test_task_manager_injects_absolute_paths_per_split(manifest):
    import yaml

    from mergebench.zoo import tasks

    names = tasks.task_names()
    assert len(names) == len(manifest["tasks"]) - 1 and "mb_news" not in names
    assert "mb_news" in tasks.task_names(include_ppl=True)
    assert set(tasks.task_names(domain="math")) == {"mb_gsm8k_mc", "mb_gsm8k_calc"}
    assert set(tasks.task_names(domain="medical")) == {"mb_medical_terms", "mb_medical_defs"}
    for split in ("test", "validation"):
        folder = tasks.yaml_dir(split)
        for y in folder.glob("*.yaml"):
            cfg = yaml.safe_load(y.read_text())
            path = Path(cfg["dataset_kwargs"]["data_files"]["test"])
            assert path.is_absolute() and path.is_file() and path.name == f"{split}.jsonl"


def test_lm_eval_loads_the_embedded_tasks(manifest, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "ds"))
    from mergebench.zoo import tasks

    tm = tasks.task_manager("validation")
    assert set(tasks.task_names()) <= set(tm.all_tasks)
    assert "mergebench_embedded" in tm.all_tags
    assert set(tm.load("mergebench_embedded")["tasks"]) == set(tasks.task_names())
    loaded = tm.load(["mb_capitals", "mb_sentiment"])["tasks"]
    assert set(loaded) == {"mb_capitals", "mb_sentiment"}
    cap = loaded["mb_capitals"]
    docs = list(cap.test_docs())
    assert len(docs) == manifest["tasks"]["capitals"]["counts"]["validation"]
    d = docs[0]
    assert cap.doc_to_text(d) == d["query"] and cap.doc_to_choice(d) == d["choices"]
    assert cap.doc_to_target(d) == d["gold"]


# ---------------------------------------------------------------- full rebuild (network)

@pytest.mark.slow
def test_rebuild_from_packages_is_byte_identical(tmp_path):
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("needs apt-get and dpkg-deb")
    r = subprocess.run([sys.executable, str(SCRIPT), "--check", "--sources", str(tmp_path / "src")],
                       capture_output=True, text=True, timeout=900)
    if r.returncode != 0 and "OK" not in r.stdout and "MISMATCH" not in r.stdout:
        pytest.skip(f"could not download the source packages: {r.stderr[-500:]}")
    assert r.returncode == 0, r.stdout[-2000:]
