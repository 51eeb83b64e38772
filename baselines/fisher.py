"""Fisher merging: each entry a mean of the experts' weights, weighted by their diagonal Fisher.

Matena and Raffel, "Merging Models with Fisher-Weighted Averaging" (NeurIPS 2022):
theta*_j = sum_i lambda_i F_i,j theta_i,j / sum_i lambda_i F_i,j, where F_i is expert i's
diagonal Fisher. The engine estimates F_i on validation texts of expert i's task
(:mod:`mergebench.engine.calibration`, the empirical Fisher: squared gradients of each
document's log-likelihood) and hands it to the kernel as ``ctx.aux["fisher"]``.
"""

from __future__ import annotations

import torch

from mergebench.baselines._calibrated import statistic
from mergebench.baselines._common import weights_for
from mergebench.methods import InputContract, Param, method
from mergebench.methods.calibration import CalibrationBudget, CalibrationNeed

__all__ = ["fisher_merging"]

FISHER_CITATION = (
    "M. Matena and C. Raffel. Merging Models with Fisher-Weighted Averaging. NeurIPS 2022 (arXiv:2111.09832)."
)

FISHER_BUDGET = CalibrationBudget(
    documents=256, max_tokens=256, seed=0,
    source="documents: FusionBench's fisher_merging.yaml num_fisher_examples = 256 (the paper leaves the "
    "sample count to the setting); max_tokens: mergebench's choice (embedded validation texts are shorter)",
)


@method(
    "fisher_merging",
    citation=FISHER_CITATION,
    paper="fisher_merging2022",
    params=[
        Param("fisher_floor", "float", 1e-6, ge=0.0,
              help="added to every Fisher value so entries no document moves still average (FusionBench's "
              "minimal_fisher_weight = 1e-6); equal floors keep equal-Fisher merges a plain mean"),
        Param("fisher_samples", "int", 256, ge=1,
              help="validation documents per task of each expert (FusionBench's num_fisher_examples = 256)"),
    ],
    contract=InputContract(base="unused", min_experts=1, weights_normalized=True, nonnegative_weights=True),
    calibration=CalibrationNeed(statistics=("fisher",), labels=True, budget=FISHER_BUDGET,
                                budget_params={"documents": "fisher_samples"}),
    granularity="tensor",
    properties={"idempotent", "order_invariant", "nonfinite_propagates"},
)
def fisher_merging(base, experts, weights, params, ctx):
    """Fisher-weighted mean: sum_i w_i (F_i + floor) theta_i / sum_i w_i (F_i + floor), per entry.

    ``ctx.aux["fisher"]`` holds one nonnegative tensor per expert, shaped like the tensor.
    Without it (a tensor the model has no parameter for) every F_i is 0 and the result is the
    weighted mean of the experts, the equal-Fisher case.
    """
    fisher = statistic(ctx, "fisher", len(experts))
    w = weights_for(weights, experts[0])
    floor = params["fisher_floor"]
    acc = torch.float64 if experts[0].dtype == torch.float64 else torch.float32
    num = torch.zeros(experts[0].shape, dtype=acc, device=experts[0].device)
    den = torch.zeros_like(num)
    for i, (e, c) in enumerate(zip(experts, w)):
        if fisher is None:
            f = torch.full_like(num, floor if floor > 0 else 1.0)
        else:
            if fisher[i].shape != e.shape:
                raise ValueError(f"{ctx.name}: Fisher of expert {i} has shape {tuple(fisher[i].shape)}, "
                                 f"the tensor {tuple(e.shape)}")
            f = fisher[i].to(device=e.device, dtype=acc) + floor
        num.addcmul_(f, e.to(acc), value=c)  # also at weight 0, so NaN/inf inputs stay visible
        den.add_(f, alpha=c)
    if floor == 0:  # entries no document moved have no Fisher weight at all: take the weighted mean there
        mean = sum(e.to(acc) * c for e, c in zip(experts, w)) / sum(w)
        return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), mean).to(experts[0].dtype)
    return (num / den).to(experts[0].dtype)
