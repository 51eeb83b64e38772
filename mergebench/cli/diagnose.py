"""`mergebench diagnose` and `stats`: weight, representation and activation diagnostics and their statistics."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from mergebench.cli.core import UsageError, app, checked_device, console, parse_sets, split_list


def _probe_texts(pool, names: list[str], k: int, seed: int) -> tuple[list[str], dict[str, str]]:
    """k seeded validation documents of each expert's (embedded) task, and expert -> task."""
    from mergebench.config.pools import tag_values
    from mergebench.config.sampling import doc_sample
    from mergebench.zoo.tasks import load_split

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

    from mergebench.config.pools import PoolError, load_pool
    from mergebench.diagnostics import diagnose
    from mergebench.engine import merge
    from mergebench.engine.request import MergeRequest
    from mergebench.methods import get_method
    from mergebench.results.store import check_results_dir

    try:
        activation_layers = [int(x) for x in split_list(layers)] if layers else None
    except ValueError:
        raise UsageError(f"--layers must be comma-separated integers, got {layers!r}") from None
    device = checked_device(device)
    check_results_dir(results)
    p = load_pool(pool)
    names = split_list(experts) or p.expert_names()

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
                       kinds=tuple(split_list(kinds)), layer=layer, activation_layers=activation_layers,
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
    from mergebench.diagnostics.failure import failure_statistics, load_failure_inputs
    from mergebench.diagnostics.stats import stats_rows
    from mergebench.diagnostics.store import DiagUnit, write_diagnostics
    from mergebench.results.store import new_run_id

    losses, diag, ctx = load_failure_inputs(results, suite, profile=profile, pool=pool, methods=split_list(methods))
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
