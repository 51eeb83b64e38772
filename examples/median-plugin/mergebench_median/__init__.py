"""A complete third-party merge method: the element-wise median of task vectors.

The median ignores outlier experts element by element, a robust cousin of task arithmetic.
"""

import torch

from mergebench.methods import InputContract, Param, method


@method(
    "median",
    version="0.1.0",
    citation="Example plugin for mergebench (median of task vectors); see mergebench README.",
    params=[Param("lambda", "float", 1.0, help="scale of the merged task vector", ge=0.0)],
    contract=InputContract(base="required", min_experts=1, per_expert_weights=False),
    granularity="elementwise",
    properties={"identity_on_base", "idempotent", "order_invariant"},
)
def median(base, experts, weights, params, ctx):
    """Base plus lambda times the element-wise median of the task vectors."""
    deltas = torch.stack([e - base for e in experts])  # (N, *shape)
    ranked = deltas.sort(dim=0).values
    n = len(experts)
    median_delta = (ranked[(n - 1) // 2] + ranked[n // 2]) / 2  # mean of the two middles for even N
    merged = base + params["lambda"] * median_delta
    # sorting moves NaN/inf to the ends, where a median never looks: keep them visible
    return merged.masked_fill(~deltas.isfinite().all(dim=0), float("nan"))
