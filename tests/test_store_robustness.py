"""The results store under damage and concurrency: damaged files are skipped (and their units
recomputed), rows and provenance land together, claims keep two real processes from computing a
unit twice, `sql` cannot write, a full disk ends in one line, kill leftovers clean themselves."""

from __future__ import annotations

import errno
import hashlib
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pyarrow.parquet as pq
import pytest

from mergebench.results import store
from mergebench.errors import MergebenchError
from mergebench.results.store import StoreWarning, Unit

ROWS = [
    {"task": "mb_capitals", "metric": "acc", "value": 0.75, "stderr": 0.04, "n_docs": 120},
    {"task": "mb_sentiment", "metric": "acc", "value": 0.5, "stderr": 0.05, "n_docs": 100},
]
FORK = mp.get_context("fork")  # the children inherit the monkeypatched fake compute


def unit(i: int) -> Unit:
    return Unit(suite="inthewild", suite_version="1", profile="embedded", pool="smol", base_model="b", role="merged",
                subset=(f"e{i}", f"e{i + 1}"), method="linear", method_version="1", params={"t": i}, seed=0,
                doc_index_hash="h")


def fill(d: Path, n: int = 3, **kw) -> list[Unit]:
    units = [unit(i) for i in range(n)]
    for u in units:
        store.write_unit(u, ROWS, run_id="r1", results_dir=d, provenance={"eval_wall_s": 1.0}, **kw)
    return units


def rows_file(d: Path, u: Unit) -> Path:
    (f,) = (d / "runs").rglob(f"part-*{u.unit_id}.parquet")
    return f


def prov_files(d: Path) -> list[Path]:
    return sorted((d / "provenance").rglob("prov-*.parquet"))


def count(d: Path, view: str = "results") -> int:
    with store.connect(d) as con:
        return con.execute(f"SELECT count(*) FROM {view}").fetchone()[0]


def snapshot(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def damage(path: Path, how: str) -> None:
    if how == "zero":
        path.write_bytes(b"")
    elif how == "truncated":
        with open(path, "r+b") as fh:
            fh.truncate(path.stat().st_size // 2)
    elif how == "garbage":
        path.write_bytes(os.urandom(300))
    elif how == "footer":  # header and footer magic look right, the metadata inside does not parse
        path.write_bytes(b"PAR1" + b"\x07" * 200 + (60).to_bytes(4, "little") + b"PAR1")
    else:
        raise AssertionError(how)


# ------------------------------------------------------------------------------- damage


@pytest.mark.parametrize("how, says", [("zero", "is empty (0 bytes)"), ("truncated", "no Parquet footer"),
                                       ("garbage", "is not a Parquet file"), ("footer", None)])
def test_file_problem_names_the_damage_and_follows_the_file(tmp_path, how, says):
    (u,) = fill(tmp_path, 1)
    f = rows_file(tmp_path, u)
    assert store.file_problem(f) is None
    sound = f.read_bytes()
    damage(f, how)
    got = store.file_problem(f)
    assert got == says if says is None else says in got  # the footer case passes the cheap check
    if how == "footer":
        assert "is damaged" in store._deep_problem(f, store.RESULTS_SCHEMA)
    f.write_bytes(sound)  # repaired in place: the (size, mtime) cache must not answer from before
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 1))
    assert store.file_problem(f) is None


@pytest.mark.parametrize("exclusive", [False, True])
@pytest.mark.parametrize("how", ["zero", "truncated", "garbage"])
def test_damaged_rows_file_is_skipped_and_its_unit_recomputed(tmp_path, how, exclusive):
    units = fill(tmp_path, 3, exclusive=exclusive)
    bad = rows_file(tmp_path, units[1])
    damage(bad, how)
    broken = bad.read_bytes()
    with pytest.warns(StoreWarning, match=bad.name) as seen:
        assert store.completed_units(tmp_path) == {units[0].unit_id, units[2].unit_id}
        assert not store.has_unit(units[1], tmp_path)
        assert count(tmp_path) == 2 * len(ROWS)
        assert count(tmp_path, "provenance") == 2  # the unit's provenance goes with its rows
    assert all("store check" in str(w.message) and "--fix" in str(w.message) for w in seen)
    # the resume stores it again; the damaged file is moved aside, not deleted
    with pytest.warns(StoreWarning, match="quarantine"):
        res = store.write_unit(units[1], ROWS, run_id="r2", results_dir=tmp_path, exclusive=exclusive,
                               provenance={"eval_wall_s": 2.0})
    assert res.written and (not bad.exists() or store.file_problem(bad) is None)
    (moved,) = (tmp_path / "quarantine").rglob(bad.name)
    assert moved.read_bytes() == broken
    assert store.completed_units(tmp_path) == {u.unit_id for u in units}
    assert count(tmp_path) == 3 * len(ROWS)


def test_a_file_that_passes_the_cheap_check_but_does_not_parse_is_skipped_at_connect(tmp_path):
    units = fill(tmp_path, 3)
    bad = rows_file(tmp_path, units[0])
    damage(bad, "footer")
    with pytest.warns(StoreWarning, match=bad.name):
        with store.connect(tmp_path) as con:
            assert con.execute("SELECT count(DISTINCT unit_id) FROM results").fetchone()[0] == 2


def test_provenance_and_diagnostics_readers_skip_damaged_files(tmp_path):
    from mergebench.diagnostics.store import DiagUnit, has_diagnostics, read_diagnostics, write_diagnostics

    (u,) = fill(tmp_path, 1)
    second = store.write_provenance({"eval_wall_s": 5.0}, run_id="r2", unit=u, results_dir=tmp_path)
    first = next(f for f in prov_files(tmp_path) if f != second)
    damage(first, "truncated")
    with pytest.warns(StoreWarning, match=first.name):
        assert [r["eval_wall_s"] for r in store.read_unit_provenance(u, tmp_path)] == [5.0]
        assert store.update_provenance(u, {"task_vector_norm": 1.5}, tmp_path) == [second]
    assert pq.read_table(second).column("task_vector_norm").to_pylist() == [1.5]

    diag = [DiagUnit("weights", pool="smol", subset=(f"e{i}",)) for i in range(2)]
    for d in diag:
        write_diagnostics(d, [{"kind": "weights", "metric": "cosine", "value": 0.5}], run_id="r", results_dir=tmp_path)
    (broken,) = (tmp_path / "diagnostics").rglob(f"diag-*-{diag[0].unit_id}.parquet")
    damage(broken, "garbage")
    with pytest.warns(StoreWarning, match=broken.name):
        assert len(read_diagnostics(tmp_path)) == 1 and not has_diagnostics(diag[0], tmp_path)
        assert count(tmp_path, "diagnostics") == 1
        assert write_diagnostics(diag[0], [{"kind": "weights", "metric": "cosine", "value": 0.5}], run_id="r2",
                                 results_dir=tmp_path).written
    assert len(read_diagnostics(tmp_path)) == 2


# --------------------------------------------------------------- rows and provenance together


def _commit_failing_at(monkeypatch, call: int):
    real, calls = store._commit, []

    def commit(*a, **kw):
        calls.append(a[1])
        if len(calls) == call:
            raise KeyboardInterrupt  # the process dies here
        return real(*a, **kw)

    monkeypatch.setattr(store, "_commit", commit)
    return calls


def test_a_failure_before_the_rows_commit_leaves_neither_rows_nor_provenance(tmp_path, monkeypatch):
    _commit_failing_at(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        store.write_unit(unit(0), ROWS, run_id="r", results_dir=tmp_path, provenance={"eval_wall_s": 1.0})
    assert not list(tmp_path.rglob("*.parquet")) and not list(tmp_path.rglob("*.tmp"))


def test_rows_are_committed_before_provenance(tmp_path, monkeypatch):
    calls = _commit_failing_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        store.write_unit(unit(0), ROWS, run_id="r", results_dir=tmp_path, provenance={"eval_wall_s": 1.0})
    assert calls[0].name.startswith("part-") and calls[1].name.startswith("prov-")
    assert store.has_unit(unit(0), tmp_path) and not prov_files(tmp_path)  # never the other way round
    assert not list(tmp_path.rglob("*.tmp"))


def test_resumed_unit_has_one_provenance_record(tmp_path, monkeypatch):
    # the failure the old order made an orphan of: the unit's rows write fails after provenance
    real = pq.write_table
    monkeypatch.setattr(pq, "write_table", lambda t, where, **kw: (_ for _ in ()).throw(OSError(errno.EIO, "I/O")))
    with pytest.raises(store.StoreWriteError):
        store.write_unit(unit(0), ROWS, run_id="r1", results_dir=tmp_path, provenance={"eval_wall_s": 1.0})
    monkeypatch.setattr(pq, "write_table", real)
    store.write_unit(unit(0), ROWS, run_id="r2", results_dir=tmp_path, provenance={"eval_wall_s": 2.0})
    assert len(prov_files(tmp_path)) == 1 and count(tmp_path, "provenance") == 1


def test_provenance_without_rows_is_hidden_but_run_records_are_kept(tmp_path):
    (u,) = fill(tmp_path, 1)
    store.write_provenance({"eval_wall_s": 9.0}, run_id="old", unit=unit(7), results_dir=tmp_path)  # older versions
    store.write_provenance({"eval_wall_s": 3.0}, run_id="r1", suite="inthewild", results_dir=tmp_path)  # run-level
    with store.connect(tmp_path) as con:
        got = con.execute("SELECT unit_id FROM provenance ORDER BY unit_id NULLS LAST").fetchall()
    assert got == [(u.unit_id,), (None,)]
    assert store.read_unit_provenance(unit(7), tmp_path) == []
    assert store.sql("SELECT count(*) AS c FROM provenance", tmp_path)["c"][0] == 2  # the read-only path too
    orphan = [p for p in store.check_store(tmp_path).problems if p.kind == "orphan"]
    assert [p.path.name for p in orphan] == [f"prov-old-{unit(7).unit_id}.parquet"]


# --------------------------------------------------------------------------- disk full


def _disk_full(after_bytes: int = 64, message: str | None = None):
    def write(table, where, **kw):
        with open(where, "wb") as fh:  # part of the file reaches the disk, then the disk is full
            fh.write(b"PAR1" + b"\0" * after_bytes)
        raise OSError(errno.ENOSPC, "No space left on device") if message is None else OSError(message)

    return write


@pytest.mark.parametrize("message", [None, "Error writing bytes to file. Detail: [errno 28] No space left on device"])
def test_disk_full_ends_in_one_line_naming_the_file_and_leaves_no_temp_file(tmp_path, monkeypatch, message):
    units = fill(tmp_path, 2)
    before = snapshot(tmp_path)
    monkeypatch.setattr(pq, "write_table", _disk_full(message=message))
    with pytest.raises(store.StoreWriteError) as err:
        store.write_unit(unit(5), ROWS, run_id="r9", results_dir=tmp_path, provenance={"eval_wall_s": 1.0})
    msg = str(err.value)
    assert isinstance(err.value, MergebenchError) and isinstance(err.value, OSError)
    assert "\n" not in msg and msg.startswith("disk full while writing ") and f"part-r9-{unit(5).unit_id}" in msg
    assert err.value.errno == (errno.ENOSPC if message is None else None)
    assert snapshot(tmp_path) == before and not list(tmp_path.rglob(".*"))
    monkeypatch.undo()
    assert store.completed_units(tmp_path) == {u.unit_id for u in units} and count(tmp_path) == 2 * len(ROWS)


def test_disk_full_on_the_provenance_stores_nothing_of_the_unit(tmp_path, monkeypatch):
    real, calls = pq.write_table, []

    def write(table, where, **kw):
        calls.append(where)
        return (real if len(calls) == 1 else _disk_full())(table, where, **kw)

    monkeypatch.setattr(pq, "write_table", write)
    with pytest.raises(store.StoreWriteError, match="prov-r-"):
        store.write_unit(unit(0), ROWS, run_id="r", results_dir=tmp_path, provenance={"eval_wall_s": 1.0})
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


# ------------------------------------------------------------------------- results folder


def test_check_results_dir_finds_a_file_before_any_work(tmp_path):
    f = tmp_path / "results.txt"
    f.write_text("x")
    for path, says in [(f, "is a file, not a results folder"), (f / "sub" / "deeper", f"lies under {f}")]:
        with pytest.raises(store.ResultsDirError, match=says) as err:
            store.check_results_dir(path)
        assert "\n" not in str(err.value) and isinstance(err.value, MergebenchError)
    assert store.check_results_dir(tmp_path / "new" / "results") == tmp_path / "new" / "results"  # not created
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_check_results_dir_finds_an_unwritable_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(store.ResultsDirError, match="not writable"):
            store.check_results_dir(ro / "results")
        assert store.check_results_dir(ro, writable=False) == ro
    finally:
        ro.chmod(0o755)


# -------------------------------------------------------------------------------- claims


def _hold_claim(d, uid, started, release):
    with store.claim_unit(uid, d, run_id="holder") as claim:
        started.put(bool(claim))
        release.wait(30)


def test_a_claim_held_by_a_live_process_is_refused_and_names_it(tmp_path):
    uid = unit(0).unit_id
    started, release = FORK.Queue(), FORK.Event()
    p = FORK.Process(target=_hold_claim, args=(tmp_path, uid, started, release))
    p.start()
    try:
        assert started.get(timeout=30) is True
        with store.claim_unit(uid, tmp_path) as claim:
            assert not claim and f"pid {p.pid} on " in claim.holder and "(run holder)" in claim.holder
        assert store.check_store(tmp_path).clean  # a live claim is not a problem
    finally:
        release.set()
        p.join(30)
    with store.claim_unit(uid, tmp_path) as claim:
        assert claim
        with store.claim_unit(uid, tmp_path) as again:  # this process already holds it
            assert not again and "this process" in again.holder
    assert not list((tmp_path / store.CLAIMS_DIR).iterdir())  # released claims leave nothing


def test_the_claim_of_a_killed_process_is_taken_over_and_listed_as_stale(tmp_path):
    uid = unit(0).unit_id
    started, release = FORK.Queue(), FORK.Event()
    p = FORK.Process(target=_hold_claim, args=(tmp_path, uid, started, release))
    p.start()
    assert started.get(timeout=30) is True
    os.kill(p.pid, signal.SIGKILL)
    p.join(30)
    left = tmp_path / store.CLAIMS_DIR / f"{uid}.claim"
    assert left.is_file()
    (stale,) = store.check_store(tmp_path).problems
    assert stale.kind == "claim" and stale.path == left and f"pid {p.pid}" in stale.detail
    with store.claim_unit(uid, tmp_path) as claim:
        assert claim
    box, moved = store.fix_store(store.check_store(tmp_path))
    assert moved == [] and not left.exists()  # taken over and released: nothing left to move


def test_claim_unit_rejects_a_bad_id(tmp_path):
    with pytest.raises(ValueError, match="hex"):
        with store.claim_unit("../../etc", tmp_path):
            pass


def _fake_compute(marks: Path):
    def compute(plan, wu, provenance, **kw):
        (marks / f"{wu.unit.unit_id}-{os.getpid()}").touch()
        time.sleep(0.02)
        return pd.DataFrame(ROWS), {"eval_wall_s": 0.02}, None

    return compute


def _sweep_worker(d, units, run_id, barrier, out):
    from mergebench.sweep.unit import run_job

    barrier.wait(30)
    got = [run_job(None, SimpleNamespace(unit=u, tasks=[]), {}, results_dir=str(d), run_id=run_id) for u in units]
    out.put([(o.unit_id, o.status, o.note) for o in got])


def _eval_worker(d, units, run_id, barrier, out):
    """What the runner does per unit (store API only): claim, re-check, compute, write."""
    compute = _fake_compute(d.parent / "marks")
    barrier.wait(30)
    got = []
    for u in units:
        with store.claim_unit(u, d, run_id=run_id) as claim:
            if not claim or store.has_unit(u, d):
                got.append((u.unit_id, "skipped", claim.holder))
                continue
            rows, prov, _ = compute(None, SimpleNamespace(unit=u), {})
            store.write_unit(u, rows, run_id=run_id, results_dir=d, provenance=prov)
            got.append((u.unit_id, "done", None))
    out.put(got)


@pytest.mark.parametrize("worker", [_sweep_worker, _eval_worker])
def test_two_processes_racing_on_the_same_units_compute_each_once(tmp_path, monkeypatch, worker):
    from mergebench.sweep import unit as sweep_unit

    d, marks = tmp_path / "results", tmp_path / "marks"
    marks.mkdir()
    monkeypatch.setattr(sweep_unit, "_compute", _fake_compute(marks))
    units = [unit(i) for i in range(17)]
    barrier, out = FORK.Barrier(2), FORK.Queue()
    procs = [FORK.Process(target=worker, args=(d, units if k == 0 else units[::-1], f"run{k}", barrier, out))
             for k in range(2)]
    for p in procs:
        p.start()
    outcomes = [o for _ in procs for o in out.get(timeout=120)]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    computed = sorted(m.name.rsplit("-", 1)[0] for m in marks.iterdir())
    assert computed == sorted(u.unit_id for u in units)  # every unit computed exactly once
    assert sum(s == "done" for _, s, _ in outcomes) == 17 and len(outcomes) == 34
    assert len(list((d / "runs").rglob("*.parquet"))) == 17 and len(prov_files(d)) == 17
    assert count(d) == 17 * len(ROWS) and count(d, "provenance") == 17
    assert not list((d / store.CLAIMS_DIR).iterdir()) and store.check_store(d).clean


# ------------------------------------------------------------------------------------- sql


@pytest.mark.parametrize("statement", [
    "COPY (SELECT 1) TO '{f}'",
    "COPY (SELECT 1) TO '{f}' (FORMAT parquet, USE_TMP_FILE false)",
    "SELECT 1; COPY (SELECT 1) TO '{f}'",
    "EXPORT DATABASE '{d}'",
    "ATTACH '{f}' AS x",
    "CREATE TABLE t AS SELECT 1",
    "INSTALL httpfs",
    "SET enable_external_access = true",
    "PRAGMA enable_profiling",
    "EXPLAIN ANALYZE COPY (SELECT 1) TO '{f}'",
])
def test_sql_refuses_every_writing_statement_and_nothing_changes(tmp_path, statement):
    units = fill(tmp_path, 2)
    target = rows_file(tmp_path, units[0])
    before = snapshot(tmp_path)
    with pytest.raises(store.QueryRefusedError, match="statements are refused") as err:
        store.sql(statement.format(f=target, d=tmp_path / "runs"), tmp_path)
    assert "\n" not in str(err.value)
    assert snapshot(tmp_path) == before
    assert count(tmp_path) == 2 * len(ROWS)


def test_sql_reads_only_the_store(tmp_path):
    fill(tmp_path, 2)
    outside = tmp_path.parent / f"{tmp_path.name}-outside.csv"
    outside.write_text("a\n1\n")
    with pytest.raises(store.QueryRefusedError, match="reads only the store's views"):
        store.sql(f"SELECT * FROM read_csv('{outside}')", tmp_path)
    got = store.sql("SELECT (SELECT count(*) FROM results) r, (SELECT count(*) FROM provenance) p, "
                    "(SELECT count(*) FROM diagnostics) d, (SELECT count(*) FROM all_results) a", tmp_path)
    assert got.values.tolist() == [[4, 2, 0, 4]]


def test_write_export_is_atomic_and_never_inside_the_store(tmp_path):
    fill(tmp_path / "results", 2)
    df = store.sql("SELECT unit_id, subset, value FROM results ORDER BY unit_id, value", tmp_path / "results")
    csv = store.write_export(df, tmp_path / "out.csv", tmp_path / "results")
    back = pd.read_csv(csv)
    assert back["subset"].tolist() == ["|".join(s) for s in df["subset"]] and set(back["subset"]) == {"e0|e1", "e1|e2"}
    assert back["value"].tolist() == df["value"].tolist()
    pqt = store.write_export(df, tmp_path / "out.parquet", tmp_path / "results")
    assert pq.read_table(pqt).column("subset").to_pylist() == [list(s) for s in df["subset"]]
    before = snapshot(tmp_path / "results")
    for bad, says in [(tmp_path / "results" / "runs" / "x.csv", "inside the results folder"),
                      (tmp_path / "out.json", ".csv or .parquet"), (tmp_path / "nope" / "x.csv", "does not exist")]:
        with pytest.raises(store.StoreError, match=says):
            store.write_export(df, bad, tmp_path / "results")
    assert snapshot(tmp_path / "results") == before
    assert not list(tmp_path.glob(".*.tmp"))


# ------------------------------------------------------------------ embedded-task temp folders


def test_task_yaml_folders_live_in_one_per_process_folder_and_dead_ones_are_removed(tmp_path, monkeypatch):
    import tempfile

    from mergebench.zoo import tasks

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(tasks, "_TMP", {})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = time.time() - 3 * 86400
    made = {name: tmp_path / name for name in [f"mergebench-tasks-pid{dead.pid}-abc", f"mergebench-tasks-pid{os.getppid()}-x",
                                               "mergebench-tasks-test-old", "mergebench-tasks-test-new", "other-folder"]}
    for name, p in made.items():
        p.mkdir()
        (p / "t.yaml").write_text("x")
    os.utime(made["mergebench-tasks-test-old"], (old, old))
    folder = tasks.yaml_dir("test")
    assert folder.parent.name.startswith(f"mergebench-tasks-pid{os.getpid()}-") and list(folder.glob("*.yaml"))
    assert tasks.yaml_dir("validation").parent == folder.parent
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {folder.parent.name, f"mergebench-tasks-pid{os.getppid()}-x", "mergebench-tasks-test-new",
                    "other-folder"}


def test_task_yaml_folder_is_removed_when_its_process_exits(tmp_path):
    code = "from mergebench.zoo import tasks; print(tasks.yaml_dir('test').parent)"
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True)
    folder = Path(done.stdout.strip())
    assert folder.parent == tmp_path and folder.name.startswith("mergebench-tasks-pid") and not folder.exists()
