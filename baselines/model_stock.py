"""Model Stock (Jang et al., 2024; as written in the in-the-wild merging study, eq. 4)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergebench.methods import InputContract, Param, method

__all__ = ["THETA_MODES", "model_stock", "model_stock_t"]

_CHUNK = 1 << 20  # elements per expert per block: bounds scratch memory to N * _CHUNK
_SINGULAR = 1e-6  # |1 + (N-1) cos| below this: no finite t (mergekit's threshold)
THETA_MODES = ("mean_angle", "mean_cosine")


def model_stock_t(cos: torch.Tensor, n: int) -> torch.Tensor:
    """t = N cos / (1 + (N-1) cos), and t = 0 (keep the base) where the denominator vanishes."""
    den = 1.0 + (n - 1) * cos
    singular = den.abs() < _SINGULAR
    return torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(den), den))


def _mean_pairwise_cos(gram: torch.Tensor, theta: str = "mean_angle") -> torch.Tensor:
    """cos(theta) for a batch of Gram matrices (..., N, N) of task vectors.

    ``mean_angle``: theta is the mean over pairs i < j of the angle
    arccos(G_ij / sqrt(G_ii G_jj)) (the in-the-wild study's "mean inter-model angle").
    ``mean_cosine``: cos(theta) is the mean of the pairwise cosines (mergekit). The two agree
    for N = 2. A pair involving a zero task vector has cosine 0 (angle pi/2). With one expert
    there are no pairs: cos(theta) is taken as 1, so t = 1 and the result is that expert.
    """
    n = gram.shape[-1]
    if n == 1:
        return torch.ones(gram.shape[:-2], dtype=gram.dtype, device=gram.device)
    norms = torch.diagonal(gram, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    den = norms.unsqueeze(-1) * norms.unsqueeze(-2)
    cos = torch.where(den > 0, gram / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))
    iu = torch.triu_indices(n, n, 1, device=gram.device)
    pairs = cos[..., iu[0], iu[1]].clamp(-1.0, 1.0)
    if theta == "mean_cosine":
        return pairs.mean(-1)
    if theta != "mean_angle":
        raise ValueError(f"unknown Model Stock theta {theta!r}; use one of {', '.join(THETA_MODES)}")
    return torch.cos(torch.acos(pairs).mean(-1))


def _layerwise(base: torch.Tensor, experts: Sequence[torch.Tensor], acc: torch.dtype, theta: str) -> torch.Tensor:
    """One t for the whole tensor; streamed in blocks so scratch stays at N * _CHUNK elements."""
    n, d = len(experts), base.numel()
    b = base.reshape(-1)
    flat = [e.reshape(-1) for e in experts]
    out = torch.empty(d, dtype=acc, device=base.device)  # mean task vector, then the result
    buf = torch.empty((n, min(_CHUNK, d)), dtype=acc, device=base.device)
    gram = torch.zeros((n, n), dtype=torch.float64, device=base.device)
    for s in range(0, d, _CHUNK):
        e_ = min(s + _CHUNK, d)
        block = buf[:, : e_ - s]
        for i, f in enumerate(flat):
            block[i].copy_(f[s:e_])
            block[i].sub_(b[s:e_])  # differences in acc dtype: task vectors are small
        gram += (block @ block.T).to(torch.float64)
        torch.mean(block, dim=0, out=out[s:e_])
    t = model_stock_t(_mean_pairwise_cos(gram, theta), n).to(acc)
    # t W_avg + (1 - t) W_0 = W_0 + t (W_avg - W_0)
    return out.mul_(t).add_(b)


def _filterwise(base: torch.Tensor, experts: Sequence[torch.Tensor], acc: torch.dtype, theta: str) -> torch.Tensor:
    """One t per row (last dimension); 1-D tensors are one row. Streamed over row blocks."""
    n = len(experts)
    cols = base.shape[-1] if base.dim() > 0 else 1
    rows = base.numel() // max(cols, 1)
    b = base.reshape(rows, cols)
    mats = [e.reshape(rows, cols) for e in experts]
    out = torch.empty((rows, cols), dtype=acc, device=base.device)
    step = max(1, _CHUNK // max(cols, 1))
    buf = torch.empty((n, min(step, rows), cols), dtype=acc, device=base.device)
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        block = buf[:, : r1 - r0]
        for i, mat in enumerate(mats):
            block[i].copy_(mat[r0:r1])
            block[i].sub_(b[r0:r1])
        gram = torch.einsum("irc,jrc->rij", block, block).to(torch.float64)  # (rows, N, N)
        t = model_stock_t(_mean_pairwise_cos(gram, theta), n).to(acc)
        torch.mean(block, dim=0, out=out[r0:r1])
        out[r0:r1].mul_(t.unsqueeze(-1)).add_(b[r0:r1])
    return out


@method(
    "model_stock",
    citation=(
        "D.-H. Jang, S. Yun and D. Han. Model Stock: All we need is just a few fine-tuned models. "
        "In European Conference on Computer Vision (ECCV), 2024. arXiv:2403.19522. "
        "As written in: A Systematic Study of In-the-Wild Model Merging for Large Language Models "
        "(anonymous, under review), eq. 4."
    ),
    paper="model_stock2024",
    related_papers=("inthewild",),
    version="2.0",
    params=[
        Param("filter_wise", "bool", False, help="one t per row (last dimension) instead of one per tensor (mergekit)"),
        Param(
            "theta", "str", "mean_angle", choices=THETA_MODES,
            help="'mean_angle': theta = mean pairwise angle of the task vectors (the in-the-wild study, eq. 4); "
            "'mean_cosine': cos(theta) = mean pairwise cosine (mergekit)",
        ),
    ],
    contract=InputContract(base="required", min_experts=2, per_expert_weights=False),
    granularity="tensor",
    properties={"identity_on_base", "idempotent", "order_invariant", "nonfinite_propagates"},
)
def model_stock(base, experts, weights, params, ctx):
    """Interpolate between the base and the experts' average by the Model Stock ratio.

    With task vectors delta_i = W_i - W_0 and theta the mean inter-model angle, the mean over
    pairs i < j of angle(delta_i, delta_j) (per tensor, or per row with ``filter_wise``):
    t = N cos(theta) / (1 + (N-1) cos(theta)) and W = t W_avg + (1 - t) W_0 (the in-the-wild
    merging study, eq. 4). ``theta="mean_cosine"`` uses the mean of the pairwise cosines for
    cos(theta) instead, as mergekit does; the two agree for N = 2 and differ for N >= 3 (the
    cosine of a mean angle is not the mean cosine). Unweighted, like the paper and mergekit.
    1-D tensors are one vector (one row when filter-wise).

    Degenerate cases: a pair with a zero task vector has cosine 0, angle pi/2 (so all-zero
    task vectors give the base); where 1 + (N-1) cos is within 1e-6 of zero, t = 0 (mergekit's
    rule); N = 1 (allowed only when the kernel is called directly) gives t = 1, the expert.
    Negative mean cosines give t < 0, i.e. a step away from the average, exactly as the
    formula and mergekit do; nothing is clipped.

    Differences from mergekit 0.1.5: the mean angle (above; ``theta="mean_cosine"`` is
    mergekit's rule); cosines of task vectors whose norm product is below
    1e-6 are exact here (mergekit clamps the product at 1e-6, which shrinks them toward 0),
    and differences and Gram sums are accumulated in float32/float64 rather than the
    loaded dtype.
    """
    shape, dtype = base.shape, base.dtype
    for i, e in enumerate(experts):
        if e.shape != shape:
            raise ValueError(f"{ctx.name}: expert {i} has shape {tuple(e.shape)}, the base has {tuple(shape)}")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if base.numel() == 0:
        return base.clone()
    theta = params.get("theta", "mean_angle")
    out = _filterwise(base, experts, acc, theta) if params["filter_wise"] else _layerwise(base, experts, acc, theta)
    return out.reshape(shape).to(dtype)
