"""Arcee Fusion: keep only the expert's outlier-important changes (Arcee AI / mergekit, 2025)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mergebench.methods import InputContract, Param, method

__all__ = ["arcee_fusion", "fusion_importance", "tukey_threshold"]


def fusion_importance(expert: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|expert - base| times KL(softmax(expert row) || softmax(base row)), per element.

    Rows are the last dimension (a 1-D tensor is one row); the KL of a row multiplies every
    element of that row. Computed in float32 (float64 for float64 inputs) with log-softmax,
    so no smoothing constant is needed. Returns a ``(rows, cols)`` tensor.
    """
    acc = torch.float64 if expert.dtype == torch.float64 else torch.float32
    cols = expert.shape[-1] if expert.dim() > 0 else 1
    e = expert.reshape(-1, cols).to(acc)
    b = base.reshape(-1, cols).to(acc)
    log_p = F.log_softmax(e, dim=-1)
    log_q = F.log_softmax(b, dim=-1)
    log_q.neg_().add_(log_p)  # log p - log q, in log_q's buffer
    kl = (log_p.exp_() * log_q).sum(dim=-1, keepdim=True).clamp_min_(0.0)
    imp = torch.sub(e, b, out=log_p).abs_()  # reuse the buffer for |delta|
    return imp.mul_(kl)


def tukey_threshold(scores: torch.Tensor, k: float) -> torch.Tensor:
    """median + k * (Q3 - Q1), with exact order-statistic quantiles.

    The q-quantile is the element of rank floor(q (n - 1)) (0-based) in sorted order, the
    same "lower" rule as mergekit, but found with ``kthvalue`` on every element instead of
    on a random sample.
    """
    flat = scores.reshape(-1)
    n = flat.numel()

    def q(p: float) -> torch.Tensor:
        return torch.kthvalue(flat, int(math.floor(p * (n - 1))) + 1).values

    q1, med, q3 = q(0.25), q(0.5), q(0.75)
    return med + k * (q3 - q1)


@method(
    "arcee_fusion",
    citation=(
        "Arcee AI. Meet MergeKit v0.1: Arcee Fusion, expanded model support, multi-GPU acceleration. Blog post, "
        "2025. https://www.arcee.ai/blog/meet-mergekit-v0-1-arcee-fusion-expanded-model-support-multi-gpu-acceleration "
        "; implemented in C. Goddard, S. Siriwardhana, M. Ehghaghi, L. Meyers, V. Karpukhin, B. Benedict, "
        "M. McQuade and J. Solawetz. Arcee's MergeKit: A Toolkit for Merging Large Language Models. In Proceedings "
        "of EMNLP 2024: Industry Track, pp. 477-485, 2024."
    ),
    params=[
        Param(
            "tukey_k", "float", 1.5, ge=0.0,
            help="IQR multiple of the outlier fence median + k * IQR (mergekit hard-codes 1.5)",
        ),
    ],
    contract=InputContract(base="required", min_experts=1, max_experts=1, per_expert_weights=False),
    granularity="tensor",
    properties={"identity_on_base"},
)
def arcee_fusion(base, experts, weights, params, ctx):
    """Copy into the base only the expert's elements whose importance is an upper outlier.

    importance = |theta_e - theta_b| * KL(softmax(theta_e) || softmax(theta_b)), the KL
    taken per row (last dimension); threshold = median + tukey_k * IQR of the importances
    over the whole tensor (Tukey's fence); elements with importance >= threshold take the
    expert's value, all others keep the base's. 1-D tensors are a single row, so their
    importance is |delta| scaled by one constant and the fence acts on |delta| alone.
    If at least three quarters of the importances are zero (e.g. the expert equals the
    base, or differs by a constant per row, to which softmax is blind) the threshold is 0
    and every element is taken, as in mergekit.

    Written independently from the blog description and mergekit 0.1.5's behaviour.
    Differences from mergekit: exact quantiles over all elements (mergekit sorts a random
    sample of 10^6 elements drawn from the global RNG when a tensor is larger); KL from
    log-softmax in float32 without mergekit's 1e-8 smoothing; selected elements are copied
    (``where``) rather than recomputed as base + delta in the loaded dtype; the fence
    multiple is a parameter.
    """
    expert = experts[0]
    if expert.shape != base.shape:
        raise ValueError(f"{ctx.name}: expert has shape {tuple(expert.shape)}, the base has {tuple(base.shape)}")
    if base.numel() == 0:
        return base.clone()
    importance = fusion_importance(expert, base)
    mask = importance >= tukey_threshold(importance, params["tukey_k"])
    return torch.where(mask.reshape(base.shape), expert, base)
