"""The Ray executor: the same rows as the local executor, and no lost or duplicated unit when a
worker is killed mid-sweep or the driver dies (a local Ray cluster on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mergebench.results import store
from mergebench.sweep.executors import RayExecutor, UnitResources, run_sweep
from mergebench.sweep.plan import plan_sweep

ray = pytest.importorskip("ray")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

QUIET = dict(log=lambda m: None)
TIMING_COLUMNS = ("run_id", "created_at")  # the only columns allowed to differ between executors


def write_small_suite(root, name, budget=3):
    """Two merges of two experts, two tasks, the base as the only reference (as in test_sweep.py)."""
    suite = {
        "name": name, "version": 1, "default_profile": "embedded",
        "profiles": {"embedded": {
            "pools": ["tiny"], "tasks": [{"name": t, "metric": "acc"} for t in ("mb_capitals", "mb_sentiment")],
            "sampler": {"mode": "uniform", "sizes": [2], "subsets_per_size": 2, "seed": 0},
            "docs": {"budget": budget, "seed": 0, "split": "test"}, "eval": {"dtype": "float32", "batch_size": 8},
            "references": {"base": True, "experts": False},
        }},
    }
    (root / f"{name}.yaml").write_text(json.dumps(suite))
    return name


def rows_of(results):
    d = store.sql("SELECT * FROM results", results)
    return d.drop(columns=list(TIMING_COLUMNS)).sort_values(["unit_id", "task", "metric"]).reset_index(drop=True)


def assert_each_unit_once(sweep, results) -> None:
    files = sorted(p.name for p in (Path(results) / "runs").rglob("*.parquet"))
    assert files == sorted(f"part-unit-{j.unit_id}.parquet" for j in sweep.jobs)
    rows = store.sql("SELECT * FROM results", results)
    assert set(rows["unit_id"]) == {j.unit_id for j in sweep.jobs}
    assert not rows.duplicated(["unit_id", "task", "metric"]).any()


@pytest.fixture()
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_local_and_ray_executors_write_the_same_rows(tiny_suites, tmp_path, ray_local):
    name = write_small_suite(tiny_suites, "tiny_ray")
    sweep = plan_sweep(name, {"linear": [{}], "task_arithmetic": [{"lambda": "0.5"}]}, **QUIET)
    local = run_sweep(sweep, tmp_path / "local", progress=False, **QUIET)
    remote = run_sweep(sweep, tmp_path / "ray", executor=RayExecutor(resources=UnitResources(num_cpus=1)),
                       progress=False, **QUIET)
    assert local.done == remote.done == len(sweep.jobs) == 5 and not local.failed and not remote.failed
    a, b = rows_of(tmp_path / "local"), rows_of(tmp_path / "ray")
    assert list(a.columns) == [c for c in store.RESULTS_SCHEMA.names if c not in TIMING_COLUMNS]
    assert a.equals(b), a.compare(b)
    assert_each_unit_once(sweep, tmp_path / "ray")
    # the units really ran in Ray workers (other processes), and say where in their provenance
    prov = store.sql("SELECT extra_json FROM provenance", tmp_path / "ray")["extra_json"].map(json.loads)
    assert len(prov) == 5 and all(p["pid"] != os.getpid() and p["host"] for p in prov)
    again = run_sweep(sweep, tmp_path / "ray", executor=RayExecutor(), progress=False, **QUIET)
    assert (again.cached, again.done) == (5, 0)


def _unit_workers() -> list[int]:
    """Pids of Ray workers executing a sweep unit right now (their process title names the task)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "cmdline").read_bytes().startswith(b"ray::mergebench-unit"):
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


@pytest.mark.slow
def test_killed_worker_and_killed_driver_lose_and_duplicate_nothing(tiny_suites, tmp_path):
    from ray.cluster_utils import Cluster

    name = write_small_suite(tiny_suites, "tiny_faults", budget=20)  # units of a few seconds
    results = tmp_path / "results"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)  # a second raylet: head + worker node on 127.0.0.1
        points = [{"lambda": v} for v in ("0.25", "0.5", "0.75", "1")]
        sweep = plan_sweep(name, {"task_arithmetic": points}, **QUIET)
        killed: list[int] = []

        def kill_a_busy_worker():  # once the sweep is under way: one unit stored, another one running
            deadline = time.time() + 120
            while time.time() < deadline and not killed:
                busy = _unit_workers()
                if busy and store.completed_units(results):
                    os.kill(busy[0], signal.SIGKILL)
                    killed.append(busy[0])
                time.sleep(0.05)

        killer = threading.Thread(target=kill_a_busy_worker)
        killer.start()
        stats = run_sweep(sweep, results, executor=RayExecutor(cluster.address, max_retries=3), progress=False,
                          **QUIET)
        killer.join()
        assert killed, "no busy worker was found to kill"
        assert not stats.failed and stats.done + stats.skipped == len(sweep.jobs) == 9
        assert_each_unit_once(sweep, results)

        # the driver dies mid-sweep (SIGKILL, no clean-up); a second invocation resumes
        more = plan_sweep(name, {"task_arithmetic": points + [{"lambda": v} for v in ("1.25", "1.5", "1.75")]},
                          **QUIET)
        cmd = [sys.executable, "-m", "mergebench.cli", "sweep", "--suite", name, "--methods", "task_arithmetic",
               "--grid", "lambda=0.25,0.5,0.75,1,1.25,1.5,1.75", "--executor", "ray", "--address", cluster.address,
               "--results", str(results), "--no-progress"]
        driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 180
        while len(store.completed_units(results)) < 10 and time.time() < deadline and driver.poll() is None:
            time.sleep(0.1)
        driver.kill()
        driver.wait()
        time.sleep(2)  # the cluster notices the dead driver and stops its tasks
        stored_before = store.completed_units(results)
        assert 10 <= len(stored_before) < len(more.jobs), "the driver was not interrupted mid-sweep"
        resumed = run_sweep(more, results, executor=RayExecutor(cluster.address), progress=False, **QUIET)
        assert resumed.cached >= len(stored_before)  # what the dead driver's workers stored is not recomputed
        assert resumed.cached + resumed.done + resumed.skipped == len(more.jobs) and not resumed.failed
        assert_each_unit_once(more, results)
    finally:
        ray.shutdown()
        cluster.shutdown()
