"""mergebench: a benchmark-as-a-library harness for LLM weight merging.

The method API below is imported on first use (PEP 562), so that reading results (the report,
the leaderboard, ``mergebench sql``) does not pay for importing torch.
"""

from .errors import MergebenchError

__version__ = "0.1.0"

_METHOD_API = ("InputContract", "MethodSpec", "Param", "ParameterError", "TensorContext", "get_method", "list_methods",
               "method")

__all__ = ["MergebenchError", "__version__", *_METHOD_API]


def __getattr__(name: str):
    if name in _METHOD_API:
        from . import methods

        return getattr(methods, name)
    raise AttributeError(f"module 'mergebench' has no attribute {name!r}")
