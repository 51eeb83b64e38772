"""`mergebench sweep` on tiny random checkpoints and real embedded task data: grid expansion and
validation, planning (shared references, deduplicated points, the same units as `eval`), the
idempotent unit of work, resume after an interrupted driver, per-node model resolution, CLI."""

from __future__ import annotations

import dataclasses
import json
import threading

import pytest
from typer.testing import CliRunner

from mergebench.results import store
from mergebench.methods import ParameterError, get_method
from mergebench.sweep import executors, unit
from mergebench.sweep.executors import run_sweep
from mergebench.sweep.grid import expand_grid, parse_grid, trial_points
from mergebench.sweep.plan import plan_sweep

QUIET = dict(log=lambda m: None)


def write_small_suite(root, name="tiny_small", budget=3):
    """Two merges of two experts, two tasks, the base as the only reference: 1 + 2 units per point."""
    suite = {
        "name": name, "version": 1, "default_profile": "embedded",
        "methods": {"ties": {"params": {"density": 0.5}, "source": "test"}},
        "profiles": {"embedded": {
            "pools": ["tiny"], "tasks": [{"name": t, "metric": "acc"} for t in ("mb_capitals", "mb_sentiment")],
            "sampler": {"mode": "uniform", "sizes": [2], "subsets_per_size": 2, "seed": 0},
            "docs": {"budget": budget, "seed": 0, "split": "test"}, "eval": {"dtype": "float32", "batch_size": 8},
            "references": {"base": True, "experts": False},
        }},
    }
    (root / f"{name}.yaml").write_text(json.dumps(suite))
    return name


@pytest.fixture()
def small(tiny_suites):
    return write_small_suite(tiny_suites)


def stored(results):
    return store.sql("SELECT * FROM results", results)


# --------------------------------------------------------------------------------- grid


def test_grid_parsing():
    assert parse_grid(["lambda=0.5, 1.0", "t_attention=[0,1],[1,0]"]) == {
        "lambda": ["0.5", "1.0"], "t_attention": ["[0,1]", "[1,0]"]}
    for bad, match in [("lambda", "key=v1"), ("=1", "key=v1"), ("lambda=0.5,,1", "empty value"),
                       ("GLUE_DIR=/x", "--set"), ("lambda=1,1", "twice")]:
        with pytest.raises(ParameterError, match=match):
            parse_grid([bad])
    with pytest.raises(ParameterError, match="given twice"):
        parse_grid(["lambda=1", "lambda=2"])


def test_a_grid_key_applies_only_to_methods_that_have_it():
    specs = [get_method(m) for m in ("linear", "ties", "task_arithmetic")]
    pts = expand_grid(specs, {"lambda": ["0.5", "1"], "density": ["0.2", "0.4"]})
    assert pts["linear"] == [{}]
    assert pts["task_arithmetic"] == [{"lambda": "0.5"}, {"lambda": "1"}]
    assert pts["ties"] == [{"lambda": "0.5", "density": "0.2"}, {"lambda": "0.5", "density": "0.4"},
                           {"lambda": "1", "density": "0.2"}, {"lambda": "1", "density": "0.4"}]
    with pytest.raises(ParameterError, match=r"'lamda' fit none of the methods linear, ties") as exc:
        expand_grid(specs[:2], {"lamda": ["1"], "density": ["0.5"]})
    assert "ties: density, lambda" in str(exc.value)  # says which parameters exist


def test_trial_subset_is_seeded_deterministic_and_in_grid_order():
    points = [{"lambda": str(i / 10)} for i in range(10)]
    a = trial_points(points, 4, method="ties", seed=0)
    assert len(a) == 4 and a == trial_points(points, 4, method="ties", seed=0)
    assert [points.index(p) for p in a] == sorted(points.index(p) for p in a)
    assert len({json.dumps(trial_points(points, 4, method="ties", seed=s)) for s in range(6)}) > 1
    assert trial_points(points, 10, method="ties") == points == trial_points(points, 50, method="ties")
    with pytest.raises(ParameterError, match="--trials"):
        trial_points(points, 0, method="ties")


# ------------------------------------------------------------------------------ planning


def test_every_grid_point_is_validated_before_any_work(small, monkeypatch):
    from mergebench.sweep import plan as plan_mod

    def no_planning(*a, **kw):
        raise AssertionError("planned (and maybe materialized) before every point was validated")

    monkeypatch.setattr(plan_mod, "plan_eval", no_planning)
    points = {"linear": [{}], "ties": [{"density": "0.5"}, {"density": "3"}]}
    with pytest.raises(ParameterError, match=r"method 'ties': parameter 'density' must be in .*3.*grid point density=3"):
        plan_sweep(small, points, **QUIET)
    with pytest.raises(ParameterError, match="'lambda' is a parameter of none"):
        plan_sweep(small, {"linear": [{}]}, params={"lambda": "1"}, **QUIET)


def test_plan_shares_references_dedups_points_and_equals_eval_units(small):
    from mergebench.evaluation.runner import plan_eval

    points = {"linear": [{}], "ties": [{"lambda": "0.5"}, {"lambda": "0.50"}, {"lambda": "1"}]}
    sweep = plan_sweep(small, points, **QUIET)
    assert sweep.points["ties"] == [{"lambda": "0.5"}, {"lambda": "1"}]  # 0.5 == 0.50: one unit of work
    assert [j.method for j in sweep.jobs] == [None, "linear", "linear", "ties", "ties", "ties", "ties"]
    assert len({j.unit_id for j in sweep.jobs}) == len(sweep.jobs)
    # the same content hash as `mergebench eval` with those settings: a sweep reuses eval rows and vice versa
    ev = plan_eval("ties", small, params={"lambda": "1"}, **QUIET)
    assert [u.unit.unit_id for u in ev.merges] == [j.unit_id for j in sweep.jobs if j.point == {"lambda": "1"}]
    assert ev.references[0].unit.unit_id == sweep.jobs[0].unit_id
    assert sweep.jobs[3].provenance["sweep"] == {"split": "test", "grid_point": {"lambda": "0.5"}}
    # the suite's setting (density 0.5, per expert) holds where the grid does not override it
    assert all(j.unit.unit.params["density"] == (0.5, 0.5) for j in sweep.jobs if j.method == "ties")


def test_validation_split_units_differ_from_test_units(small):
    test = plan_sweep(small, {"linear": [{}]}, **QUIET)
    val = plan_sweep(small, {"linear": [{}]}, split="validation", references=False, **QUIET)
    assert val.split == "validation" and [j.method for j in val.jobs] == ["linear", "linear"]
    assert {j.unit_id for j in val.jobs}.isdisjoint(j.unit_id for j in test.jobs)
    assert val.plans[0].samples != test.plans[0].samples  # documents drawn for the split
    assert all(j.unit.unit.extra["split"] == "validation" for j in val.jobs)


# ------------------------------------------------------------------------- the unit of work


def test_a_retried_or_duplicated_unit_is_stored_once(small, tmp_path, monkeypatch):
    sweep = plan_sweep(small, {"linear": [{}]}, **QUIET)
    job = sweep.jobs[1]
    args = (sweep.plans[job.plan_index], job.unit, job.provenance)
    first = unit.run_job(*args, results_dir=str(tmp_path), run_id="run-a")
    assert first.status == "done"
    # a retry after the first attempt stored its rows (worker died before reporting): nothing to do
    assert unit.run_job(*args, results_dir=str(tmp_path), run_id="run-b").status == "skipped"
    # a duplicate that raced past the "already stored?" check computes, but cannot store twice
    monkeypatch.setattr(store, "has_unit", lambda *a, **k: False)
    assert unit.run_job(*args, results_dir=str(tmp_path), run_id="run-c").status == "skipped"
    files = list((tmp_path / "runs").rglob("*.parquet"))
    assert [f.name for f in files] == [f"part-unit-{job.unit_id}.parquet"]
    rows = stored(tmp_path)
    assert set(rows["run_id"]) == {"run-a"} and not rows.duplicated(["unit_id", "task", "metric"]).any()


def test_racing_exclusive_writers_never_leave_two_files(tmp_path):
    u = store.Unit(suite="s", role="merged", subset=("a", "b"), method="linear", params={"x": 1})
    rows = [{"task": "t", "metric": "acc", "value": 0.5}]
    part = tmp_path / "runs" / "suite=s" / "method=linear"
    start, stop, seen, results = threading.Barrier(9), threading.Event(), [], []

    def writer(i):
        start.wait()
        results.append(store.write_unit(u, rows, run_id=f"run-{i}", results_dir=tmp_path, exclusive=True))

    def reader():
        start.wait()
        while not stop.is_set():
            seen.append(len(list(part.glob("*.parquet"))) if part.is_dir() else 0)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    watch = threading.Thread(target=reader)
    for t in [*threads, watch]:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watch.join()
    assert sum(r.written for r in results) == 1 and max(seen) <= 1
    assert len(list(part.glob("*.parquet"))) == 1 and len(stored(tmp_path)) == 1


def test_node_plan_resolves_models_where_the_driver_paths_do_not_exist(small, tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEBENCH_CACHE", str(tmp_path / "cache"))  # the node lock lives there
    plan = plan_sweep(small, {"linear": [{}]}, **QUIET).plans[0]
    elsewhere = dataclasses.replace(plan, paths={n: f"/not/on/this/node/{n}" for n in plan.paths}, task_manager=None)
    local = unit.node_plan(elsewhere)
    assert local.paths == {n: str(p) for n, p in plan.paths.items()} and local.task_manager is not None
    forged = dataclasses.replace(elsewhere, identities={**plan.identities, "e0": "something-else"})
    with pytest.raises(RuntimeError, match="e0 of pool 'tiny' differ from the driver's"):
        unit.node_plan(forged)


# ----------------------------------------------------------------------- running and resuming


def test_interrupted_driver_resumes_without_recomputing_or_duplicating(small, tmp_path, monkeypatch):
    sweep = plan_sweep(small, {"linear": [{}], "task_arithmetic": [{"lambda": "0.5"}, {"lambda": "1"}]}, **QUIET)
    assert len(sweep.jobs) == 7
    real, calls = executors.run_job, []

    def interrupted_after_three(*a, **kw):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(a[1].unit.unit_id)
        return real(*a, **kw)

    monkeypatch.setattr(executors, "run_job", interrupted_after_three)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, tmp_path, progress=False, **QUIET)
    assert store.completed_units(tmp_path) == set(calls)
    monkeypatch.setattr(executors, "run_job", real)
    stats = run_sweep(sweep, tmp_path, progress=False, **QUIET)
    assert (stats.cached, stats.done, stats.failed) == (3, 4, {})
    rows = stored(tmp_path)
    assert set(rows["unit_id"]) == {j.unit_id for j in sweep.jobs}
    assert not rows.duplicated(["unit_id", "task", "metric"]).any()
    assert set(rows.loc[rows.role == "merged", "method"]) == {"linear", "task_arithmetic"}
    assert set(rows.loc[rows.method == "task_arithmetic", "params_json"].map(lambda s: json.loads(s)["lambda"])) == {
        0.5, 1.0}


def test_a_failing_unit_is_reported_and_the_others_go_on(small, tmp_path, monkeypatch):
    from mergebench.evaluation import runner

    sweep = plan_sweep(small, {"linear": [{}]}, **QUIET)
    bad = sweep.jobs[1].unit_id
    real = runner.run_unit

    def broken(plan, wu, **kw):
        if wu.unit.unit_id == bad:
            raise RuntimeError("out of memory (simulated)")
        return real(plan, wu, **kw)

    monkeypatch.setattr(runner, "run_unit", broken)
    stats = run_sweep(sweep, tmp_path, progress=False, **QUIET)
    assert stats.failed == {bad: "RuntimeError: out of memory (simulated)"} and stats.done == 2
    assert bad not in store.completed_units(tmp_path)


# ----------------------------------------------------------------------------------- CLI


def test_cli_sweep_dry_run_estimate_and_errors(small, tmp_path):
    from mergebench.cli import app

    results = tmp_path / "results"
    base = ["sweep", "--suite", small, "--methods", "linear,task_arithmetic", "--results", str(results)]
    run = CliRunner().invoke
    bad = run(app, [*base, "--grid", "lamda=0.5"])
    assert bad.exit_code == 2 and "'lamda' fit none of the methods" in bad.output
    bad = run(app, [*base, "--grid", "normalize=true,maybe", "--executor", "ray", "--address", "x"])
    assert bad.exit_code == 2 and "parameter 'normalize' must be of type bool" in bad.output
    bad = run(app, [*base, "--address", "127.0.0.1:6379"])
    assert bad.exit_code == 2 and "--address needs --executor ray" in bad.output
    dry = run(app, [*base, "--grid", "lambda=0.5,1", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "7 of 7 unit(s) to run (6 merge(s), 1 reference(s), 42 documents)" in " ".join(dry.output.split())
    assert "assumed" in dry.output and not results.exists()  # nothing ran, nothing written
    done = run(app, [*base, "--grid", "lambda=0.5", "--no-progress"])
    assert done.exit_code == 0, done.output
    assert "5 unit(s) run" in done.output and "lambda=0.5" in done.output
    dry = " ".join(run(app, [*base, "--grid", "lambda=0.5,1", "--dry-run"]).output.split())
    assert "2 of 7 unit(s) to run (2 merge(s), 0 reference(s), 12 documents)" in dry
    # `mergebench plan` prints the same estimate for a sweep before it starts
    planned = run(app, ["plan", "--suite", small, "--methods", "linear,task_arithmetic", "--grid", "lambda=0.5,1",
                        "--results", str(results)])
    assert planned.exit_code == 0 and " ".join(planned.output.split()).count("2 of 7 unit(s) to run") == 1
    both = run(app, ["plan", "--suite", small, "--method", "linear", "--methods", "linear,ties"])
    assert both.exit_code == 2 and "not both" in both.output
    assert "measured from 5 stored unit(s) of pool 'tiny' on this CPU" in dry and "shared scorer" in dry


def test_workers_share_the_cores_instead_of_each_taking_all(monkeypatch):
    """--workers N runs N units at once (a local Ray instance), each reserving cores // N CPUs,
    which is also its torch thread count (run_job's ``threads``)."""
    from typer.testing import CliRunner

    import mergebench.sweep.command as command
    from mergebench.cli import app
    from mergebench.threads import available_cores

    seen = {}
    monkeypatch.setattr(command, "execute", lambda req, console, out: seen.setdefault("req", req) and 0)
    res = CliRunner().invoke(app, ["sweep", "--suite", "inthewild", "--methods", "linear", "--workers", "2"])
    assert res.exit_code == 0, res.output
    req = seen["req"]
    assert req.executor == "ray" and req.resources.num_cpus == max(1, available_cores() // 2)
    bad = CliRunner().invoke(app, ["sweep", "--suite", "inthewild", "--methods", "linear", "--workers", "0"])
    assert bad.exit_code == 2 and "--workers must be at least 1" in bad.output and "Traceback" not in bad.output
