"""Fault injection over the results store, driven through the command line (typer's CliRunner).

Each case damages a copy of the committed ``results/`` in one way, runs one command, and checks:
the exit code (non-zero for an error or, for ``store check``, for problems found; zero where a
damaged file is merely skipped), one line naming the file at fault, no traceback, and that the
store still reads afterwards with every intact unit's rows all there.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from mergebench.results import store
from mergebench.cli import app

REPO_RESULTS = Path(__file__).resolve().parents[1] / "results"
runner = CliRunner()


def _first(d: Path, table: str) -> Path:
    folder, pattern = store._TABLE_FILES[table]
    return sorted((d / folder).glob(pattern))[0]


def _break(table: str, how: str) -> Callable[[Path], Path]:
    def inject(d: Path) -> Path:
        f = _first(d, table)
        if how == "zero":
            f.write_bytes(b"")
        elif how == "truncated":
            with open(f, "r+b") as fh:
                fh.truncate(f.stat().st_size - 9)
        else:  # garbage
            f.write_bytes(b"not parquet at all " * 20)
        return f

    return inject


def _orphan(d: Path) -> Path:
    u = store.Unit(suite="glue", suite_version="1", profile="embedded", role="merged", subset=("a", "b"),
                   method="ties", method_version="1")
    return store.write_provenance({"eval_wall_s": 1.0}, run_id="crashed", unit=u, results_dir=d)


def _duplicate(d: Path) -> Path:
    f = _first(d, "results")
    dup = f.with_name(f.name.replace("part-", "part-zz-", 1))  # sorts after the original: it is the extra one
    shutil.copy(f, dup)
    return dup


def _stale_temp(d: Path) -> Path:
    f = _first(d, "results")
    tmp = f.with_name(f".{f.name}.0123456789abcdef.tmp")
    tmp.write_bytes(b"PAR1 half a file")
    import os

    os.utime(tmp, (1.0e9, 1.0e9))
    return tmp


def _stale_claim(d: Path) -> Path:
    claim = d / store.CLAIMS_DIR / f"{'ab' * 10}.claim"  # what a killed process leaves: a file nobody locks
    claim.parent.mkdir()
    claim.write_text(json.dumps({"pid": 999999, "host": "gone", "since": "2025-01-01T00:00:00+00:00"}))
    return claim


def _results_file(d: Path) -> Path:
    f = d.parent / "results.parquet"
    f.write_bytes(b"PAR1")
    return f


def _disk_full(monkeypatch):
    def write(table, where, **kw):
        Path(where).write_bytes(b"PAR1")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq, "write_table", write)


@dataclass
class Case:
    id: str
    inject: Callable[[Path], Path | None]
    argv: list[str]  # {R}: the results folder, {F}: the file at fault, {O}: a path outside the store
    code: int
    says: str  # on the one line that names {F} (or, without a file, on an error line)
    lost: bool = False  # {F} is a rows file: its unit's rows are gone
    warns: bool = False  # a skipped file: a warning (not an error) names it
    patch: Callable | None = None
    unchanged: bool = False  # the store's bytes must be exactly as before the command
    extra: dict = field(default_factory=dict)


SQL_RESULTS = ["sql", "SELECT count(*) AS n FROM results", "--results", "{R}"]
SQL_PROV = ["sql", "SELECT count(*) AS n FROM provenance", "--results", "{R}"]
SQL_DIAG = ["sql", "SELECT count(*) AS n FROM diagnostics", "--results", "{R}"]
CHECK = ["store", "check", "--results", "{R}"]
REFUSED = "statements are refused"

CASES = [
    # damaged files are skipped with a warning; every command goes on
    Case("sql-runs-zero", _break("results", "zero"), SQL_RESULTS, 0, "is empty (0 bytes)", lost=True, warns=True),
    Case("sql-runs-truncated", _break("results", "truncated"), SQL_RESULTS, 0, "no Parquet footer", lost=True,
         warns=True),
    Case("sql-runs-garbage", _break("results", "garbage"), SQL_RESULTS, 0, "is not a Parquet file", lost=True,
         warns=True),
    Case("sql-prov-zero", _break("provenance", "zero"), SQL_PROV, 0, "is empty", warns=True),
    Case("sql-prov-truncated", _break("provenance", "truncated"), SQL_PROV, 0, "no Parquet footer", warns=True),
    Case("sql-diag-garbage", _break("diagnostics", "garbage"), SQL_DIAG, 0, "is not a Parquet file", warns=True),
    Case("sql-diag-truncated", _break("diagnostics", "truncated"), SQL_DIAG, 0, "no Parquet footer", warns=True),
    Case("report-runs-zero", _break("results", "zero"), ["report", "--results", "{R}", "--format", "csv"], 0,
         "is empty", lost=True, warns=True),
    Case("report-prov-garbage", _break("provenance", "garbage"), ["report", "--results", "{R}", "--format", "csv"], 0,
         "is not a Parquet file", warns=True),
    # store check lists every kind of problem and exits 1
    Case("check-runs-zero", _break("results", "zero"), CHECK, 1, "empty (0 bytes)", lost=True),
    Case("check-prov-truncated", _break("provenance", "truncated"), CHECK, 1, "no Parquet footer"),
    Case("check-diag-garbage", _break("diagnostics", "garbage"), CHECK, 1, "not a Parquet file"),
    Case("check-orphan", _orphan, CHECK, 1, "has no readable rows file"),
    Case("check-duplicate", _duplicate, CHECK, 1, "its unit is also in"),
    Case("check-stale-temp", _stale_temp, CHECK, 1, "bytes, last written"),
    Case("check-stale-claim", _stale_claim, CHECK, 1, "left by pid 999999 on gone"),
    Case("check-fix-moves-it", _break("results", "garbage"), [*CHECK, "--fix"], 0, "not a Parquet file", lost=True),
    # a results path that is a file, or under one, is refused before anything runs
    Case("sql-results-is-a-file", _results_file, ["sql", "SELECT 1", "--results", "{F}"], 2, "is a file"),
    Case("check-results-under-a-file", _results_file, ["store", "check", "--results", "{F}/sub"], 2,
         "which is a file"),
    Case("sweep-results-is-a-file", _results_file, ["sweep", "--suite", "inthewild", "--methods", "linear",
                                                    "--results", "{F}", "--dry-run"], 2, "is a file"),
    # sql never writes: not into the store, not anywhere
    Case("sql-copy-over-a-unit", lambda d: _first(d, "results"), ["sql", "COPY (SELECT 1) TO '{F}'", "--results", "{R}"],
         2, REFUSED, unchanged=True),
    Case("sql-copy-no-tmp", lambda d: _first(d, "results"),
         ["sql", "COPY (SELECT 1 AS a) TO '{F}' (FORMAT parquet, USE_TMP_FILE false)", "--results", "{R}"], 2, REFUSED,
         unchanged=True),
    Case("sql-copy-after-select", lambda d: _first(d, "provenance"),
         ["sql", "SELECT 1; COPY (SELECT 1) TO '{F}'", "--results", "{R}"], 2, REFUSED, unchanged=True),
    Case("sql-export", lambda d: None, ["sql", "EXPORT DATABASE '{R}/runs'", "--results", "{R}"], 2, REFUSED,
         unchanged=True),
    Case("sql-attach", lambda d: _first(d, "results"), ["sql", "ATTACH '{F}' AS x", "--results", "{R}"], 2, REFUSED,
         unchanged=True),
    Case("sql-read-outside", lambda d: None, ["sql", "SELECT * FROM read_csv('{O}')", "--results", "{R}"], 2,
         "reads only the store's views", unchanged=True),
    Case("sql-empty-query", lambda d: None, ["sql", "  ", "--results", "{R}"], 2, "the query is empty",
         unchanged=True),
    Case("sql-out-inside-results", lambda d: None, [*SQL_RESULTS, "--out", "{R}/runs/x.csv"], 2,
         "inside the results folder", unchanged=True),
    # a full disk: one line naming the file, no temp file, the store as it was
    Case("sql-out-disk-full", lambda d: None, [*SQL_RESULTS, "--out", "{O}.parquet"], 2, "disk full while writing",
         patch=_disk_full, unchanged=True),
]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pristine") / "results"
    shutil.copytree(REPO_RESULTS, d, ignore=shutil.ignore_patterns(store.QUARANTINE_DIR, store.CLAIMS_DIR, ".*.tmp"))
    return d


def _unit_rows(d: Path) -> dict[str, int]:
    with store.connect(d) as con:
        return dict(con.execute("SELECT unit_id, count(DISTINCT (task, metric)) FROM results GROUP BY ALL").fetchall())


def _snapshot(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def test_there_are_enough_cases():
    assert len(CASES) >= 20 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fault(case: Case, pristine, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = Path("results")
    shutil.copytree(pristine, d)
    before_rows = _unit_rows(d)
    at_fault = case.inject(d)
    lost = {at_fault.stem.rsplit("-", 1)[-1]} if case.lost else set()
    outside = tmp_path / "outside.csv"
    outside.write_text("a\n1\n")
    before = _snapshot(d)
    argv = [a.format(R=d, F=at_fault, O=outside) for a in case.argv]
    with monkeypatch.context() as patched, warnings.catch_warnings(record=True) as seen:
        if case.patch:
            case.patch(patched)
        warnings.simplefilter("always")
        res = runner.invoke(app, argv)
    text = res.stdout + res.stderr
    assert res.exit_code == case.code, text
    assert "Traceback" not in text, text
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    lines = [*text.splitlines(), *(str(w.message) for w in seen if issubclass(w.category, store.StoreWarning))]
    if argv[:2] == ["store", "check"] and case.code != 2:  # the file's name, then what is wrong with it
        lines = [f"{a} {b}" for a, b in zip(lines, lines[1:]) if a.startswith("    ") and b.startswith("      ")]
    named = [ln for ln in lines if case.says in ln]
    assert named, text
    if at_fault is not None and case.code != 2:
        assert any(at_fault.name in ln for ln in named), named
    if case.warns:
        assert any(ln.startswith("warning: ") or "skipped" in ln for ln in named) and "mergebench store check" in named[0]
    if case.code == 2:  # an error: exactly one line, on stderr, and nothing on stdout
        assert res.stderr.strip().count("\n") == 0 and res.stderr.startswith("error: ") and not res.stdout.strip()
    if argv[:2] == ["store", "check"]:  # reads well at 100 columns (with a short --results)
        assert all(len(ln) <= 100 for ln in res.stdout.splitlines()), res.stdout
    if case.unchanged:
        assert _snapshot(d) == before
    assert not [p for p in d.rglob(".*.tmp") if p != at_fault] and not list(tmp_path.glob(".*.tmp"))
    # the store reads afterwards, and every intact unit's rows are all there
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", store.StoreWarning)
        after = _unit_rows(d)
    assert after == {u: n for u, n in before_rows.items() if u not in lost}
    if "--fix" in argv:
        assert not store.check_store(d).problems and (d / store.QUARANTINE_DIR).is_dir()
        (moved,) = (d / store.QUARANTINE_DIR).rglob(at_fault.name)
        assert moved.read_bytes() == b"not parquet at all " * 20  # moved aside, never deleted
        again = runner.invoke(app, CHECK[:2] + ["--results", str(d)])
        assert again.exit_code == 0 and "no problems found" in again.stdout
