"""`mergebench eval`, `plan` and `sweep`: benchmark units planned, estimated and run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from mergebench.cli.core import UsageError, app, checked_device, console, fail, out, parse_sets, split_list


def _plan(method, suite, pool, profile, set_, seed, quick, *, results: Path, materialize=True):
    """``plan_eval`` after the command line's own checks; ``materialize``: an eval that builds the
    embedded pool if needed and writes to ``results`` (``plan`` only reads it)."""
    from mergebench.evaluation.runner import plan_eval
    from mergebench.results.store import check_results_dir

    values = {}
    params = {}
    for key, value in parse_sets(set_).items():
        # UPPER_CASE keys fill pool placeholders (GLUE_DIR=...); others are method parameters
        (values if key.isupper() else params)[key] = value
    check_results_dir(results, writable=materialize)
    return plan_eval(
        method, suite, pool=pool, profile=profile, params=params, seed=seed, quick=quick, values=values,
        materialize=materialize, log=lambda m: console.print(m, highlight=False),
    )


def _describe_plan(plan) -> None:
    prof = plan.profile
    console.print(
        f"[bold]{plan.method.name}[/] v{plan.method.version} on suite [bold]{plan.suite.id}[/] "
        f"profile [bold]{prof.name}[/], pool [bold]{plan.pool.name}[/] ({len(plan.pool.experts)} experts), "
        f"params {json.dumps(plan.params, default=str)}",
        highlight=False,
    )
    if prof.deviations.strip():  # one paragraph, wrapped to the terminal (the YAML's line breaks are not)
        console.print(f"[yellow]{escape(' '.join(prof.deviations.split()))}[/]", highlight=False)


@app.command("eval")
def eval_cmd(
    method: Annotated[str, typer.Option(help="merge method (see `mergebench methods`)")],
    suite: Annotated[str, typer.Option(help="suite name (see `mergebench suites`)")],
    pool: Annotated[Optional[str], typer.Option(help="pool (default: the profile's; `smol` for embedded profiles)")] = None,
    profile: Annotated[Optional[str], typer.Option(help="suite profile: paper, embedded (default), quick")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="method parameter key=value, or a pool placeholder KEY=value")] = None,
    seed: Annotated[Optional[int], typer.Option(help="sampler / merge seed (default: the suite's)")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    results: Annotated[Path, typer.Option(help="results folder (Parquet store)")] = Path("results"),
    quick: Annotated[bool, typer.Option(help="the CI-sized profile (fewer subsets and documents)")] = False,
    no_progress: Annotated[bool, typer.Option(help="no progress bar")] = False,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for merging and scoring (default: $MERGEBENCH_THREADS, else the physical cores)")] = None,
    scorer: Annotated[str, typer.Option(help="log-likelihood scorer: shared (each shared context once) or hflm (lm-eval's stock HFLM)")] = "shared",
) -> None:
    """Merge every subset of a suite with one method, score it, store the rows, print a summary."""
    from mergebench.evaluation.battery import SCORERS
    from mergebench.evaluation.runner import run_eval, summarize
    from mergebench.threads import resolve_threads

    if scorer not in SCORERS:
        raise UsageError(f"--scorer must be one of {', '.join(SCORERS)}, got {scorer!r}")
    device = checked_device(device)
    n_threads = resolve_threads(threads)
    plan = _plan(method, suite, pool, profile, set_, seed, quick, results=results)
    _describe_plan(plan)
    stats = run_eval(plan, results, device=device, progress=not no_progress, threads=n_threads, scorer=scorer,
                     log=lambda m: console.print(m, highlight=False, soft_wrap=True))
    console.print(f"{stats['done']} unit(s) evaluated, {stats['cached']} reused from {results} (run {stats['run_id']})")
    table, loss = summarize(plan, results)
    _print_summary(plan, table, loss)
    from mergebench.sweep.command import next_steps

    next_steps(console, plan.suite.name, results)


def _print_summary(plan, table, loss) -> None:
    t = Table(title=f"{plan.method.name} on {plan.suite.id}:{plan.profile.name} ({plan.pool.name})")
    for col in ("n", "subsets", "score (mean ± std)", "P(> base)", "gain vs base (pp)", "P(> best expert)", "gain vs best expert (pp)"):
        t.add_column(col, justify="right")
    for _, r in table.iterrows():
        std = "" if r["std"] != r["std"] else f" ± {r['std']:.4f}"
        t.add_row(
            str(int(r["n"])), str(int(r["n_units"])), f"{r['mean']:.4f}{std}", f"{r['p_gt_base']:.0%}",
            f"{r['gain_vs_base_pp']:+.2f}", f"{r['p_gt_best_expert']:.0%}", f"{r['gain_vs_best_expert_pp']:+.2f}",
        )
    out.print(t)
    if len(loss):
        lt = Table(title="merging loss (merging-collapse study, eq. 1), % relative to each task's own expert")
        for col in ("n", "merges", "mean loss %", "std"):
            lt.add_column(col, justify="right")
        for n, g in loss.groupby("n"):
            lt.add_row(str(int(n)), str(len(g)), f"{g['merging_loss_pct'].mean():+.2f}", f"{g['merging_loss_pct'].std(ddof=0):.2f}")
        out.print(lt)


@app.command("plan")
def plan_cmd(
    suite: Annotated[str, typer.Option(help="suite name")],
    method: Annotated[Optional[str], typer.Option(help="merge method (one `mergebench eval`)")] = None,
    methods: Annotated[Optional[str], typer.Option(help="comma-separated methods: plan a `mergebench sweep` instead")] = None,
    grid: Annotated[Optional[list[str]], typer.Option("--grid", help="with --methods: key=v1,v2,... (repeatable)")] = None,
    pool: Annotated[Optional[str], typer.Option(help="pool")] = None,
    profile: Annotated[Optional[str], typer.Option(help="suite profile")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="method parameter or pool placeholder")] = None,
    seed: Annotated[Optional[int], typer.Option(help="sampler seed")] = None,
    device: Annotated[str, typer.Option(help="the device the run would use: cpu or cuda (checked here)")] = "cpu",
    results: Annotated[Path, typer.Option(help="results folder")] = Path("results"),
    quick: Annotated[bool, typer.Option(help="the CI-sized profile")] = False,
) -> None:
    """Show what `mergebench eval` (or, with --methods, `mergebench sweep`) would merge and evaluate,
    what is cached, what is missing, and the estimated cost."""
    from mergebench.config.pools import MissingModelsError

    if methods is not None or grid:
        if method is not None:
            fail("give --method (one eval) or --methods (a sweep), not both")
        if methods is None:
            fail("--grid plans a sweep: give --methods too")
        sweep_cmd(suite=suite, methods=methods, grid=grid, set_=set_, pool=pool, profile=profile, seed=seed,
                  device=device, results=results, quick=quick, dry_run=True)
        return
    if method is None:
        fail("give --method NAME (or --methods a,b,c for a sweep)")
    checked_device(device)
    try:
        plan = _plan(method, suite, pool, profile, set_, seed, quick, results=results, materialize=False)
    except MissingModelsError as exc:  # listed one per line on stdout; the first line says how to get them
        console.print(f"[bold red]missing models[/] ({len(exc.missing)}):", highlight=False)
        for m in exc.missing:
            out.print(f"  {m}")
        console.print(str(exc).splitlines()[0].rstrip(":"), highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    _describe_plan(plan)
    pending = {u.unit.unit_id for u in plan.pending(results)}
    t = Table(title="units of work")
    for col in ("role", "subset", "tasks", "docs", "status"):
        t.add_column(col)
    for u in plan.units:
        n_docs = plan.n_docs(u.tasks)
        t.add_row(u.role, ", ".join(u.members), str(len(u.tasks)), str(n_docs), "to do" if u.unit.unit_id in pending else "cached")
    out.print(t)
    todo = [u for u in plan.units if u.unit.unit_id in pending]
    n_docs = sum(plan.n_docs(u.tasks) for u in todo)
    merges = sum(u.role == "merged" for u in todo)
    from mergebench.evaluation.pace import Pace, format_duration, measured_rates
    from mergebench.evaluation.per_task import calibration_cost_line, unit_calibration
    from mergebench.evaluation.runner import expected_seconds, merged_models, untimed_calibration_seconds
    from mergebench.threads import resolve_threads

    rates = measured_rates([results], plan.pool.name, device, threads=resolve_threads(None))
    pace = Pace(rates)
    merged = [u for u in todo if u.role == "merged"]
    # data-dependent: the pending merges' calibration texts, read once for the estimate and the cost line
    data = ([unit_calibration(plan.profile, plan.pool, plan.method, merged_models(plan, u), u.unit.params) for u in merged]
            if plan.method.calibration is not None else [])
    cal_s = untimed_calibration_seconds(plan, todo, pace, data) if data else 0.0
    seconds = expected_seconds(plan, todo, pace, calibration_s=cal_s)
    merge_s = sum(pace.merge_seconds(u.unit.method, len(u.members)) for u in merged)
    console.print(
        f"{len(todo)} of {len(plan.units)} unit(s) to run: {merges} merge(s), {n_docs} documents; estimate "
        f"~{format_duration(seconds)} ({rates.seconds_per_doc:.3g} s/document, {merge_s:.0f} s of merges, "
        f"{rates.seconds_per_unit:.3g} s/unit besides; {rates.basis}).",
        highlight=False,
    )
    if data:  # data-dependent: what calibrating the pending merges reads
        line = calibration_cost_line(plan.method, [(u.unit.params, [len(g) for g in d.groups]) for u, d in zip(merged, data)])
        if line:
            console.print(line, highlight=False)
        if cal_s:
            console.print(f"No stored {plan.method.name} unit has timed its calibration yet: the estimate includes "
                          f"~{format_duration(cal_s)} of it at assumed rates (mergebench.evaluation.pace).", highlight=False)


@app.command("sweep")
def sweep_cmd(
    suite: Annotated[str, typer.Option(help="suite name (see `mergebench suites`)")],
    methods: Annotated[str, typer.Option(help="comma-separated merge methods")],
    grid: Annotated[Optional[list[str]], typer.Option("--grid", help="key=v1,v2,... (repeatable); a key applies to the methods that have that parameter")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="fixed method parameter key=value (where it fits), or a pool placeholder KEY=value")] = None,
    pool: Annotated[Optional[str], typer.Option(help="pool (default: the profile's)")] = None,
    profile: Annotated[Optional[str], typer.Option(help="suite profile")] = None,
    seed: Annotated[Optional[int], typer.Option(help="sampler / merge seed (default: the suite's)")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    results: Annotated[Path, typer.Option(help="results folder (Parquet store; shared by every Ray node)")] = Path("results"),
    quick: Annotated[bool, typer.Option(help="the CI-sized profile")] = False,
    executor: Annotated[str, typer.Option(help="local (this process) or ray")] = "local",
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address (default: a Ray instance on this machine)")] = None,
    tune: Annotated[bool, typer.Option(help="choose each method's setting on the validation split, then score it on test")] = False,
    trials: Annotated[int, typer.Option(help="--tune: grid points tried per method (a seeded subset when the grid is larger)")] = 8,
    tune_seed: Annotated[int, typer.Option(help="--tune: seed of the trial subset")] = 0,
    dry_run: Annotated[bool, typer.Option(help="show the units and a cost estimate; run nothing")] = False,
    cpus_per_unit: Annotated[float, typer.Option(help="Ray: CPUs one unit reserves")] = 1.0,
    gpus_per_unit: Annotated[Optional[float], typer.Option(help="Ray: GPUs one unit reserves (default: 1 with --device cuda, else 0)")] = None,
    memory_per_unit: Annotated[Optional[float], typer.Option(help="Ray: GiB one unit reserves (default: estimated from the pool)")] = None,
    max_retries: Annotated[int, typer.Option(help="Ray: retries of a unit whose worker or node died")] = 3,
    no_progress: Annotated[bool, typer.Option(help="no progress bar")] = False,
    workers: Annotated[int, typer.Option(help="units run at once on this machine, each with its share of the cores (> 1 runs a local Ray instance)")] = 1,
) -> None:
    """Run methods x hyperparameter grid x the suite's subsets (locally or on Ray); resumable."""
    from mergebench.sweep.command import SweepRequest, execute
    from mergebench.sweep.executors import UnitResources
    from mergebench.sweep.grid import parse_grid
    from mergebench.threads import available_cores

    if workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    if workers > 1:  # N units at once, each taking cores / N threads (never N processes x all cores)
        if executor == "local" and address:
            raise UsageError("--address needs --executor ray")
        executor = "ray"
        cpus_per_unit = max(1, available_cores() // workers)
    sets = parse_sets(set_)
    if executor == "local":  # Ray nodes may have devices this machine lacks
        device = checked_device(device)
    req = SweepRequest(
        suite=suite, methods=split_list(methods), grid=parse_grid(grid),
        params={k: v for k, v in sets.items() if not k.isupper()}, values={k: v for k, v in sets.items() if k.isupper()},
        pool=pool, profile=profile, seed=seed, quick=quick, device=device, results=results, executor=executor,
        address=address, tune=tune, trials=trials, tune_seed=tune_seed, dry_run=dry_run, max_retries=max_retries,
        resources=UnitResources(cpus_per_unit, (1.0 if device.startswith("cuda") else 0.0) if gpus_per_unit is None
                                else gpus_per_unit, None if memory_per_unit is None else int(memory_per_unit * 2**30)),
        progress=not no_progress,
    )
    raise typer.Exit(execute(req, console, out))
