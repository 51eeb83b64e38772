"""Shared pieces of the data-dependent built-ins: reading a statistic from ``ctx.aux``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mergebench.methods import TensorContext

__all__ = ["floats", "statistic"]


def statistic(ctx: TensorContext, key: str, n_experts: int) -> Sequence[torch.Tensor] | None:
    """``ctx.aux[key]`` (one tensor per expert), None when the engine gave none for this tensor;
    a wrong count is an error naming the tensor."""
    values = ctx.aux.get(key) if ctx.aux else None
    if values is None:
        return None
    if len(values) != n_experts:
        raise ValueError(f"{ctx.name}: {len(values)} {key!r} statistic(s) for {n_experts} expert(s)")
    return values


def floats(values: Sequence[Any]) -> list[float]:
    return [float(v) for v in values]
