"""Small path checks shared by every room that writes (the merge writer, the results store, the CLI)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["file_above"]


def file_above(path: str | Path) -> Path | None:
    """The nearest existing ancestor of ``path`` when it is a file (so ``path`` can never be
    created), else None. ``path`` itself need not exist."""
    anc = Path(path).absolute().parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    return None if anc.is_dir() else anc
