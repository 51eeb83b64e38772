"""The streaming merge engine: the I/O and scheduling edge around pure method kernels.

``merge(request, out)`` validates the request, opens checkpoints by their headers, checks
compatibility, then streams tensor by tensor through the method's kernel into an atomic
sharded safetensors writer (or an in-memory state dict, for ``out=None``);
``load_merged_model`` turns an in-memory result into a ``transformers`` model.
"""

from .checkpoint import Checkpoint, CheckpointError, open_checkpoint, resolve_model_path
from .compat import CompatibilityError, MergePlan, plan_merge
from .inmemory import load_merged_model
from .device import DeviceError, resolve_device
from .merge import (
    DEFAULT_CHUNK_BYTES,
    PROVENANCE_FILE,
    MergeError,
    MergeResult,
    NonFiniteError,
    NonFiniteInputError,
    NonFiniteOutputError,
    all_finite,
    merge,
    peak_rss_bytes,
    tensor_seed,
)
from .writer import OutputPathError, OutputWriteError, ShardedWriter, check_destination

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "PROVENANCE_FILE",
    "Checkpoint",
    "CheckpointError",
    "CompatibilityError",
    "DeviceError",
    "MergeError",
    "MergePlan",
    "MergeResult",
    "NonFiniteError",
    "NonFiniteInputError",
    "NonFiniteOutputError",
    "OutputPathError",
    "OutputWriteError",
    "ShardedWriter",
    "all_finite",
    "check_destination",
    "load_merged_model",
    "merge",
    "open_checkpoint",
    "peak_rss_bytes",
    "plan_merge",
    "resolve_device",
    "resolve_model_path",
    "tensor_seed",
]
