"""The leaderboard's server process: ``python -m mergebench.leaderboard.serve ARGS`` is
``streamlit ARGS`` with the pages' libraries imported first.

Streamlit imports an app's modules inside the first reader's script run, so without this the first
page anyone opens pays ~1.5 s of imports (pandas alone ~1 s on a 2-core machine) on top of its
queries. Importing them here, before the server listens, moves that cost to start-up, where no one
is waiting on a page yet. ``mergebench leaderboard`` starts the server this way.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

#: what the ranking page (the first page most readers open) imports; the other pages' Altair
#: charts are left to their first use, as the app does
WARM_MODULES = ("pandas", "pyarrow", "pyarrow.parquet", "duckdb", "mergebench.report",
                "mergebench.leaderboard.queries", "mergebench.leaderboard.specs")


def command(results: Path, *, host: str = "127.0.0.1", port: int = 8501, options: Sequence[str] = ()) -> list[str]:
    """The server's command line over the store ``results`` (``options``: more Streamlit flags)."""
    app_py = Path(__file__).resolve().with_name("app.py")
    return [sys.executable, "-m", "mergebench.leaderboard.serve", "run", str(app_py),
            "--server.address", host, "--server.port", str(port), "--server.headless", "true",
            "--browser.gatherUsageStats", "false", "--client.toolbarMode", "viewer", *options,
            "--", "--results", str(Path(results).resolve())]


def warm() -> None:
    """Import :data:`WARM_MODULES`, and compute what every first page needs whatever its filters
    (suite definitions, the method catalog, the disk cache's code key); all stay in this process."""
    for name in WARM_MODULES:
        importlib.import_module(name)
    from mergebench import report
    from mergebench.leaderboard import queries

    report.suite_definitions()
    report.method_catalog()
    queries.code_key()


def main(argv: list[str] | None = None) -> None:
    """Warm up, then run Streamlit's own command line with ``argv`` (e.g. ``run app.py ...``)."""
    warm()
    from streamlit.web import cli

    sys.argv = ["streamlit", *(sys.argv[1:] if argv is None else argv)]
    cli.main()


if __name__ == "__main__":
    main()
