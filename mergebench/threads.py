"""How many CPU threads torch uses for merging and scoring, and how to share the cores.

On a small machine two processes that each take every core do not share it: they collapse
(measured on 2 cores: a 0.8 s training step took 19 s with two such processes). So mergebench
sets the count explicitly: ``--threads N``, else ``$MERGEBENCH_THREADS``, else the physical cores
this process may run on; ``mergebench sweep --workers N`` gives each worker its share.
"""

from __future__ import annotations

import os

from .errors import MergebenchError

__all__ = ["ENV", "ThreadsError", "apply_threads", "available_cores", "resolve_threads"]

ENV = "MERGEBENCH_THREADS"


class ThreadsError(MergebenchError, ValueError):
    """A thread count that is not a positive whole number."""


def available_cores() -> int:
    """Physical cores this process may use (the affinity mask, counted in physical cores)."""
    try:
        logical = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        logical = os.cpu_count() or 1
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or logical
        per_core = max(1, (psutil.cpu_count(logical=True) or logical) // physical)
    except ImportError:
        per_core = 1
    return max(1, logical // per_core)


def resolve_threads(value: int | str | None = None, *, workers: int = 1) -> int:
    """``value`` (a flag), else ``$MERGEBENCH_THREADS``, else the available cores divided among
    ``workers`` processes (at least 1 each)."""
    source = "--threads"
    if value is None and os.environ.get(ENV, "").strip():
        value, source = os.environ[ENV].strip(), f"${ENV}"
    if value is None:
        return max(1, available_cores() // max(1, int(workers)))
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or str(value).strip() not in (str(n), f"+{n}"):
        raise ThreadsError(f"{source} must be a positive whole number, got {value!r}")
    return n


def apply_threads(n: int) -> int:
    """Make torch use ``n`` intra-op threads in this process; returns ``n``."""
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
