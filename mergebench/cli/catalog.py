"""`mergebench pools` and `suites`: what is declared under suites/."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from mergebench.cli.core import app, out


@app.command("pools")
def pools_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output (local paths once materialized)")] = False,
) -> None:
    """List every pool: its base and experts (with tags, and local paths once available)."""
    from mergebench.config.pools import describe_pools

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
    from mergebench.config.papers import get_paper
    from mergebench.config.suites import list_suites

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
