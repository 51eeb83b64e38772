"""mergebench: a benchmark-as-a-library harness for LLM weight merging."""

from .errors import MergebenchError
from .methods import InputContract, MethodSpec, Param, ParameterError, TensorContext, get_method, list_methods, method

__version__ = "0.1.0"

__all__ = [
    "InputContract",
    "MergebenchError",
    "MethodSpec",
    "Param",
    "ParameterError",
    "TensorContext",
    "__version__",
    "get_method",
    "list_methods",
    "method",
]
