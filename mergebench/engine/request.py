"""A merge request: everything `mergebench merge` needs, validated before any tensor is read.

Built from CLI flags, from a mergekit-style YAML (``mergebench.engine.mergekit_config``) or in
Python; consumed by ``mergebench.engine.merge``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

VocabPolicy = Literal["error", "truncate", "base"]


class MergeRequest(BaseModel):
    """What to merge and how. Paths may be local folders or hub ids (resolved from the
    local HF cache; ``HF_HUB_OFFLINE`` is respected)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str
    experts: list[str] = Field(min_length=1)
    base: str | None = None
    weights: list[float] | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    per_expert_params: dict[str, list[Any]] = Field(
        default_factory=dict, description="per-expert values of per_expert parameters (e.g. density)"
    )
    aux: dict[str, list[str]] = Field(
        default_factory=dict, description="auxiliary per-expert checkpoints, e.g. {'fisher': [path, ...]}"
    )
    seed: int = 0
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16", "float64"] = "float32"
    out_dtype: Literal["float32", "bfloat16", "float16", "float64"] | None = None
    vocab_policy: VocabPolicy = "error"
    allow_pickle: bool = False
    allow_nonfinite: bool = False
    """Pass NaN/inf input values through instead of stopping at the first one (the merged
    tensor then holds non-finite values too; a non-finite output from finite inputs is
    still an error)."""
    max_shard_size: int = 2 * 1024**3

    def resolved_out_dtype(self) -> str | None:
        return self.out_dtype


def default_out(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()
