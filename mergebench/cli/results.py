"""`mergebench sql`, `report`, `leaderboard` and `store check`: reading (and repairing) the results store."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from mergebench.cli.core import app, check_output, console, fail, out, print_warning


@app.command("sql")
def sql_cmd(
    query: Annotated[str, typer.Argument(help="DuckDB SQL over the views results, provenance, diagnostics, fidelity, paper, all_results")],
    results: Annotated[Path, typer.Option(help="results folder")] = Path("results"),
    as_json: Annotated[bool, typer.Option("--json", help="JSON records instead of a table")] = False,
    out_file: Annotated[Optional[Path], typer.Option("--out", help="also write the result to FILE.csv or FILE.parquet (outside the results folder)")] = None,
) -> None:
    """Query the results store with DuckDB (read-only: only SELECT queries run, no file can be written)."""
    import duckdb

    from mergebench.results.store import StoreError, check_results_dir, sql, warnings_to, write_export

    try:
        check_results_dir(results, writable=False)
        with warnings_to(print_warning):
            df = sql(query, results)
        if out_file is not None:
            console.print(f"{len(df)} row(s) written to {write_export(df, out_file, results)}", highlight=False)
            return
    except duckdb.Error as exc:
        fail((str(exc).strip().splitlines() or [type(exc).__name__])[0])
    except StoreError as exc:
        fail(str(exc))
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

    from mergebench.results.store import check_results_dir

    check_results_dir(results, writable=False)
    _check_port(host, port)
    try:
        import streamlit  # noqa: F401
    except ImportError:
        fail("the leaderboard needs streamlit, a dependency of mergebench that is not installed in this "
              f"environment ({sys.executable}): pip install 'streamlit>=1.40'")
    from mergebench.leaderboard import serve

    env = {**os.environ, "MERGEBENCH_RESULTS": str(results.resolve())}
    cmd = serve.command(results, host=host, port=port)
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
        fail(f"--port must be in 1..65535, got {port}")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Streamlit's server does
            sock.bind(addr)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            fail(f"--port {port}: {host}:{port} is already in use (another leaderboard?); choose another --port")
        fail(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})")


def _stored_suites(results: Path) -> set[str]:
    """Suites with rows in ``results`` or in the papers' tables."""
    from mergebench.results.store import connect

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
    from mergebench.report import store_notice, write_report
    from mergebench.results.store import check_results_dir

    if fmt not in ("md", "csv", "html"):
        fail(f"--format must be md, csv or html, got {fmt!r}")
    check_results_dir(results, writable=False)
    check_output("--out", out_file)
    check_output("--plots", plots, folder=True)
    if suite is not None and suite not in _stored_suites(results):  # not stored: it must at least exist
        from mergebench.config.suites import load_suite

        load_suite(suite)
    notice = store_notice(results)
    if notice:
        console.print(f"[bold yellow]warning:[/] {escape(notice)}", highlight=False, soft_wrap=True)
    try:
        text = write_report(results, suite=suite, fmt=fmt, plots_dir=plots, out=out_file, seed=seed)
    except ImportError as exc:  # matplotlib missing for --plots
        fail(f"{exc}; --plots needs matplotlib")
    if out_file is None:
        sys.stdout.write(text)


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

    from mergebench.results.store import StoreError, check_results_dir, check_store, fix_store, warnings_to

    try:
        check_results_dir(results, writable=fix)
        with warnings_to(print_warning):
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
        fail(str(exc))
    kinds = Counter(problem.kind for problem, _ in moved)
    out.print(f"moved {len(moved)} file(s) ({', '.join(f'{n} {k}' for k, n in kinds.items())}) to\n  {box}/\n"
              "where moved.tsv says why" if moved else "nothing moved", highlight=False, markup=False, soft_wrap=True)
    if len(moved) < len(report.problems):
        out.print(f"{len(report.problems) - len(moved)} file(s) were gone or in use again and were left alone",
                  highlight=False, markup=False, soft_wrap=True)
