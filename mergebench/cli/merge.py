"""`mergebench methods` and `mergebench merge`: the method registry and one merge."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from mergebench.cli.core import UsageError, app, console, out, parse_sets, shorten, split_list


@app.command("methods")
def methods_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    name: Annotated[Optional[str], typer.Argument(help="show one method in detail")] = None,
) -> None:
    """List every registered merge method with its parameters, defaults and citation."""
    from mergebench.methods import get_method, list_methods

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
        cite = f"{info['cite']}" if info else shorten(s.citation)
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
    calibration_texts: Annotated[Optional[Path], typer.Option(
        help="data-dependent methods: JSON lines of calibration texts, {\"prompt\": ..., \"answer\": ..., "
             "\"expert\": i} (no expert: every expert); take them from validation data, never test")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="output folder (written atomically)")] = ...,
) -> None:
    """Merge checkpoints with one method and write a Hugging Face folder."""
    from mergebench.engine import merge
    from mergebench.engine.request import MergeRequest

    if config is not None:
        from mergebench.engine.mergekit_config import load_mergekit_yaml

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
            aux_map[key.strip()] = split_list(paths)
        try:
            w = [float(x) for x in split_list(weights)] or None
        except ValueError:
            raise UsageError(f"--weights must be comma-separated numbers, got {weights!r}") from None
        request = MergeRequest(
            method=method, base=base, experts=split_list(experts), weights=w, params=parse_sets(set_), aux=aux_map,
            seed=seed, device=device, dtype=dtype, out_dtype=out_dtype, vocab_policy=vocab_policy,
            allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite,
        )
    data = None
    if calibration_texts is not None:
        from mergebench.engine.calibration import CalibrationData

        data = CalibrationData.from_jsonl(calibration_texts, len(request.experts))
    result = merge(request, out_dir, progress=not quiet, overwrite=overwrite, calibration=data)
    console.print(f"[green]merged[/] {request.method} of {len(request.experts)} experts -> {out_dir}  ({result.summary()})")
