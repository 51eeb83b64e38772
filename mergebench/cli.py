"""`mergebench` command line: thin wrappers that parse, call the library and print."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from .errors import MergebenchError

DEBUG_ENV = "MERGEBENCH_DEBUG"

_USER_INPUT_MODELS = ("MergeRequest",)  # pydantic models built from command-line flags


def _user_error_message(exc: BaseException) -> str | None:
    """The one-line report of an error the user caused, or None for a bug."""
    from pydantic import ValidationError

    if isinstance(exc, MergebenchError):
        msg = exc.args[0] if isinstance(exc, KeyError) and len(exc.args) == 1 else str(exc)
    elif isinstance(exc, ValidationError) and exc.title in _USER_INPUT_MODELS:
        from .pools import validation_summary

        msg = validation_summary(exc)
    else:
        return None
    notes = getattr(exc, "__notes__", None)  # e.g. which tensor a merge was on
    return (str(msg) or type(exc).__name__) + (f" ({'; '.join(notes)})" if notes else "")


class _Commands(TyperGroup):
    """The command group: a :class:`MergebenchError` raised by any command (zoo's too) is printed
    as ``error: ...`` and exits with code 2 (or the error's ``exit_code``); any other exception is
    a bug and surfaces with its traceback. ``mergebench --debug`` (or MERGEBENCH_DEBUG=1) shows
    the traceback of a MergebenchError too."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Exception as exc:
            msg = _user_error_message(exc)
            if msg is None or ctx.params.get("debug") or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                raise
            console.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)
            raise typer.Exit(getattr(exc, "exit_code", 2)) from None


app = typer.Typer(
    cls=_Commands,
    add_completion=False,
    no_args_is_help=True,
    help="mergebench: merge LLM weights with pluggable methods and score them on standard suites.",
    pretty_exceptions_enable=False,
)
# In a terminal rich uses its width; into a log or CI (no terminal: rich would assume 80 columns and
# fold every table and progress line) 120 columns, unless $COLUMNS says otherwise.
_LOG_WIDTH = None if os.environ.get("COLUMNS") else 120
console = Console(stderr=True, width=None if sys.stderr.isatty() else _LOG_WIDTH)
out = Console(width=None if sys.stdout.isatty() else _LOG_WIDTH)


@app.callback()
def _offline(
    debug: Annotated[bool, typer.Option("--debug", help=f"show the traceback of every error (or set {DEBUG_ENV}=1)")] = False,
) -> None:
    """mergebench never downloads: hub models and datasets come from the local caches only, and
    a cache miss fails at once instead of retrying against an unreachable hub. (``--debug`` is
    read by the command group, :class:`_Commands`.)"""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


class UsageError(MergebenchError):
    """A user mistake on the command line, reported as one line (exit code 2 unless given)."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def _fail(msg: str, code: int = 2) -> NoReturn:
    raise UsageError(msg, code)


def parse_sets(items: list[str] | None) -> dict[str, str]:
    """``["k=v", ...]`` -> dict; values stay strings (the method's Param coerces them)."""
    params: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set expects key=value, got {item!r}")
        params[key.strip()] = value.strip()
    return params


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def _check_output(option: str, path: Path | None, *, folder: bool = False) -> None:
    """``option``'s ``path`` can be written as a file (or, with ``folder``, a folder): it is not the
    other kind of thing and lies under no file (it need not exist yet); else a one-line error."""
    if path is None:
        return
    if path.exists() and path.is_dir() != folder:
        _fail(f"{option} {path} is a {'file' if folder else 'folder'}, not a {'folder' if folder else 'file'}")
    from .paths import file_above

    if (anc := file_above(path)) is not None:
        _fail(f"{option} {path} lies under {anc}, which is a file, not a folder")


def _short(text: str, width: int = 70) -> str:
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


@app.command("methods")
def methods_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    name: Annotated[Optional[str], typer.Argument(help="show one method in detail")] = None,
) -> None:
    """List every registered merge method with its parameters, defaults and citation."""
    from .methods import get_method, list_methods

    specs = [get_method(name)] if name else list_methods()
    if as_json:
        out.print_json(json.dumps([s.describe() for s in specs]))
        return
    table = Table(title="mergebench merge methods", show_lines=True)
    for col in ("method", "inputs", "parameters (default, range)", "citation"):
        table.add_column(col, overflow="fold")
    for s in specs:
        c = s.contract
        n = f"{c.min_experts}" + (f"-{c.max_experts}" if c.max_experts != c.min_experts else "") if c.max_experts else f"≥{c.min_experts}"
        inputs = f"base: {c.base}\nexperts: {n}\n{s.granularity}" + ("\nstochastic" if s.stochastic else "")
        params = "\n".join(
            f"{p.name}={p.default!r}" + (f"  {p.describe_range()}" if p.describe_range() else "") for p in s.params
        )
        info = s.paper_info()
        cite = f"{info['cite']}" if info else _short(s.citation)
        table.add_row(f"[bold]{s.name}[/] v{s.version}\n{s.summary}", inputs, params or "-", s.citation if name else cite)
    out.print(table)
    if name:  # the paper, unwrapped (a folded URL cannot be copied)
        for line in _method_reference(specs[0]):
            out.print(line, markup=False, highlight=False, soft_wrap=True)


def _method_reference(spec) -> list[str]:
    """Title, authors, year, venue and URL of a method's paper (and the papers it also follows)."""
    d = spec.describe()
    lines = []
    if d["paper"]:
        p = d["paper"]
        lines += [f"paper: {p['title']}", f"authors: {', '.join(p['authors'])}",
                  f"year: {p['year'] or 'not stated'}" + (f"; {p['venue']}" if p["venue"] else "")]
    if d["url"]:
        lines.append(f"url: {d['url']}")
    lines += [f"also: {r['cite']}" + (f"  {r['url']}" if r["url"] else "") for r in d["related_papers"]]
    return lines


@app.command("merge")
def merge_cmd(
    config: Annotated[Optional[Path], typer.Argument(help="mergekit-style YAML (merge_method, base_model, models, parameters, dtype)")] = None,
    method: Annotated[Optional[str], typer.Option(help="merge method (see `mergebench methods`)")] = None,
    base: Annotated[Optional[str], typer.Option(help="base model folder or hub id (local cache)")] = None,
    experts: Annotated[Optional[str], typer.Option(help="comma-separated expert folders or hub ids")] = None,
    weights: Annotated[Optional[str], typer.Option(help="comma-separated per-expert weights")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="method parameter key=value (repeatable)")] = None,
    aux: Annotated[Optional[list[str]], typer.Option(help="auxiliary per-expert inputs, e.g. fisher=P1,P2 (repeatable)")] = None,
    seed: Annotated[int, typer.Option(help="seed for stochastic methods")] = 0,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    dtype: Annotated[str, typer.Option(help="compute dtype: float32, bfloat16, float16, float64")] = "float32",
    out_dtype: Annotated[Optional[str], typer.Option(help="dtype of the written weights (default: the base's)")] = None,
    vocab_policy: Annotated[str, typer.Option(help="vocabulary-size mismatch: error, truncate, base")] = "error",
    allow_pickle: Annotated[bool, typer.Option(help="allow loading pickle .bin checkpoints (unsafe)")] = False,
    allow_nonfinite: Annotated[
        bool, typer.Option(help="merge NaN/inf input values as they are instead of stopping at the first one")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output folder")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
    out_dir: Annotated[Path, typer.Option("--out", help="output folder (written atomically)")] = ...,
) -> None:
    """Merge checkpoints with one method and write a Hugging Face folder."""
    from .engine import merge
    from .request import MergeRequest

    if config is not None:
        from .mergekit_config import load_mergekit_yaml

        if method or experts or base:
            raise UsageError("give either a CONFIG.yaml or --method/--base/--experts, not both")
        request = load_mergekit_yaml(config)
        overrides = {"seed": seed, "device": device, "allow_nonfinite": allow_nonfinite}
        if set_:
            overrides["params"] = {**request.params, **parse_sets(set_)}
        request = request.model_copy(update=overrides)
    else:
        if not method or not experts:
            raise UsageError("--method and --experts are required (or pass a CONFIG.yaml)")
        aux_map = {}
        for item in aux or []:
            key, sep, paths = item.partition("=")
            if not sep:
                raise UsageError(f"--aux expects name=P1,P2,..., got {item!r}")
            aux_map[key.strip()] = _split(paths)
        try:
            w = [float(x) for x in _split(weights)] or None
        except ValueError:
            raise UsageError(f"--weights must be comma-separated numbers, got {weights!r}") from None
        request = MergeRequest(
            method=method, base=base, experts=_split(experts), weights=w, params=parse_sets(set_), aux=aux_map,
            seed=seed, device=device, dtype=dtype, out_dtype=out_dtype, vocab_policy=vocab_policy,
            allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite,
        )
    result = merge(request, out_dir, progress=not quiet, overwrite=overwrite)
    console.print(f"[green]merged[/] {request.method} of {len(request.experts)} experts -> {out_dir}  ({result.summary()})")


def _checked_device(device: str) -> str:
    """``--device`` as torch spells it, if this machine has it (else a one-line DeviceError)."""
    from .engine import resolve_device

    return str(resolve_device(device))


def _plan(method, suite, pool, profile, set_, seed, quick, *, results: Path, materialize=True):
    """``plan_eval`` after the command line's own checks; ``materialize``: an eval that builds the
    embedded pool if needed and writes to ``results`` (``plan`` only reads it)."""
    from .runner import plan_eval
    from .store import check_results_dir

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
    from .evaluate import SCORERS
    from .runner import run_eval, summarize
    from .threads import resolve_threads

    if scorer not in SCORERS:
        raise UsageError(f"--scorer must be one of {', '.join(SCORERS)}, got {scorer!r}")
    device = _checked_device(device)
    n_threads = resolve_threads(threads)
    plan = _plan(method, suite, pool, profile, set_, seed, quick, results=results)
    _describe_plan(plan)
    stats = run_eval(plan, results, device=device, progress=not no_progress, threads=n_threads, scorer=scorer,
                     log=lambda m: console.print(m, highlight=False, soft_wrap=True))
    console.print(f"{stats['done']} unit(s) evaluated, {stats['cached']} reused from {results} (run {stats['run_id']})")
    table, loss = summarize(plan, results)
    _print_summary(plan, table, loss)
    from .sweep.command import next_steps

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
    from .pools import MissingModelsError

    if methods is not None or grid:
        if method is not None:
            _fail("give --method (one eval) or --methods (a sweep), not both")
        if methods is None:
            _fail("--grid plans a sweep: give --methods too")
        sweep_cmd(suite=suite, methods=methods, grid=grid, set_=set_, pool=pool, profile=profile, seed=seed,
                  device=device, results=results, quick=quick, dry_run=True)
        return
    if method is None:
        _fail("give --method NAME (or --methods a,b,c for a sweep)")
    _checked_device(device)
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
    from .pace import Pace, format_duration, measured_rates
    from .runner import expected_seconds
    from .threads import resolve_threads

    rates = measured_rates([results], plan.pool.name, device, threads=resolve_threads(None))
    pace = Pace(rates)
    seconds = expected_seconds(plan, todo, pace)
    merge_s = sum(pace.merge_seconds(u.unit.method, len(u.members)) for u in todo if u.role == "merged")
    console.print(
        f"{len(todo)} of {len(plan.units)} unit(s) to run: {merges} merge(s), {n_docs} documents; estimate "
        f"~{format_duration(seconds)} ({rates.seconds_per_doc:.3g} s/document, {merge_s:.0f} s of merges, "
        f"{rates.seconds_per_unit:.3g} s/unit besides; {rates.basis}).",
        highlight=False,
    )


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
    from .sweep.command import SweepRequest, execute
    from .sweep.executors import UnitResources
    from .sweep.grid import parse_grid
    from .threads import available_cores

    if workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    if workers > 1:  # N units at once, each taking cores / N threads (never N processes x all cores)
        if executor == "local" and address:
            raise UsageError("--address needs --executor ray")
        executor = "ray"
        cpus_per_unit = max(1, available_cores() // workers)
    sets = parse_sets(set_)
    if executor == "local":  # Ray nodes may have devices this machine lacks
        device = _checked_device(device)
    req = SweepRequest(
        suite=suite, methods=_split(methods), grid=parse_grid(grid),
        params={k: v for k, v in sets.items() if not k.isupper()}, values={k: v for k, v in sets.items() if k.isupper()},
        pool=pool, profile=profile, seed=seed, quick=quick, device=device, results=results, executor=executor,
        address=address, tune=tune, trials=trials, tune_seed=tune_seed, dry_run=dry_run, max_retries=max_retries,
        resources=UnitResources(cpus_per_unit, (1.0 if device.startswith("cuda") else 0.0) if gpus_per_unit is None
                                else gpus_per_unit, None if memory_per_unit is None else int(memory_per_unit * 2**30)),
        progress=not no_progress,
    )
    raise typer.Exit(execute(req, console, out))


@app.command("sql")
def sql_cmd(
    query: Annotated[str, typer.Argument(help="DuckDB SQL over the views results, provenance, diagnostics, paper, all_results")],
    results: Annotated[Path, typer.Option(help="results folder")] = Path("results"),
    as_json: Annotated[bool, typer.Option("--json", help="JSON records instead of a table")] = False,
    out_file: Annotated[Optional[Path], typer.Option("--out", help="also write the result to FILE.csv or FILE.parquet (outside the results folder)")] = None,
) -> None:
    """Query the results store with DuckDB (read-only: only SELECT queries run, no file can be written)."""
    import duckdb

    from .store import StoreError, check_results_dir, sql, warnings_to, write_export

    try:
        check_results_dir(results, writable=False)
        with warnings_to(_print_warning):
            df = sql(query, results)
        if out_file is not None:
            console.print(f"{len(df)} row(s) written to {write_export(df, out_file, results)}", highlight=False)
            return
    except duckdb.Error as exc:
        _fail((str(exc).strip().splitlines() or [type(exc).__name__])[0])
    except StoreError as exc:
        _fail(str(exc))
    if as_json:
        out.print_json(df.to_json(orient="records", date_format="iso"))
        return
    t = Table()
    for col in df.columns:
        t.add_column(str(col))
    for row in df.head(200).itertuples(index=False):
        t.add_row(*[str(v) for v in row])
    out.print(t)
    if len(df) > 200:
        console.print(f"({len(df)} rows; first 200 shown, use --json for all)")


def _probe_texts(pool, names: list[str], k: int, seed: int) -> tuple[list[str], dict[str, str]]:
    """k seeded validation documents of each expert's (embedded) task, and expert -> task."""
    from .pools import tag_values
    from .sampling import doc_sample
    from .zoo.tasks import load_split

    probes: list[str] = []
    tasks: dict[str, str] = {}
    seen: set[str] = set()
    for name in names:
        tagged = tag_values(pool.expert(name).tags.get("task"))
        if not tagged:
            continue
        task = tagged[0]
        tasks[name] = task
        if task in seen:
            continue
        seen.add(task)
        rows = load_split(task, "validation")
        for i in doc_sample(task, len(rows), k, seed=seed, split="validation").indices:
            probes.append(rows[i].get("query") or rows[i].get("text"))
    return probes, tasks


@app.command("diagnose")
def diagnose_cmd(
    pool: Annotated[str, typer.Option(help="pool name (see `mergebench pools`)")],
    experts: Annotated[Optional[str], typer.Option(help="comma-separated expert names (default: all of the pool)")] = None,
    method: Annotated[Optional[str], typer.Option(help="also merge the experts with this method and diagnose the merge")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="method parameter key=value (repeatable)")] = None,
    kinds: Annotated[str, typer.Option(help="comma-separated: weights,representations,activations")] = "weights,representations,activations",
    layer: Annotated[int, typer.Option(help="hidden layer for HiddenSim/MDS (negative counts from the end)")] = -1,
    layers: Annotated[Optional[str], typer.Option(help="comma-separated hidden layers for activation diagnostics (default: all)")] = None,
    k: Annotated[int, typer.Option(help="probe documents per task (the merging-collapse study uses 5)")] = 5,
    n_boot: Annotated[int, typer.Option(help="bootstrap draws for activation diagnostics")] = 20,
    seed: Annotated[int, typer.Option(help="bootstrap / merge seed")] = 0,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    results: Annotated[Path, typer.Option(help="results folder (Parquet store)")] = Path("results"),
) -> None:
    """Why a merge fails: weight, representation and activation diagnostics of a pool (and a merge)."""
    import tempfile

    from .diagnostics import diagnose
    from .engine import merge
    from .methods import get_method
    from .pools import PoolError, load_pool
    from .request import MergeRequest
    from .store import check_results_dir

    try:
        activation_layers = [int(x) for x in _split(layers)] if layers else None
    except ValueError:
        raise UsageError(f"--layers must be comma-separated integers, got {layers!r}") from None
    device = _checked_device(device)
    check_results_dir(results)
    p = load_pool(pool)
    names = _split(experts) or p.expert_names()

    def where(ref):
        path = ref.locate()
        if path is None:
            raise PoolError(f"{ref.spec} is not available locally (see `mergebench pools`)")
        return str(path)

    base = where(p.base)
    paths = {n: where(p.expert(n)) for n in names}
    probes, tasks = _probe_texts(p, names, k, seed)        # LEAD: k docs per expert's task, see below
    with tempfile.TemporaryDirectory() as tmp:
        merged = spec = None
        if method:
            spec = get_method(method)
            req = MergeRequest(method=method, base=base, experts=list(paths.values()),
                               params=parse_sets(set_), seed=seed, device=device)
            merge(req, Path(tmp) / "merged", progress=False)
            merged = str(Path(tmp) / "merged")
        out = diagnose(base, paths, merged=merged, merged_name=method or "merged", probes=probes, tasks=tasks,
                       kinds=tuple(_split(kinds)), layer=layer, activation_layers=activation_layers,
                       n_boot=n_boot, seed=seed, device=device, results_dir=results, pool=p.name,
                       base_model=p.base.spec, method=method, method_version=spec.version if spec else None,
                       params=parse_sets(set_), log=lambda m: console.print(m, highlight=False, soft_wrap=True))
    for line in out["summary"]:
        console.print(line, highlight=False)
    written = sum(u.written for u in out["units"])
    console.print(f"{written} diagnostic unit(s) written to {results} ({len(out['units']) - written} already stored)")


@app.command("stats")
def stats_cmd(
    suite: Annotated[str, typer.Option(help="a suite with a merging-loss report (e.g. glue)")] = "glue",
    profile: Annotated[Optional[str], typer.Option(help="suite profile (default: the suite's default)")] = None,
    pool: Annotated[Optional[str], typer.Option(help="pool (default: the profile's first)")] = None,
    methods: Annotated[Optional[str], typer.Option(help="comma-separated methods (default: every method stored)")] = None,
    results: Annotated[Path, typer.Option(help="results folder (Parquet store)")] = Path("results"),
    write: Annotated[bool, typer.Option(help="store the statistics in the diagnostics table")] = True,
) -> None:
    """The merging-collapse study's Tables 3-5 on stored runs: ANOVA of merging loss by task vs by method; Pearson of
    conflict metrics / HiddenSim (pairwise merges) and MDS (merge of all) against merging loss."""
    from .diagnostics.failure import failure_statistics, load_failure_inputs
    from .diagnostics.store import DiagUnit, write_diagnostics
    from .diagnostics.stats import stats_rows
    from .store import new_run_id

    losses, diag, ctx = load_failure_inputs(results, suite, profile=profile, pool=pool, methods=_split(methods))
    st = failure_statistics(losses, diag)
    console.print(f"[bold]{ctx['suite']}:{ctx['profile']}[/] on pool {ctx['pool']}: {losses['unit_id'].nunique()} "
                  f"merged unit(s), {len(losses)} (unit, task) merging losses, methods: "
                  f"{', '.join(sorted(losses['method'].unique()))}", highlight=False)
    table = Table(title="One-way ANOVA of merging loss (merging-collapse study, Table 3)")
    for col in ("factor", "groups", "n", "F", "p"):
        table.add_column(col)
    for a in st.anova.values():
        table.add_row(a.factor, str(a.n_groups), str(a.n), f"{a.f:.3g}", f"{a.p:.3g}")
    console.print(table)
    pf = st.pearson_frame()
    table = Table(title="Pearson correlation with merging loss (merging-collapse study, Tables 4-5)")
    for col in ("scope", "metric", "n", "r", "p"):
        table.add_column(col)
    for r in pf.itertuples():
        table.add_row(r.scope, r.metric, str(r.n), f"{r.r:+.3f}", f"{r.p:.3g}")
    console.print(table)
    for note in st.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    if st.notes and any("diagnose" in n for n in st.notes):
        console.print(f"  {ctx['diagnose_hint']}", highlight=False)
    if write:
        import hashlib

        run_id = new_run_id()
        key = hashlib.sha256(",".join(sorted(losses["unit_id"].unique())).encode()).hexdigest()[:16]
        settings = {"suite": ctx["suite"], "profile": ctx["profile"], "units": key,
                    "diagnostics": sorted(diag["unit_id"].unique().tolist())}
        scopes = {None: (st.anova, {"mds": st.mds_pearson} if st.mds_pearson else {})}
        for scope, res in st.pair_pearson.items():
            m = None if scope == "all methods" else scope
            prev = scopes.get(m, ({}, {}))
            scopes[m] = (prev[0], {**prev[1], **res})
        written = 0
        for m, (anova, pears) in scopes.items():
            rows = stats_rows(anova, pears)
            if rows:
                unit = DiagUnit("stats", pool=ctx["pool"], subset=tuple(ctx["experts"]), method=m, settings=settings)
                written += write_diagnostics(unit, rows, run_id=run_id, results_dir=results).written
        console.print(f"{written} statistics unit(s) written to {results}", highlight=False)


@app.command("leaderboard")
def leaderboard_cmd(
    results: Annotated[Path, typer.Option(help="results folder (Parquet store), opened read-only")] = Path("results"),
    port: Annotated[int, typer.Option(help="port to serve on")] = 8501,
    host: Annotated[str, typer.Option(help="address to bind (default: this machine only)")] = "127.0.0.1",
) -> None:
    """Open the Streamlit leaderboard over a results store.

    On POSIX the command becomes the Streamlit server (exec), so Ctrl-C or a SIGTERM sent to it
    stops the server itself and nothing keeps serving the port; elsewhere the server runs as a
    child that is stopped with the command."""
    import subprocess

    from .store import check_results_dir

    check_results_dir(results, writable=False)
    _check_port(host, port)
    app_py = Path(__file__).resolve().parents[1] / "leaderboard" / "app.py"
    if not app_py.is_file():
        _fail(f"leaderboard app not found at {app_py} (run from a mergebench checkout)")
    try:
        import streamlit  # noqa: F401
    except ImportError:
        _fail("the leaderboard needs streamlit, a dependency of mergebench that is not installed in this "
              f"environment ({sys.executable}): pip install 'streamlit>=1.40'")
    env = {**os.environ, "MERGEBENCH_RESULTS": str(results.resolve())}
    cmd = [sys.executable, "-m", "streamlit", "run", str(app_py),
           "--server.address", host, "--server.port", str(port), "--server.headless", "true",
           "--browser.gatherUsageStats", "false", "--client.toolbarMode", "viewer",
           "--", "--results", str(results.resolve())]
    console.print(f"mergebench leaderboard on http://{host}:{port}  (results: {results})")
    if os.name == "posix":
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, cmd, env)  # no return: signals now reach Streamlit directly
    proc = subprocess.Popen(cmd, env=env)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        code = proc.wait()
    raise typer.Exit(code)


def _check_port(host: str, port: int) -> None:
    """The leaderboard can listen on ``host:port`` (checked before Streamlit starts, which would
    otherwise report a busy port in its own words, after the command has been replaced by it)."""
    import errno
    import socket

    if not 0 < port < 65536:
        _fail(f"--port must be in 1..65535, got {port}")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Streamlit's server does
            sock.bind(addr)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            _fail(f"--port {port}: {host}:{port} is already in use (another leaderboard?); choose another --port")
        _fail(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})")


def _stored_suites(results: Path) -> set[str]:
    """Suites with rows in ``results`` or in the papers' tables."""
    from .store import connect

    with connect(results) as con:
        return {r[0] for r in con.execute("SELECT DISTINCT suite FROM all_results").fetchall()}


@app.command("report")
def report_cmd(
    results: Annotated[Path, typer.Option(help="results folder")] = Path("results"),
    suite: Annotated[Optional[str], typer.Option(help="only this suite")] = None,
    fmt: Annotated[str, typer.Option("--format", help="md, csv or html")] = "md",
    plots: Annotated[Optional[Path], typer.Option(help="also write scaling-curve PNGs into this folder")] = None,
    out_file: Annotated[Optional[Path], typer.Option("--out", help="write here instead of stdout")] = None,
    seed: Annotated[int, typer.Option(min=0, help="seed of the bootstrap CIs, rank intervals and P(best)")] = 0,
) -> None:
    """The leaderboard's rankings as static tables (papers, CI logs)."""
    from .report import store_notice, write_report

    from .store import check_results_dir

    if fmt not in ("md", "csv", "html"):
        _fail(f"--format must be md, csv or html, got {fmt!r}")
    check_results_dir(results, writable=False)
    _check_output("--out", out_file)
    _check_output("--plots", plots, folder=True)
    if suite is not None and suite not in _stored_suites(results):  # not stored: it must at least exist
        from .suites import load_suite

        load_suite(suite)
    notice = store_notice(results)
    if notice:
        console.print(f"[bold yellow]warning:[/] {escape(notice)}", highlight=False, soft_wrap=True)
    try:
        text = write_report(results, suite=suite, fmt=fmt, plots_dir=plots, out=out_file, seed=seed)
    except ImportError as exc:  # matplotlib missing for --plots
        _fail(f"{exc}; --plots needs matplotlib")
    if out_file is None:
        sys.stdout.write(text)


@app.command("pools")
def pools_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output (local paths once materialized)")] = False,
) -> None:
    """List every pool: its base and experts (with tags, and local paths once available)."""
    from .pools import describe_pools

    pools = describe_pools()
    if as_json:
        out.print_json(json.dumps(pools, default=str))
        return
    table = Table(title="mergebench pools (`--json` for experts, tags and local paths)")
    for col in ("pool", "base", "experts", "local", "from"):
        table.add_column(col, overflow="fold")
    for p in pools:
        if "error" in p:
            table.add_row(p["name"], "-", "-", "-", f"[yellow]{p['error']}[/]")
            continue
        experts = p.get("experts", [])
        local = sum(1 for e in [p["base"], *experts] if e.get("local_path"))
        base = p["base"].get("id") or p["base"].get("path") or p["base"]["name"]
        table.add_row(p["name"], str(base), str(len(experts)), f"{local}/{len(experts) + 1}", str(p.get("title") or ""))
    out.print(table)


@app.command("suites")
def suites_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """List the suites (with the paper each reproduces) and their profiles (paper / embedded / quick)."""
    from .papers import get_paper
    from .suites import list_suites

    suites = list_suites()
    if as_json:
        out.print_json(json.dumps([s.describe() for s in suites], default=str))
        return
    table = Table(title="mergebench suites", show_lines=True)
    for col in ("suite", "profile", "pools", "tasks", "sampler", "docs/task"):
        table.add_column(col, overflow="fold")
    for s in suites:
        for key, prof in s.profiles.items():
            d = prof.describe()
            sam = d["sampler"]
            sampler = f"{sam['mode']} n={sam['sizes']} x{sam['subsets_per_size']}" if sam["sizes"] else f"groups {sam['groups']}"
            label = key + (" (default)" if key == s.default_profile else "")
            paper = f"\n{get_paper(s.paper).short_title}" if s.paper and key == next(iter(s.profiles)) else ""
            table.add_row(s.id + paper, label, ", ".join(d["pools"]), str(len(d["tasks"])), sampler,
                          str(d["docs_per_task"] or "all"))
    out.print(table)


zoo = typer.Typer(no_args_is_help=True, help="The embedded offline pool: SmolLM2-135M-Instruct + LoRA experts on embedded tasks.")
app.add_typer(zoo, name="zoo")


@zoo.command("build")
def zoo_build(
    experts: Annotated[Optional[str], typer.Option(help="comma-separated expert names (default: all)")] = None,
) -> None:
    """Train the pool's experts from the committed data and seeds (deterministic; ~55 min on 2 shared cores).

    Measured: 55 min of training on 2 shared AMD EPYC cores, plus scoring
    (the per-expert train_seconds in suites/embedded/experts/pool.json).
    Idle cores: ~35-40 min (estimate). No GPU build time was measured."""
    from .zoo import pool

    pool.build(_split(experts) or None, log=console.print)


@zoo.command("materialize")
def zoo_materialize(
    cache: Annotated[Optional[Path], typer.Option(help="cache folder (default $MERGEBENCH_CACHE or ~/.cache/mergebench)")] = None,
    experts: Annotated[Optional[str], typer.Option(help="comma-separated expert names (default: all)")] = None,
    force: Annotated[bool, typer.Option(help="rebuild models whose weight files changed since they were materialized (instead of stopping with an error)")] = False,
) -> None:
    """Turn base + committed adapters into full-weight HF folders (sha256-verified, idempotent)."""
    from .zoo import pool

    _check_output("--cache", cache, folder=True)
    paths = pool.materialize(cache, _split(experts) or None, log=lambda m: console.print(m, highlight=False), force=force)
    for name, path in paths.items():
        out.print(f"{name}\t{path}")


@zoo.command("verify")
def zoo_verify(
    split: Annotated[str, typer.Option(help="train, validation or test")] = "validation",
    docs: Annotated[int, typer.Option(help="documents per task (seeded subsample; 0 = all)")] = 100,
    seed: Annotated[int, typer.Option(help="document sampling seed")] = 0,
    experts: Annotated[Optional[str], typer.Option(help="comma-separated expert names (default: all)")] = None,
    as_json: Annotated[Optional[Path], typer.Option("--json", help="also write the rows to this JSON file")] = None,
) -> None:
    """Score the base and every expert on every embedded task (base vs experts table)."""
    from .zoo import pool
    from .zoo.tasks import SPLITS

    if split not in SPLITS:  # before the pool is materialized and loaded
        _fail(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    if docs < 0:
        _fail(f"--docs must be 0 (all) or more, got {docs}")
    _check_output("--json", as_json)
    rows = pool.verify(split, docs or None, seed, _split(experts) or None, log=console.print)
    if as_json:
        as_json.write_text(json.dumps(rows, indent=1))
    models = list(dict.fromkeys(r["model"] for r in rows))
    tasks = sorted({r["task"] for r in rows})
    acc = {(r["model"], r["task"]): r for r in rows if r["metric"] == "acc"}
    table = Table(title=f"accuracy on the {split} split (± stderr)")
    table.add_column("model")
    for t in tasks:
        table.add_column(t.removeprefix("mb_"), justify="right")
    for m in models:
        cells = []
        for t in tasks:
            r = acc.get((m, t))
            base = acc.get(("base", t))
            mark = "[bold green]" if r and base and m != "base" and r["value"] > base["value"] + 2 * r["stderr"] else ""
            cells.append(f"{mark}{r['value']:.2f}±{r['stderr']:.2f}" if r else "-")
        table.add_row(m, *cells)
    out.print(table)


def _print_warning(message: str) -> None:
    """One ``warning: ...`` line on stderr (store warnings name the file they are about)."""
    console.print(f"warning: {message}", highlight=False, markup=False, soft_wrap=True)


store_app = typer.Typer(no_args_is_help=True, help="Check and repair a results store.")
app.add_typer(store_app, name="store")


@store_app.command("check")
def store_check_cmd(
    results: Annotated[Path, typer.Option(help="results folder")] = Path("results"),
    fix: Annotated[bool, typer.Option("--fix", help="move what was found to <results>/quarantine/<timestamp>/ (nothing is deleted)")] = False,
) -> None:
    """List damaged or unreadable files, provenance without rows, duplicated units, stale temp
    files and stale claims; exit code 1 if there are any (0 with --fix once they are moved)."""
    from collections import Counter

    from .store import StoreError, check_results_dir, check_store, fix_store, warnings_to

    try:
        check_results_dir(results, writable=fix)
        with warnings_to(_print_warning):
            report = check_store(results)
            for line in report.lines():
                out.print(line, highlight=False, markup=False, soft_wrap=True)
            if report.clean:
                return
            if not fix:
                out.print(f"{len(report.problems)} problem(s); to move them to {results / 'quarantine'}/, run\n"
                          f"  mergebench store check --results {results} --fix", highlight=False, markup=False,
                          soft_wrap=True)
                raise typer.Exit(1)
            box, moved = fix_store(report)
    except StoreError as exc:
        _fail(str(exc))
    kinds = Counter(problem.kind for problem, _ in moved)
    out.print(f"moved {len(moved)} file(s) ({', '.join(f'{n} {k}' for k, n in kinds.items())}) to\n  {box}/\n"
              "where moved.tsv says why" if moved else "nothing moved", highlight=False, markup=False, soft_wrap=True)
    if len(moved) < len(report.problems):
        out.print(f"{len(report.problems) - len(moved)} file(s) were gone or in use again and were left alone",
                  highlight=False, markup=False, soft_wrap=True)


def main() -> None:  # pragma: no cover - console entry (the same as the `mergebench` script, `app`)
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
