"""`mergebench fidelity`: the papers' published findings tested on the embedded benchmark."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mergebench.cli.core import app, console, fail, out, print_warning

_STYLE = {"reproduced": "green", "not reproduced": "red", "not testable here": "yellow"}


@app.command("fidelity")
def fidelity_cmd(
    suite: Annotated[str | None, typer.Option(help="only this suite's findings (default: every suite with findings)")] = None,
    results: Annotated[Path, typer.Option(help="results folder (Parquet store)")] = Path("results"),
    seed: Annotated[int, typer.Option(help="bootstrap seed (NumPy PCG64)")] = 0,
    n_boot: Annotated[int, typer.Option("--n-boot", help="bootstrap resamples per interval")] = 1000,
    write: Annotated[bool, typer.Option(help="store the rows (the `fidelity` view of `mergebench sql`)")] = True,
    readme: Annotated[Path | None, typer.Option(help="also write the table into this markdown file (e.g. suites/README.md), between its fidelity markers")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON records on stdout instead of the text report")] = False,
) -> None:
    """Test each published finding of suites/papers/findings.yaml on the embedded profile: the embedded result, a seeded
    95 % interval and a verdict (reproduced / not reproduced / not testable here, with the reason), plus Kendall's
    tau between the embedded and each paper's published method ranking."""
    from mergebench import report
    from mergebench import fidelity
    from mergebench.results.store import StoreError, check_results_dir, warnings_to

    try:
        check_results_dir(results, writable=write)
        spec = fidelity.load_findings()
        if readme is not None and not readme.is_file():
            fail(f"--readme {readme}: no such file")
        with warnings_to(print_warning):
            con = report.connect(results)
            try:
                frame = fidelity.fidelity_table(con, suite, seed=seed, n_boot=n_boot)
            finally:
                con.close()
        stored = fidelity.write_table(frame, results) if write else []
    except StoreError as exc:
        fail(str(exc))
    if readme is not None:
        readme.write_text(fidelity.with_table(readme.read_text(encoding="utf-8"), frame), encoding="utf-8")
    if as_json:
        out.print_json(frame.to_json(orient="records"))
        return
    for r in frame.itertuples(index=False):
        out.print(f"[bold]{r.suite}[/] {r.id}  [{_STYLE[r.verdict]}]{r.verdict}[/]", highlight=False)
        out.print(f"  {r.paper_title}, {r.where}: {r.claim}", highlight=False, markup=False)
        if r.observed:
            ci = f"   95 % CI [{r.ci_low:.3g}, {r.ci_high:.3g}]" if r.ci_low == r.ci_low else ""
            out.print(f"  embedded: {r.observed}{ci}", highlight=False, markup=False)
        out.print(f"  why: {r.reason}", highlight=False, markup=False)
    counts = fidelity.summary(frame)
    console.print(f"{counts['reproduced']} reproduced, {counts['not reproduced']} not reproduced, "
                  f"{counts['not testable here']} not testable here ({len(spec.findings)} findings and "
                  f"{len(spec.rankings)} rankings declared; bootstrap seed {seed}, {n_boot:,} resamples)",
                  highlight=False)
    if stored:
        console.print(f"rows stored in {results / 'fidelity'}; query them with "
                      f"`mergebench sql \"select * from fidelity\"`, or open the Fidelity page of `mergebench leaderboard`",
                      highlight=False)
    if readme is not None:
        console.print(f"table written into {readme}", highlight=False)
