"""Arcee Fusion: keep only the expert's outlier-important changes (Arcee AI / mergekit, 2025)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mergebench.methods import InputContract, Param, method

__all__ = ["arcee_fusion", "fusion_importance", "row_kl", "tukey_threshold"]


_KL_BLOCK = 1 << 20  # elements per block of rows for the float64 KL (bounds its scratch memory)


def row_kl(expert: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """KL(softmax(expert row) || softmax(base row)) per row, float64, shaped ``(rows, 1)``.

    Rows are the last dimension (a 1-D tensor is one row). Computed from log-softmax in
    float64, in blocks of about 1M elements. A KL within rounding noise of zero is returned as
    exactly 0, so rows that differ by a constant (to which softmax is blind) give 0 on every
    CPU: in float32 such rows come out around 1e-8, and whether "three quarters of the
    importances are zero" fired used to depend on the vector unit. The noise bound is
    ``16 eps64 (m + log(cols) + 1)`` (float64 log-softmax rounding, m = the row's largest
    |value|) plus ``(4 eps m)^2 / 2`` (the KL of a few-ulp perturbation of a constant shift in
    the input dtype, eps its machine epsilon); a genuine change of relative size d has a KL
    of order d^2 / 2, far above both for any real fine-tune. NaN/inf inputs give a NaN KL.
    """
    cols = expert.shape[-1] if expert.dim() > 0 else 1
    e = expert.reshape(-1, cols)
    b = base.reshape(-1, cols)
    rows = e.shape[0]
    eps_in = torch.finfo(expert.dtype).eps
    floor = 16 * torch.finfo(torch.float64).eps
    kl = torch.empty((rows, 1), dtype=torch.float64, device=expert.device)
    step = max(1, _KL_BLOCK // max(cols, 1))
    for r0 in range(0, rows, step):
        x = e[r0 : r0 + step].to(torch.float64)
        y = b[r0 : r0 + step].to(torch.float64)
        log_p = F.log_softmax(x, dim=-1)
        log_q = F.log_softmax(y, dim=-1)
        log_q.neg_().add_(log_p)  # log p - log q, in log_q's buffer
        k = (log_p.exp_() * log_q).sum(dim=-1, keepdim=True)
        m = torch.maximum(x.abs().amax(-1, keepdim=True), y.abs().amax(-1, keepdim=True))
        tol = floor * (m + math.log(cols) + 1.0) + 0.5 * (4.0 * eps_in * m) ** 2
        kl[r0 : r0 + step] = k.masked_fill_(k <= tol, 0.0)  # NaN stays NaN (NaN <= tol is False)
    return kl


def fusion_importance(expert: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|expert - base| times KL(softmax(expert row) || softmax(base row)), per element.

    Rows are the last dimension (a 1-D tensor is one row); the KL of a row (:func:`row_kl`,
    float64, exactly 0 within rounding noise) multiplies every element of that row. Returned
    as a ``(rows, cols)`` tensor in float32 (float64 for float64 inputs).
    """
    acc = torch.float64 if expert.dtype == torch.float64 else torch.float32
    cols = expert.shape[-1] if expert.dim() > 0 else 1
    kl = row_kl(expert, base).to(acc)
    imp = torch.sub(expert.reshape(-1, cols).to(acc), base.reshape(-1, cols).to(acc)).abs_()
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
    paper="arcee_fusion2025",
    related_papers=("mergekit2024",),
    params=[
        Param(
            "tukey_k", "float", 1.5, ge=0.0,
            help="IQR multiple of the outlier fence median + k * IQR (mergekit hard-codes 1.5)",
        ),
    ],
    contract=InputContract(base="required", min_experts=1, max_experts=1, per_expert_weights=False),
    granularity="tensor",
    properties={"identity_on_base", "nonfinite_propagates"},
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
    and every element is taken, as in mergekit. "Zero" is decided with a tolerance (a KL
    within float64 rounding noise, or within the KL of a few-ulp perturbation, is 0; see
    :func:`row_kl`), so the rule fires identically on every CPU.

    Non-finite inputs are never hidden: an element where the expert or the base is NaN/inf
    comes out non-finite (their sum), whichever side the fence picked.

    Written independently from the blog description and mergekit 0.1.5's behaviour.
    Differences from mergekit: exact quantiles over all elements (mergekit sorts a random
    sample of 10^6 elements drawn from the global RNG when a tensor is larger); KL from
    log-softmax in float64 without mergekit's 1e-8 smoothing; selected elements are copied
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
    out = torch.where(mask.reshape(base.shape), expert, base)
    if not bool(torch.isfinite(importance).all()):  # a NaN/inf input: keep it visible
        out = torch.where(torch.isfinite(expert) & torch.isfinite(base), out, expert + base)
    return out
