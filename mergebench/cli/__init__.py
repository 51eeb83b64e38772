"""`mergebench` command line: thin wrappers that parse, call the library and print.

One module per command group; each registers its commands on the one Typer ``app`` of
:mod:`mergebench.cli.core`, which also turns every :class:`~mergebench.errors.MergebenchError`
into one ``error:`` line.
"""

# Imported in the order `mergebench --help` lists the commands.
from mergebench.cli import merge, run, compare, results, fidelity, diagnose, catalog, zoo  # noqa: F401,I001  (register commands)
from mergebench.cli.core import app, main

__all__ = ["app", "main"]
