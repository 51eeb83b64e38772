"""Linear averaging / model soup (Wortsman et al., 2022; "LA" in the merging-collapse study)."""

from __future__ import annotations

from mergebench.baselines._common import merge_weights, weighted_sum
from mergebench.methods import InputContract, Param, method


@method(
    "linear",
    citation="Wortsman et al., 2022. Model soups: averaging weights of multiple fine-tuned models improves accuracy without increasing inference time. ICML.",
    paper="model_soups2022",
    params=[Param("normalize", "bool", True, help="divide by the sum of weights (a weighted mean)")],
    contract=InputContract(base="unused", min_experts=1, weights_normalized="normalize"),
    granularity="elementwise",
    properties={"idempotent", "order_invariant", "nonfinite_propagates"},
)
def linear(base, experts, weights, params, ctx):
    """Weighted average of the experts' weights: sum_i w_i theta_i / sum_i w_i."""
    return weighted_sum(experts, merge_weights(weights, experts[0], params["normalize"], f"{ctx.name}: linear"))
