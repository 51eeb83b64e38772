"""Faults of whole runs: `mergebench eval` and `mergebench sweep` killed with SIGKILL at seeded random
points and resumed, two writers on one store at once, a disk that fills up during `eval`.

Every run is a real subprocess (``python -m mergebench.cli``) on the tiny random pool and suite of
``conftest.tiny_suites`` with a fresh ``--results`` folder and a private temp folder per case.
After each fault the store is accounted for file by file (not through the store's own views,
which would hide a duplicate): every planned unit's (unit_id, task, metric) rows exactly once and
equal to an uninterrupted run's, one provenance record per unit, no temp file, no claim, no
process left, ``mergebench store check`` clean, and the killed process's task folders removed.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from _faults import private_tmpfs
from mergebench.results import store
from mergebench.cli import app

runner = CliRunner()
SEED = 20261201
N_KILLS = 10  # per command
COMMANDS = {
    "eval": ["eval", "--suite", "tiny", "--method", "linear", "--no-progress", "--threads", "1"],
    "sweep": ["sweep", "--suite", "tiny", "--methods", "linear", "--no-progress"],
}
STORE_ENTRIES = {"runs", "provenance", store.CLAIMS_DIR, "samples"}  # everything else would be a leftover
_REFERENCE: dict[str, dict] = {}  # command -> uninterrupted run: its duration and rows
_LANDED: dict[str, dict[int, int]] = {}  # command -> case -> rows files stored when it was killed


def _env(suites: Path, tmp: Path) -> dict[str, str]:
    tmp.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MERGEBENCH_SUITES": str(suites), "TMPDIR": str(tmp), "MERGEBENCH_CACHE": str(tmp / "cache"),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MERGEBENCH_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "200"}
    env.pop("MERGEBENCH_DEBUG", None)
    return env


def _argv(command: str, results: Path) -> list[str]:
    return [sys.executable, "-m", "mergebench.cli", *COMMANDS[command], "--results", str(results)]


def _start(command: str, results: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(_argv(command, results), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err


def _rows(results: Path) -> Counter:
    """(unit_id, task, metric) -> how many rows of it the store's rows files hold, read file by file."""
    seen: Counter = Counter()
    for f in sorted((results / "runs").rglob("*.parquet")):
        t = pq.read_table(f, columns=["unit_id", "task", "metric"])
        seen.update(zip(*(t.column(c).to_pylist() for c in ("unit_id", "task", "metric"))))
    return seen


def _values(results: Path) -> dict[tuple, float]:
    out = {}
    for f in sorted((results / "runs").rglob("*.parquet")):
        for r in pq.read_table(f, columns=["unit_id", "task", "metric", "value"]).to_pylist():
            out[r["unit_id"], r["task"], r["metric"]] = r["value"]
    return out


def _provenance(results: Path) -> Counter:
    seen: Counter = Counter()
    for f in sorted((results / "provenance").rglob("*.parquet")):
        seen.update(pq.read_table(f, columns=["unit_id"]).column("unit_id").to_pylist())
    return seen


def _processes_naming(folder: Path) -> list[str]:
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(str(folder) in a for a in p.info["cmdline"] or []):
                found.append(f"pid {p.info['pid']}: {' '.join(p.info['cmdline'])}")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _task_folders(tmp: Path, pid: int | None = None) -> list[Path]:
    return sorted(tmp.glob(f"mergebench-tasks-pid{pid}-*" if pid else "mergebench-tasks-*"))


def _reference(command: str, suites: Path, tmp_path_factory) -> dict:
    """One uninterrupted run of ``command`` (once per session): how long it takes, what it stores."""
    if command not in _REFERENCE:
        where = tmp_path_factory.mktemp(f"reference-{command}")
        env = _env(suites, where / "tmp")
        t0 = time.perf_counter()
        code, text = _finish(_start(command, where / "results", env))
        assert code == 0, text
        rows = _rows(where / "results")
        assert len({u for u, _, _ in rows}) == 7 and set(rows.values()) == {1}, rows  # base, 3 experts, 3 merges
        _REFERENCE[command] = {"seconds": time.perf_counter() - t0, "rows": rows,
                               "values": _values(where / "results"), "units": {u for u, _, _ in rows}}
    return _REFERENCE[command]


def _assert_accounted(results: Path, ref: dict, tmp: Path) -> None:
    """The store of a finished run: every planned unit once, nothing left over, check clean."""
    rows = _rows(results)
    lost = set(ref["rows"]) - set(rows)
    extra = set(rows) - set(ref["rows"])
    dup = {k: n for k, n in rows.items() if n > 1}
    assert not lost and not extra and not dup, f"lost {sorted(lost)}, unplanned {sorted(extra)}, duplicated {dup}"
    assert _values(results) == pytest.approx(ref["values"]), "resumed scores differ from an uninterrupted run's"
    prov = _provenance(results)
    assert prov == Counter({u: 1 for u in ref["units"]}), f"provenance records per unit: {dict(prov)}"
    with store.connect(results) as con:  # each unit's per-document outcomes, from the run whose rows are stored
        outcomes = dict(con.execute("SELECT unit_id, count(DISTINCT run_id) FROM samples GROUP BY unit_id").fetchall())
    # outcomes land after the rows and provenance: a kill in between leaves a unit without them (like
    # provenance, they are never half-written and never come from two runs)
    assert set(outcomes) <= set(ref["units"]) and set(outcomes.values()) <= {1}, f"outcome runs per unit: {outcomes}"
    assert len(outcomes) >= len(ref["units"]) - 1, f"units without outcomes: {set(ref['units']) - set(outcomes)}"
    left = [p for p in results.rglob("*") if p.name.endswith(".tmp") or (p.is_file() and p.parent.name ==
                                                                         store.CLAIMS_DIR)]
    assert not left, f"left in the store: {left}"
    assert {p.name for p in results.iterdir()} <= STORE_ENTRIES, sorted(p.name for p in results.iterdir())
    res = runner.invoke(app, ["store", "check", "--results", str(results)])
    assert res.exit_code == 0 and "no problems found" in res.stdout, res.output
    assert not _processes_naming(results), _processes_naming(results)
    assert not _task_folders(tmp), f"task folders left in the temp folder: {_task_folders(tmp)}"


# ------------------------------------------------------------------------------------ kill -9


def _kill_delay(command: str, case: int, seconds: float) -> float:
    """A seeded random point in the case-th tenth of 95% of the measured run (so the ten cases cover
    the run from its start-up to its last units)."""
    span = 0.95 * seconds / N_KILLS
    return random.Random(f"{SEED}-{command}-{case}").uniform(case * span, (case + 1) * span)


@pytest.mark.slow
@pytest.mark.parametrize("case", range(N_KILLS))
@pytest.mark.parametrize("command", list(COMMANDS))
def test_kill_9_then_resume_loses_and_repeats_nothing(command, case, tiny_suites, tmp_path, tmp_path_factory):
    ref = _reference(command, tiny_suites, tmp_path_factory)
    results, tmp = tmp_path / "results", tmp_path / "tmp"
    env = _env(tiny_suites, tmp)
    delay = _kill_delay(command, case, ref["seconds"])
    for _ in range(3):  # a run faster than the measured one (a less loaded machine) may end first
        proc = _start(command, results, env)
        time.sleep(delay)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            code, _ = _finish(proc, 30)
            if code == -signal.SIGKILL:  # else it ended between the poll and the kill: try again
                break
        else:
            _finish(proc)
        shutil.rmtree(results)
        delay *= 0.7
    else:
        pytest.fail(f"the run kept ending before its kill point ({delay:.1f} s of ~{ref['seconds']:.1f} s)")
    stored = sum(1 for _ in (results / "runs").rglob("*.parquet")) if results.is_dir() else 0
    _LANDED.setdefault(command, {})[case] = stored
    assert not _processes_naming(results), "a child of the killed run outlived it"
    killed_tasks = _task_folders(tmp, proc.pid)
    code, text = _finish(_start(command, results, env))
    assert code == 0, text
    assert "Traceback" not in text and "error:" not in text, text
    done = {"eval": r"(\d+) unit\(s\) evaluated, (\d+) reused", "sweep": r"(\d+) unit\(s\) run, (\d+) already in"}
    m = re.search(done[command], text)
    assert m and (int(m[1]), int(m[2])) == (7 - stored, stored), (stored, text)  # the stored units are not redone
    assert not any(p.exists() for p in killed_tasks), "the killed run's task folders were not cleaned up"
    _assert_accounted(results, ref, tmp)


@pytest.mark.slow
@pytest.mark.parametrize("command", list(COMMANDS))
def test_the_kills_landed_all_over_the_run(command):
    """The ten kill points of a command hit before any unit was stored and between units, up to
    the last ones (rows files stored at each kill; about half of a run is start-up)."""
    landed = _LANDED.get(command, {})
    if len(landed) < N_KILLS:
        pytest.skip("run with every kill case of this command")
    assert min(landed.values()) == 0 and max(landed.values()) >= 4, landed
    assert len(set(landed.values())) >= 3, landed


# ------------------------------------------------------------------------------- two writers


@pytest.mark.slow
@pytest.mark.parametrize("pair", [("eval", "eval"), ("eval", "sweep")], ids=["eval+eval", "eval+sweep"])
def test_two_writers_on_one_store_compute_each_unit_once(pair, tiny_suites, tmp_path, tmp_path_factory):
    ref = _reference("eval", tiny_suites, tmp_path_factory)
    results, tmp = tmp_path / "results", tmp_path / "tmp"
    env = _env(tiny_suites, tmp)
    procs = [_start(c, results, env) for c in pair]
    outcomes = [_finish(p) for p in procs]
    done = 0
    for (code, text), command in zip(outcomes, pair):
        assert code == 0 and "Traceback" not in text, text
        pattern = r"(\d+) unit\(s\) evaluated" if command == "eval" else r"(\d+) unit\(s\) run"
        done += int(re.search(pattern, text)[1])
    assert done == 7, [t for _, t in outcomes]  # each unit computed by exactly one of the two
    _assert_accounted(results, ref, tmp)


# --------------------------------------------------------------------------------- disk full


@pytest.mark.slow
def test_disk_full_during_eval_on_a_real_tiny_filesystem(tiny_suites, tmp_path, tmp_path_factory):
    """``--results`` on an 80 KiB tmpfs (a private user+mount namespace; skipped where that is not
    allowed) fills up after a unit or two: one ``error:`` line naming the file, nothing half-written,
    the store readable; with space again the rerun completes."""
    mnt = private_tmpfs(tmp_path, "80k")
    ref = _reference("eval", tiny_suites, tmp_path_factory)
    env = _env(tiny_suites, tmp_path / "tmp")
    full, after = tmp_path / "when_full", tmp_path / "after_rerun"
    run = " ".join(_argv("eval", mnt / "r"))
    check = f"{sys.executable} -m mergebench.cli store check --results {mnt / 'r'}"
    script = (f"mount -t tmpfs -o size=80k tmpfs {mnt} && {{ {run} >{tmp_path}/out1 2>{tmp_path}/err1; echo $? >"
              f"{tmp_path}/rc1; cp -a {mnt}/r {full}; mount -o remount,size=16m {mnt} && {run} >{tmp_path}/out2 "
              f"2>{tmp_path}/err2; echo $? >{tmp_path}/rc2; {check} >{tmp_path}/check; echo $? >{tmp_path}/rc3; "
              f"cp -a {mnt}/r {after}; }}")
    res = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    text = (tmp_path / "err1").read_text() + (tmp_path / "out1").read_text()
    assert (tmp_path / "rc1").read_text().strip() == "2", text
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in text, text
    assert re.match(rf"error: disk full while writing {re.escape(str(mnt / 'r'))}/\S+", errors[0]), errors[0]
    _assert_partial_store_sound(full, ref)
    assert (tmp_path / "rc2").read_text().strip() == "0", (tmp_path / "err2").read_text()
    assert (tmp_path / "rc3").read_text().strip() == "0", (tmp_path / "check").read_text()
    _assert_accounted(after, ref, tmp_path / "tmp")


def _assert_partial_store_sound(results: Path, ref: dict) -> None:
    """What a failed run left: only whole units (rows and provenance), readable, no temp file."""
    rows = _rows(results)  # raises on a half-written Parquet file
    units = {u for u, _, _ in rows}
    assert units < ref["units"] and set(rows.values()) == {1}
    assert {k for k in ref["rows"] if k[0] in units} == set(rows), "a unit's rows are incomplete"
    assert set(_provenance(results)) <= units
    assert not [p for p in results.rglob("*") if p.name.endswith(".tmp")]
    assert store.check_store(results).clean
    with store.connect(results) as con:
        assert con.execute("SELECT count(DISTINCT unit_id) FROM results").fetchone()[0] == len(units)


# ------------------------------------------------------------- diagnose, report, leaderboard, zoo


def _one_error_line(res) -> str:
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert "Traceback" not in res.output and res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


def _a_file(env) -> str:
    return str(env["file"])


def _under_a_file(name: str):
    return lambda env: str(env["file"] / name)


DIAG = ["diagnose", "--pool", "tiny"]
ARG_FAULTS = [
    # diagnose
    ("diagnose unknown pool", ["diagnose", "--pool", "nosuch"], ["unknown pool 'nosuch'"]),
    ("diagnose unknown expert", [*DIAG, "--experts", "e0,nosuch"], ["pool 'tiny' has no expert 'nosuch'"]),
    ("diagnose unknown method", [*DIAG, "--method", "nosuch"], ["unknown merge method 'nosuch'"]),
    ("diagnose unknown kind", [*DIAG, "--kinds", "weights,colour"], ["unknown diagnostic kind", "'colour'"]),
    ("diagnose no kind", [*DIAG, "--kinds", ","], ["--kinds names no diagnostic kind"]),
    ("diagnose --layer too deep", [*DIAG, "--layer", "99", "--kinds", "representations"],
     ["layer 99 is out of range", "3 hidden states"]),
    ("diagnose --layer too negative", [*DIAG, "--layer", "-4", "--kinds", "representations"],
     ["layer -4 is out of range"]),
    ("diagnose --layers not integers", [*DIAG, "--layers", "a,b"], ["--layers", "'a,b'"]),
    ("diagnose --layers too deep", [*DIAG, "--layers", "0,99", "--kinds", "activations"], ["layer 99 is out of range"]),
    ("diagnose --k 0", [*DIAG, "--k", "0"], ["document budget", "got 0"]),
    ("diagnose --results is a file", [*DIAG, "--results", _a_file], ["--results", "is a file"]),
    ("diagnose --device tpu", [*DIAG, "--device", "tpu"], ["'tpu'"]),
    ("diagnose parameter out of range", [*DIAG, "--method", "ties", "--set", "density=3"], ["'density'", "3"]),
    ("diagnose --set without =", [*DIAG, "--method", "ties", "--set", "novalue"], ["'novalue'"]),
    ("diagnose one expert to compare", [*DIAG, "--experts", "e0", "--kinds", "representations"],
     ["at least two", "e0"]),
    # report
    ("report unknown suite", ["report", "--suite", "nosuch"], ["unknown suite 'nosuch'"]),
    ("report bad --format", ["report", "--format", "pdf"], ["--format", "'pdf'"]),
    ("report --results is a file", ["report", "--results", _a_file], ["--results", "is a file"]),
    ("report --results under a file", ["report", "--results", _under_a_file("r")], ["which is a file"]),
    ("report --out under a file", ["report", "--out", _under_a_file("report.md")], ["--out", "which is a file"]),
    ("report --out is a folder", ["report", "--out", lambda env: str(env["tmp"])], ["--out", "is a folder"]),
    ("report --plots is a file", ["report", "--plots", _a_file], ["--plots", "is a file"]),
    # leaderboard (never started: every case fails before Streamlit would replace the process)
    ("leaderboard --results is a file", ["leaderboard", "--results", _a_file], ["--results", "is a file"]),
    ("leaderboard port in use", ["leaderboard", "--port", lambda env: str(env["busy_port"])],
     ["already in use", "choose another --port"]),
    ("leaderboard --port 0", ["leaderboard", "--port", "0"], ["--port must be in 1..65535", "0"]),
    ("leaderboard --port 70000", ["leaderboard", "--port", "70000"], ["--port must be in 1..65535", "70000"]),
    ("leaderboard foreign --host", ["leaderboard", "--host", "192.0.2.1"], ["--host 192.0.2.1", "cannot listen"]),
    # zoo (nothing is materialized: the stubs below fail the test if anything would be)
    ("zoo materialize unknown expert", ["zoo", "materialize", "--experts", "capitals,nosuch"],
     ["no expert 'nosuch'", "capitals"]),
    ("zoo materialize --cache is a file", ["zoo", "materialize", "--cache", _a_file], ["--cache", "is a file"]),
    ("zoo verify bad --split", ["zoo", "verify", "--split", "tset"], ["--split", "'tset'", "validation"]),
    ("zoo verify unknown expert", ["zoo", "verify", "--experts", "nosuch"], ["no expert 'nosuch'"]),
    ("zoo verify --docs -3", ["zoo", "verify", "--docs", "-3"], ["--docs", "-3"]),
    ("zoo verify --json under a file", ["zoo", "verify", "--json", _under_a_file("rows.json")],
     ["--json", "which is a file"]),
    ("zoo build unknown expert", ["zoo", "build", "--experts", "nosuch"], ["no expert 'nosuch'"]),
]
TAKES_RESULTS = ("diagnose", "report", "leaderboard")


def _never(what: str):
    def stub(*args, **kwargs):
        raise AssertionError(f"the fault case went on to {what}")

    return stub


@pytest.mark.parametrize("argv, culprits", [pytest.param(a, c, id=i) for i, a, c in ARG_FAULTS])
def test_an_argument_fault_is_one_line_naming_it(argv, culprits, tiny_suites, tmp_path, monkeypatch):
    import socket

    from mergebench.zoo import base as zoo_base
    from mergebench.zoo import pool as zoo_pool

    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(zoo_base, "materialize_base", _never("materialize the embedded base"))
    monkeypatch.setattr(zoo_pool, "_materialize_expert", _never("materialize an embedded expert"))
    monkeypatch.setattr(os, "execve", _never("start the leaderboard"))
    monkeypatch.setattr(subprocess, "Popen", _never("start the leaderboard"))
    env = {"file": tmp_path / "a_file.txt", "tmp": tmp_path}
    env["file"].write_text("not a folder")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env["busy_port"] = busy.getsockname()[1]
        args = [a(env) if callable(a) else a for a in argv]
        if args[0] in TAKES_RESULTS and "--results" not in args:  # never the checkout's own results/
            args += ["--results", str(tmp_path / "results")]
        res = runner.invoke(app, args)
    line = _one_error_line(res)
    for c in culprits:
        assert c in line, (c, line)
    assert not (tmp_path / "results").exists() and not (tmp_path / "cache").exists(), "written before the check"


def test_there_are_at_least_30_argument_faults():
    assert len(ARG_FAULTS) >= 30 and len({i for i, _, _ in ARG_FAULTS}) == len(ARG_FAULTS)
