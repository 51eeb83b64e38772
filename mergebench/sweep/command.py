"""``mergebench sweep``: what the command does once its options are parsed (``cli.py`` stays thin)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from mergebench.results import store
from ..methods import get_method
from .estimate import estimate, measured_rates
from .executors import LocalExecutor, RayExecutor, RayMissingError, SweepError, SweepStats, UnitResources, run_sweep
from .grid import Grid, expand_grid
from .plan import SweepPlan, plan_sweep
from .summary import point_scores
from .tune import TUNING_DIR, plan_tuning, tune

__all__ = ["SweepRequest", "execute", "next_steps"]


@dataclass
class SweepRequest:
    suite: str
    methods: list[str]
    grid: Grid = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)  # fixed settings (each applies where it fits)
    values: dict[str, str] = field(default_factory=dict)  # pool placeholders
    pool: str | None = None
    profile: str | None = None
    seed: int | None = None
    quick: bool = False
    device: str = "cpu"
    results: Path = Path("results")
    executor: str = "local"
    address: str | None = None
    tune: bool = False
    trials: int = 8
    tune_seed: int = 0
    dry_run: bool = False
    resources: UnitResources = field(default_factory=UnitResources)
    max_retries: int = 3
    progress: bool = True


def _executor(req: SweepRequest, log: Callable[[str], None]):
    if req.executor == "local":
        if req.address:
            raise SweepError("--address needs --executor ray")
        return LocalExecutor()
    if req.executor == "ray":
        if importlib.util.find_spec("ray") is None:
            raise RayMissingError("--executor ray needs Ray: pip install 'mergebench[ray]'")
        return RayExecutor(req.address, resources=req.resources, max_retries=req.max_retries, log=log)
    raise SweepError(f"--executor must be local or ray, got {req.executor!r}")


def _points_table(title: str, sweep: SweepPlan, results: Path) -> Table:
    pending = {j.unit_id for j in sweep.pending(results)}
    t = Table(title=title)
    for col in ("method", "setting", "merges", "to do"):
        t.add_column(col)
    for (method, point), plan in zip(sweep.keys, sweep.plans):
        todo = sum(wu.unit.unit_id in pending for wu in plan.merges)
        t.add_row(method, ", ".join(f"{k}={v}" for k, v in point.items()) or "(suite default)", str(len(plan.merges)),
                  str(todo))
    refs = [j for j in sweep.jobs if j.method is None]
    if refs:
        t.add_row("(references)", "base / experts", str(len(refs)), str(sum(j.unit_id in pending for j in refs)))
    return t


def _scores_table(title: str, sweep: SweepPlan, results: Path) -> Table:
    t = Table(title=title)
    for col in ("method", "setting", "subsets", "mean score", "std"):
        t.add_column(col, justify="right" if col in ("subsets", "mean score", "std") else "left")
    for r in point_scores(sweep, results).itertuples():
        t.add_row(r.method, r.setting, f"{r.scored}/{r.units}", "-" if r.mean is None else f"{r.mean:.4f}",
                  "-" if r.std is None else f"{r.std:.4f}")
    return t


def _stats_line(stats: SweepStats, where: Path) -> str:
    return (f"{stats.done} unit(s) run, {stats.cached + stats.skipped} already in {where}, {len(stats.failed)} failed "
            f"({stats.wall_s:.0f} s, run {stats.run_id})")


def next_steps(console: Console, suite: str, results: Path) -> None:
    """Where the rows went and what to run next (how `mergebench eval` and `sweep` end)."""
    where = f" --results {results}"  # every hint runs as printed, whatever the folder
    console.print(
        f"rows stored in {results}/ (Parquet). Next: [bold]mergebench report --suite {suite}{where}[/] "
        f"(rankings), [bold]mergebench compare A B --suite {suite}{where}[/] (two methods paired on "
        f"documents) or [bold]mergebench leaderboard{where}[/] (browse)", highlight=False,
    )


def execute(req: SweepRequest, console: Console, out: Console) -> int:
    """Plan (validating every method and grid point first), then estimate or run; the exit code."""

    def log(m: str) -> None:
        console.print(m, highlight=False, markup=False)

    store.check_results_dir(req.results, writable=not req.dry_run)  # before anything is planned or started
    specs = [get_method(m) for m in req.methods]
    if not specs:
        raise SweepError("--methods names no method")
    points = expand_grid(specs, req.grid)
    kw: dict[str, Any] = dict(pool=req.pool, profile=req.profile, params=req.params, values=req.values, seed=req.seed,
                              quick=req.quick, log=log)
    executor = None if req.dry_run else _executor(req, log)
    n_points = ", ".join(f"{m}: {len(p)}" for m, p in points.items())
    console.print(f"sweep of {', '.join(req.methods)} on suite {req.suite} (grid points per method: {n_points})",
                  highlight=False)
    if req.dry_run:
        return _dry_run(req, points, kw, out)
    # everything is validated and planned before Ray starts; one connection serves both phases of --tune
    if req.tune:
        tp = plan_tuning(req.suite, points, trials=req.trials, tune_seed=req.tune_seed, **kw)
        with executor:
            res = tune(req.suite, points, trials=req.trials, tune_seed=req.tune_seed, results_dir=req.results,
                       executor=executor, device=req.device, progress=req.progress, tuning=tp, **kw)
        console.print(_stats_line(res.validation_stats, req.results / TUNING_DIR), highlight=False)
        for note in res.notes:
            console.print(f"[yellow]note:[/] {note}", highlight=False)
        t = Table(title="tuning (validation split) -> chosen setting")
        for col in ("method", "trials / grid", "validation docs", "chosen", "validation score"):
            t.add_column(col)
        for m, r in res.results.items():
            t.add_row(m, f"{len(r.trials)}/{r.grid_size}", str(r.validation_docs),
                      ", ".join(f"{k}={v}" for k, v in r.best.items()) or "(suite default)", f"{r.best_score:.4f}")
        out.print(t)
        failed = len(res.validation_stats.failed)
        if res.test is not None:
            console.print(_stats_line(res.test_stats, req.results), highlight=False)
            out.print(_scores_table(f"tuned settings on the {res.test.split} split", res.test, req.results))
            failed += len(res.test_stats.failed)
            next_steps(console, req.suite, req.results)
        return 1 if failed or res.test is None else 0
    sweep = plan_sweep(req.suite, points, **kw)
    with executor:
        stats = run_sweep(sweep, req.results, executor=executor, device=req.device, progress=req.progress, log=log)
    console.print(_stats_line(stats, req.results), highlight=False)
    out.print(_scores_table(f"sweep on {sweep.suite}:{sweep.profile.name} ({sweep.split} split)", sweep, req.results))
    next_steps(console, req.suite, req.results)
    return 1 if stats.failed else 0


def _dry_run(req: SweepRequest, points, kw: dict[str, Any], out: Console) -> int:
    kw = {**kw, "materialize": False}
    if req.tune:
        tp = plan_tuning(req.suite, points, trials=req.trials, tune_seed=req.tune_seed, **kw)
        val = tp.validation
        # the test phase runs one setting per method, chosen later: cost it with the first trial
        test = plan_sweep(req.suite, {**{m: pts[:1] for m, pts in val.points.items()}, **tp.untuned}, **kw)
        plans = [(val, req.results / TUNING_DIR), (test, req.results)]
        out.print(_points_table(f"tuning trials on the validation split (grid sizes: {tp.grid_sizes})", val,
                                req.results / TUNING_DIR))
        if tp.untuned:
            out.print(f"not tuned (one setting only): {', '.join(tp.untuned)}")
        out.print(f"then 1 chosen setting per method on the {test.split} split: {len(test.jobs)} unit(s) "
                  "(reused where already stored)")
    else:
        test = plan_sweep(req.suite, points, **kw)
        plans = [(test, req.results)]
        out.print(_points_table(f"sweep on {test.suite}:{test.profile.name} ({test.split} split)", test, req.results))
    rates = measured_rates([req.results, req.results / TUNING_DIR], test.pool.name, req.device)
    out.print(estimate(plans, rates).describe(), highlight=False)
    return 0
