"""`mergebench compare A B`: two methods paired on identical subsets and documents."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from mergebench.cli.core import app, out


@app.command("compare")
def compare_cmd(
    method_a: Annotated[str, typer.Argument(help="first method (the gap is A - B)")],
    method_b: Annotated[str, typer.Argument(help="second method")],
    suite: Annotated[str, typer.Option(help="suite whose stored runs to compare")] = "inthewild",
    profile: Annotated[Optional[str], typer.Option(help="suite profile (default: the suite's default)")] = None,
    results: Annotated[Path, typer.Option(help="results folder")] = Path("results"),
    seed: Annotated[int, typer.Option(help="bootstrap seed")] = 0,
    n_boot: Annotated[int, typer.Option(help="bootstrap resamples")] = 2000,
) -> None:
    """Paired gap A - B per merge size, bootstrapped over subsets and documents jointly."""
    from mergebench.results.compare import compare_methods
    from mergebench.results.store import check_results_dir

    check_results_dir(results, writable=False)
    df = compare_methods(results, suite, method_a, method_b, profile=profile, n_boot=n_boot, seed=seed)
    t = Table(title=f"{method_a} - {method_b} on {suite}: battery average, points",
              caption=f"95% bootstrap intervals (seed {seed}, {n_boot} resamples); gap > 0: {method_a} better")
    for col, just in (("n", "right"), ("subsets", "right"), ("docs", "right"), ("gap", "right"),
                      ("subsets x docs", "center"), ("subsets only", "center"), (f"P({method_a} better)", "right")):
        t.add_column(col, justify=just)
    for r in df.itertuples(index=False):
        t.add_row(str(r.n), str(r.n_subsets), str(r.n_docs), f"{100 * r.mean_diff:+.2f}",
                  f"[{100 * r.ci_low:+.2f}, {100 * r.ci_high:+.2f}]",
                  f"[{100 * r.subsets_ci_low:+.2f}, {100 * r.subsets_ci_high:+.2f}]", f"{r.p_a_better:.2f}")
    out.print(t)
