"""Where the source checkout keeps its data, and the path checks every room that writes shares
(the merge writer, the results store, the CLI)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CHECKOUT", "SUITES_ENV", "file_above", "suites_root"]

#: The source checkout: ``suites/`` and ``results/`` ship beside the package (an editable install).
CHECKOUT = Path(__file__).resolve().parents[1]
SUITES_ENV = "MERGEBENCH_SUITES"


def suites_root() -> Path:
    """``$MERGEBENCH_SUITES``, else ``suites/`` of the source checkout."""
    env = os.environ.get(SUITES_ENV)
    return Path(env).expanduser() if env else CHECKOUT / "suites"


def file_above(path: str | Path) -> Path | None:
    """The nearest existing ancestor of ``path`` when it is a file (so ``path`` can never be
    created), else None. ``path`` itself need not exist."""
    anc = Path(path).absolute().parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    return None if anc.is_dir() else anc
