"""`mergebench zoo build | materialize | verify`: the embedded offline pool."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from mergebench.cli.core import app, check_output, console, fail, out, split_list

zoo = typer.Typer(no_args_is_help=True, help="The embedded offline pools on SmolLM2-135M-Instruct: smol (LoRA experts on "
                  "the embedded tasks) and wild (mostly off-battery and far experts, the in-the-wild regime).")
app.add_typer(zoo, name="zoo")

POOLS = ("smol", "wild")
PoolOption = Annotated[str, typer.Option("--pool", help="embedded pool: smol (the default suites' pool) or wild")]


def _builder(name: str):
    """The module that builds, materializes and verifies embedded pool ``name``."""
    if name not in POOLS:
        fail(f"--pool must be one of {', '.join(POOLS)}, got {name!r}")
    from mergebench.zoo import pool, wild

    return pool if name == "smol" else wild


@zoo.command("build")
def zoo_build(
    experts: Annotated[Optional[str], typer.Option(help="comma-separated expert names (default: all)")] = None,
    pool_name: PoolOption = "smol",
) -> None:
    """Train the pool's experts from the committed data and seeds (deterministic; ~45-55 min on 2 shared cores).

    Measured on 2 shared AMD EPYC cores: smol 55 min of training plus scoring (the per-expert
    train_seconds in suites/embedded/experts/pool.json); wild 44 min of training on one thread
    (suites/wild/). No GPU build time was measured."""
    _builder(pool_name).build(split_list(experts) or None, log=console.print)


@zoo.command("materialize")
def zoo_materialize(
    cache: Annotated[Optional[Path], typer.Option(help="cache folder (default $MERGEBENCH_CACHE or ~/.cache/mergebench)")] = None,
    experts: Annotated[Optional[str], typer.Option(help="comma-separated expert names (default: all)")] = None,
    force: Annotated[bool, typer.Option(help="rebuild models whose weight files changed since they were materialized (instead of stopping with an error)")] = False,
    pool_name: PoolOption = "smol",
) -> None:
    """Turn base + committed adapters into full-weight HF folders (sha256-verified, idempotent)."""
    builder = _builder(pool_name)
    check_output("--cache", cache, folder=True)
    paths = builder.materialize(cache, split_list(experts) or None, log=lambda m: console.print(m, highlight=False), force=force)
    for name, path in paths.items():
        out.print(f"{name}\t{path}")


@zoo.command("verify")
def zoo_verify(
    split: Annotated[str, typer.Option(help="train, validation or test")] = "validation",
    docs: Annotated[int, typer.Option(help="documents per task (seeded subsample; 0 = all)")] = 100,
    seed: Annotated[int, typer.Option(help="document sampling seed")] = 0,
    experts: Annotated[Optional[str], typer.Option(help="comma-separated expert names (default: all)")] = None,
    as_json: Annotated[Optional[Path], typer.Option("--json", help="also write the rows to this JSON file")] = None,
    pool_name: PoolOption = "smol",
) -> None:
    """Score the base and every expert on every embedded task (base vs experts table)."""
    from mergebench.zoo.tasks import SPLITS

    builder = _builder(pool_name)
    if split not in SPLITS:  # before the pool is materialized and loaded
        fail(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    if docs < 0:
        fail(f"--docs must be 0 (all) or more, got {docs}")
    check_output("--json", as_json)
    rows = builder.verify(split, docs or None, seed, split_list(experts) or None, log=console.print)
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
