"""RegMean: merge each linear layer so its outputs match every expert's on the expert's own inputs.

Jin, Ren, Preotiuc-Pietro and Cheng, "Dataless Knowledge Fusion by Merging Weights of Language
Models" (ICLR 2023). For a linear layer y = x W^T with expert weights W_i and input Gram
matrices G_i = X_i^T X_i, the merged W minimises sum_i ||X_i W^T - X_i W_i^T||^2:

    W = (sum_i W_i G~_i) (sum_i G~_i)^-1,   G~_i = alpha G_i + (1 - alpha) diag(G_i)

where alpha scales the off-diagonal entries of the Gram matrices (the paper's regulariser
towards the plain mean: alpha = 0 gives a per-input-feature weighted mean). Every other tensor
(embeddings, norms, biases) is averaged. The engine computes G_i on validation texts of expert
i's task (:mod:`mergebench.engine.calibration`) and passes it in ``ctx.aux["gram"]``.
"""

from __future__ import annotations

import torch

from mergebench.baselines._calibrated import statistic
from mergebench.baselines._common import weighted_sum, weights_for
from mergebench.methods import InputContract, Param, method
from mergebench.methods.calibration import CalibrationBudget, CalibrationNeed

__all__ = ["regmean", "regmean_solution"]

REGMEAN_CITATION = (
    "X. Jin, X. Ren, D. Preotiuc-Pietro and P. Cheng. Dataless Knowledge Fusion by Merging Weights of "
    "Language Models. ICLR 2023 (arXiv:2212.09849)."
)

REGMEAN_BUDGET = CalibrationBudget(
    documents=256, max_tokens=256, seed=0,
    source="documents: FusionBench's regmean.yaml num_regmean_examples = 256; max_tokens: mergebench's choice",
)


def regmean_solution(weights_list, grams, coeffs, alpha: float) -> torch.Tensor:
    """``(sum_i c_i W_i G~_i)(sum_i c_i G~_i)^-1`` in float64, for ``(out, in)`` weights and ``(in, in)`` Grams.

    Input features no expert's Gram touches (a zero row and column of the sum) are not
    constrained by the objective; they get the weighted mean of the experts' columns.
    """
    a = None
    b = None
    for w_i, g_i, c in zip(weights_list, grams, coeffs):
        g = g_i.to(torch.float64)
        g = alpha * g + (1.0 - alpha) * torch.diag(torch.diagonal(g))
        term = w_i.to(torch.float64) @ g
        a = g * c if a is None else a.add_(g, alpha=c)
        b = term * c if b is None else b.add_(term, alpha=c)
    free = torch.diagonal(a) == 0
    if bool(free.any()):
        total = float(sum(coeffs))
        mean = sum(w_i.to(torch.float64) * c for w_i, c in zip(weights_list, coeffs)) / total
        idx = torch.nonzero(free).flatten()
        a[idx, idx] = total
        b[:, idx] = mean[:, idx] * total
    return torch.linalg.solve(a, b.T).T  # a is symmetric: W^T = a^-1 b^T


@method(
    "regmean",
    citation=REGMEAN_CITATION,
    paper="regmean2023",
    params=[
        Param("alpha", "float", 0.1, ge=0.0, le=1.0,
              help="scale of the Gram matrices' off-diagonal entries (the RegMean paper's alpha, tuned there per "
              "setting; 0.1 is FusionBench's regmean.yaml reduce_non_diagonal_ratio); 1 = the exact least-squares "
              "solution"),
        Param("regmean_samples", "int", 256, ge=1,
              help="validation documents per task of each expert (FusionBench's num_regmean_examples = 256)"),
    ],
    contract=InputContract(base="unused", min_experts=1, weights_normalized=True, nonnegative_weights=True),
    calibration=CalibrationNeed(statistics=("gram",), labels=True, budget=REGMEAN_BUDGET,
                                budget_params={"documents": "regmean_samples"}),
    granularity="matrix",
    properties={"idempotent", "order_invariant", "nonfinite_propagates"},
)
def regmean(base, experts, weights, params, ctx):
    """RegMean: closed-form least-squares merge of each linear layer from its input Gram matrices.

    2-D tensors with a Gram matrix in ``ctx.aux["gram"]`` (``(in, in)`` per expert) are solved
    in float64; every other tensor (1-D, embeddings, no Gram) is the weighted mean
    sum_i w_i theta_i / sum_i w_i. With identity Grams the solution is that mean too.
    """
    w = weights_for(weights, experts[0])
    grams = statistic(ctx, "gram", len(experts))
    if grams is None or experts[0].dim() != 2:
        total = sum(w)
        return weighted_sum(experts, [c / total for c in w])
    fan_in = experts[0].shape[1]
    for i, g in enumerate(grams):
        if tuple(g.shape) != (fan_in, fan_in):
            raise ValueError(f"{ctx.name}: Gram matrix of expert {i} has shape {tuple(g.shape)}, "
                             f"the layer has {fan_in} inputs")
    grams = [g.to(experts[0].device) for g in grams]
    return regmean_solution(experts, grams, w, params["alpha"]).to(experts[0].dtype)
