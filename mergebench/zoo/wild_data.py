"""Training data of the ``wild`` pool's off-battery experts: real text from packaged files.

The ``wild`` pool (:mod:`mergebench.zoo.wild`) fine-tunes most of its experts on data that the
embedded battery does not score, as the public fine-tunes of the in-the-wild merging study
("A Systematic Study of In-the-Wild Model Merging for Large Language Models", §3.3) are.  Every row comes verbatim (or by a documented, deterministic
rewording) from a file shipped by a Debian package or by the Python environment; nothing is
generated.  The sources, versions, licenses and counts are in ``suites/DATA_SOURCES.md``.

Rows are ``{"id", "prompt", "answer"}``: the loss covers ``answer`` (a prompt of ``""`` makes a
plain text row).  ``python -m mergebench.zoo.wild_data --sources DIR`` rebuilds
``suites/wild/data`` from the extracted packages (``apt-get download`` + ``dpkg-deb -x`` into
DIR; the man pages and iso-codes are read from this machine's ``/usr/share``), writing
``MANIFEST.json`` with the sha256 of every input and output file.

Sampling is seeded per source (``random.Random("20261201:<source>")`` over sorted keys), so the
same inputs give byte-identical files.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

from ..errors import MergebenchError
from .files import sha256

SEED = 20261201
FORMAT = 1

PACKAGES = {
    "freedict-eng-fra": {"package": "dict-freedict-eng-fra", "version": "2022.04.21-1", "license": "GPL-2+ (FreeDict)",
                         "files": ["usr/share/dictd/freedict-eng-fra.index", "usr/share/dictd/freedict-eng-fra.dict.dz"]},
    "freedict-eng-deu": {"package": "dict-freedict-eng-deu", "version": "2022.04.21-1", "license": "GPL-3+ (FreeDict / Ding)",
                         "files": ["usr/share/dictd/freedict-eng-deu.index", "usr/share/dictd/freedict-eng-deu.dict.dz"]},
    "fortunes": {"package": "fortunes-min", "version": "1:1.99.1-7.3", "license": "BSD-3-Clause (Regents of the University of California; fortune-mod)",
                 "files": ["usr/share/games/fortunes/fortunes", "usr/share/games/fortunes/literature",
                           "usr/share/games/fortunes/riddles"]},
}
ISO_CODES = {"package": "iso-codes", "version": "4.15.0-1", "license": "LGPL-2.1+",
             "files": ["/usr/share/iso-codes/json/iso_639-3.json", "/usr/share/iso-codes/json/iso_4217.json",
                       "/usr/share/iso-codes/json/iso_3166-1.json"]}
MAN_DIR = "/usr/share/man/man1"

__all__ = ["DataSourceError", "SEED", "build", "data_dir", "freedict_pairs", "fortune_entries", "iso_rows",
           "load_rows", "man_descriptions"]


class DataSourceError(MergebenchError, FileNotFoundError):
    """A packaged input file of the wild data (or the committed data itself) is missing."""


def data_dir() -> Path:
    """``$MERGEBENCH_SUITES/wild/data``, else ``suites/wild/data`` of the source checkout."""
    env = os.environ.get("MERGEBENCH_SUITES")
    root = Path(env).expanduser() if env else Path(__file__).resolve().parents[2] / "suites"
    return root / "wild" / "data"


def load_rows(source: str) -> list[dict]:
    """Rows of one committed wild source (``suites/wild/data/<source>.jsonl``)."""
    path = data_dir() / f"{source}.jsonl"
    if not path.is_file():
        raise DataSourceError(f"wild training data {source!r} not found at {path}; rebuild with "
                              f"`python -m mergebench.zoo.wild_data --sources DIR`")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _rng(source: str) -> random.Random:
    return random.Random(f"{SEED}:{source}")


# --------------------------------------------------------------------------- parsers (pure)

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64_number(s: str) -> int:
    """dictd's index numbers: base64 digits, most significant first."""
    n = 0
    for ch in s:
        n = n * 64 + _B64.index(ch)
    return n


_TAG = re.compile(r"\s*<[^>]*>")
_BRACKET = re.compile(r"\s*\[[^\]]*\]")


def freedict_pairs(index_text: str, dict_bytes: bytes) -> list[tuple[str, str]]:
    """(English headword, first translation) of a dictd FreeDict database, in index order.

    An entry is ``headword /ipa/`` followed by its senses; the first sense line is taken, its
    numbering (``1. ``), grammatical tags (``<masc>``) and domain labels (``[aviat.]``)
    removed and only its first comma-separated alternative kept.  Database headers
    (``00database...``) and multi-word translations longer than 40 characters are skipped.
    """
    out, seen = [], set()
    for line in index_text.splitlines():
        parts = line.split("\t")
        if len(parts) != 3 or parts[0].startswith("00database") or parts[0] in seen:
            continue
        head = parts[0].strip()
        off, length = _b64_number(parts[1]), _b64_number(parts[2])
        body = dict_bytes[off: off + length].decode("utf-8", errors="replace").splitlines()
        senses = [s.strip() for s in body[1:] if s.strip() and not s.startswith(" ")]
        if not senses:
            continue
        t = re.sub(r"^\d+\.\s*", "", senses[0])
        t = " ".join(_BRACKET.sub(" ", _TAG.sub(" ", t)).split(",")[0].split(";")[0].split())
        if not t or len(t) > 40 or not head.isascii() or len(head) > 40:
            continue
        seen.add(head)
        out.append((head, t))
    return out


def fortune_entries(text: str) -> list[str]:
    """The entries of a fortune file (separated by lines holding only ``%``), whitespace kept inside."""
    return [e.strip("\n") for e in re.split(r"^%\n", text, flags=re.M) if e.strip()]


_LEXGROG = re.compile(r'^(?P<file>[^:]+): "(?P<name>[^"]+?) - (?P<desc>[^"]+)"$')


def man_descriptions(lexgrog_lines: list[str]) -> dict[str, str]:
    """command -> whatis description from ``lexgrog`` output lines (first description wins)."""
    out: dict[str, str] = {}
    for line in lexgrog_lines:
        m = _LEXGROG.match(line.strip())
        if not m:
            continue
        for name in m.group("name").split(","):
            name = name.strip()
            if name and " " not in name and name not in out:
                out[name] = m.group("desc").strip()
    return out


def iso_rows(languages: dict, currencies: dict, countries: dict) -> list[dict]:
    """Question/answer rows of ISO 639-3 (living individual languages), ISO 4217 and ISO 3166-1 codes."""
    rows = []
    for e in languages["639-3"]:
        if e.get("type") == "L" and e.get("scope") == "I":
            rows.append({"id": f"lang-{e['alpha_3']}", "prompt": f"ISO 639-3 code of the {e['name']} language:",
                         "answer": " " + e["alpha_3"]})
    for e in currencies["4217"]:
        rows.append({"id": f"cur-{e['alpha_3']}", "prompt": f"ISO 4217 code of the currency {e['name']}:",
                     "answer": " " + e["alpha_3"]})
    for e in countries["3166-1"]:
        rows.append({"id": f"cty-{e['alpha_3']}", "prompt": f"ISO 3166-1 alpha-3 code of {e['name']}:",
                     "answer": " " + e["alpha_3"]})
    return rows


# --------------------------------------------------------------------------- build


def _sample(rows: list[dict], source: str, n: int | None) -> list[dict]:
    rows = sorted(rows, key=lambda r: r["id"])
    _rng(source).shuffle(rows)
    return rows[:n] if n is not None else rows


def _sources(src: Path) -> dict[str, tuple[list[dict], list[Path]]]:
    """source name -> (rows, input files)."""
    out = {}
    for lang, name in (("French", "freedict-eng-fra"), ("German", "freedict-eng-deu")):
        idx, dz = (src / f for f in PACKAGES[name]["files"])
        for p in (idx, dz):
            if not p.is_file():
                raise DataSourceError(f"{p} is missing: `apt-get download {PACKAGES[name]['package']}` and "
                                      f"`dpkg-deb -x` it into {src}")
        pairs = freedict_pairs(idx.read_text(encoding="utf-8"), gzip.decompress(dz.read_bytes()))
        rows = [{"id": f"{name}-{h}", "prompt": f"English: {h}\n{lang}:", "answer": " " + t} for h, t in pairs]
        out[name] = (_sample(rows, name, 2000), [idx, dz])
    files = [src / f for f in PACKAGES["fortunes"]["files"]]
    for p in files:
        if not p.is_file():
            raise DataSourceError(f"{p} is missing: `apt-get download fortunes-min` and `dpkg-deb -x` it into {src}")
        entries = fortune_entries(p.read_text(encoding="utf-8", errors="replace"))
        rows = [{"id": f"{p.name}-{i:04d}", "prompt": "", "answer": e} for i, e in enumerate(entries)]
        out[f"fortunes-{p.name}"] = (_sample(rows, f"fortunes-{p.name}", None), [p])
    man = Path(MAN_DIR)
    pages = sorted(str(p) for p in man.iterdir() if p.is_file())
    lines: list[str] = []
    for i in range(0, len(pages), 500):
        res = subprocess.run(["lexgrog", *pages[i:i + 500]], capture_output=True, text=True)
        lines += res.stdout.splitlines()
    desc = man_descriptions([ln.replace(str(man) + "/", "") for ln in lines])
    rows = [{"id": f"man-{k}", "prompt": f"The command {k}:", "answer": " " + v} for k, v in desc.items()]
    out["manpages"] = (_sample(rows, "manpages", 2000), [])
    iso = [Path(f) for f in ISO_CODES["files"]]
    for p in iso:
        if not p.is_file():
            raise DataSourceError(f"{p} is missing: install Debian's iso-codes")
    rows = iso_rows(*(json.loads(p.read_text()) for p in iso))
    out["iso-codes"] = (_sample(rows, "iso-codes", 2000), iso)
    return out


def build(src: Path, out: Path | None = None) -> dict:
    """Write every source's JSONL and ``MANIFEST.json`` to ``out`` (default :func:`data_dir`)."""
    out = Path(out) if out is not None else data_dir()
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"format": FORMAT, "seed": SEED, "sources": {}}
    for name, (rows, inputs) in _sources(Path(src)).items():
        path = out / f"{name}.jsonl"
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
        os.replace(tmp, path)
        manifest["sources"][name] = {
            "rows": len(rows), "sha256": sha256(path),
            "inputs": {p.name: sha256(p) for p in inputs},
        }
    if "manpages" in manifest["sources"]:
        manifest["sources"]["manpages"]["inputs"] = {"lexgrog": f"{MAN_DIR} of the build machine (not pinned)"}
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sources", type=Path, required=True, help="folder the .deb files were extracted into")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    man = build(args.sources, args.out)
    for k, v in man["sources"].items():
        print(f"{k}: {v['rows']} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
