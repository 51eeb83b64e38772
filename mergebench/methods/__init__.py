"""The merge-method API: contract, registry and naming helpers."""

from .naming import count_layers, layer_index, module_kind
from .registry import ENTRY_POINT_GROUP, UnknownMethodError, get_method, list_methods, method, register, unregister
from .spec import (
    Granularity,
    InputContract,
    Kernel,
    MethodSpec,
    ModuleKind,
    Param,
    ParameterError,
    TensorContext,
    tensor_seed,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "Granularity",
    "InputContract",
    "Kernel",
    "MethodSpec",
    "ModuleKind",
    "Param",
    "ParameterError",
    "TensorContext",
    "UnknownMethodError",
    "count_layers",
    "get_method",
    "layer_index",
    "list_methods",
    "method",
    "module_kind",
    "register",
    "tensor_seed",
    "unregister",
]
