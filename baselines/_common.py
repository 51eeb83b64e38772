"""Small shared pieces of the built-in kernels (pure tensor functions)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def weights_for(weights: torch.Tensor, like: torch.Tensor) -> list[float]:
    """Per-expert weights as Python floats (one host sync per tensor, not per element)."""
    return [float(w) for w in weights.detach().to("cpu", torch.float64)]


def merge_weights(weights: torch.Tensor, like: torch.Tensor, normalize: bool, what: str) -> list[float]:
    """Per-expert weights as floats, divided by their sum when ``normalize`` (a weighted mean).
    Request validation already refuses zero-sum weights; this guards direct kernel calls."""
    w = weights_for(weights, like)
    if not normalize:
        return w
    total = sum(w)
    if total == 0:
        raise ValueError(f"{what}: merge weights sum to zero; cannot normalize")
    return [x / total for x in w]


def weighted_sum(tensors: Sequence[torch.Tensor], coeffs: Sequence[float], out: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_i coeffs[i] * tensors[i]`` accumulated in place into one buffer (no stack)."""
    if out is None:
        out = torch.empty_like(tensors[0])
    torch.mul(tensors[0], coeffs[0], out=out)
    for t, c in zip(tensors[1:], coeffs[1:]):
        out.add_(t, alpha=c)
    return out


def task_vectors(base: torch.Tensor, experts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stacked task vectors ``experts[i] - base`` as one ``(N, *shape)`` tensor."""
    out = torch.empty((len(experts), *base.shape), dtype=base.dtype, device=base.device)
    for i, e in enumerate(experts):
        torch.sub(e, base, out=out[i])
    return out


def expand_weights(weights: Sequence[float] | torch.Tensor, ndim: int, like: torch.Tensor) -> torch.Tensor:
    """Weights shaped ``(N, 1, ..., 1)`` to broadcast over a stacked ``(N, *shape)`` tensor."""
    w = torch.as_tensor(weights, dtype=like.dtype, device=like.device)
    return w.reshape(-1, *([1] * ndim))
