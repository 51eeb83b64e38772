"""The diagnostics room's error: a request ``diagnose`` or ``stats`` cannot serve (one line)."""

from __future__ import annotations

from ..errors import MergebenchError

__all__ = ["DiagnosticsError"]


class DiagnosticsError(MergebenchError, ValueError):
    """Unknown kinds, a layer out of range, too few experts, no stored results to analyse."""
