"""`mergebench` command line: thin wrappers that parse, call the library and print."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="mergebench: merge LLM weights with pluggable methods and score them on standard suites.",
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()


class UsageError(Exception):
    """A user mistake reported as one line, exit code 2."""


def _fail(msg: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {msg}", highlight=False)
    raise typer.Exit(code)


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


def _short(text: str, width: int = 70) -> str:
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


@app.command("methods")
def methods_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    name: Annotated[Optional[str], typer.Argument(help="show one method in detail")] = None,
) -> None:
    """List every registered merge method with its parameters, defaults and citation."""
    from .methods import get_method, list_methods

    try:
        specs = [get_method(name)] if name else list_methods()
    except KeyError as exc:
        _fail(str(exc))
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
        table.add_row(f"[bold]{s.name}[/] v{s.version}\n{s.summary}", inputs, params or "-", s.citation if name else _short(s.citation))
    out.print(table)


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
    overwrite: Annotated[bool, typer.Option(help="replace an existing output folder")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
    out_dir: Annotated[Path, typer.Option("--out", help="output folder (written atomically)")] = ...,
) -> None:
    """Merge checkpoints with one method and write a Hugging Face folder."""
    from pydantic import ValidationError

    from .engine import merge
    from .methods import ParameterError
    from .request import MergeRequest

    try:
        if config is not None:
            from .mergekit_config import load_mergekit_yaml

            if method or experts or base:
                raise UsageError("give either a CONFIG.yaml or --method/--base/--experts, not both")
            request = load_mergekit_yaml(config)
            overrides = {"seed": seed, "device": device}
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
                allow_pickle=allow_pickle,
            )
        result = merge(request, out_dir, progress=not quiet, overwrite=overwrite)
    except ValidationError as exc:
        _fail("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))
    except (UsageError, ParameterError, ValueError, FileNotFoundError, FileExistsError, KeyError, ImportError) as exc:
        _fail(exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc))
    console.print(f"[green]merged[/] {request.method} of {len(request.experts)} experts -> {out_dir}  ({result.summary()})")


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
