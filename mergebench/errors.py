"""The one root of mergebench's own errors.

Every error mergebench raises on purpose (bad input, a missing model, an unusable path) derives
from :class:`MergebenchError`, so the CLI reports all of them as one clear line while a genuine
bug (anything else) still shows its traceback. Subclasses keep their historical built-in bases
(``ValueError``, ``KeyError``, ...) so callers that caught those keep working.
"""

from __future__ import annotations

__all__ = ["MergebenchError"]


class MergebenchError(Exception):
    """A failure caused by the input or the environment, reported to a user as one line."""
