"""The task-vector family: task arithmetic, TIES, DARE, DELLA, Model Breadcrumbs and SCE.

Every method here works on task vectors ``delta_i = theta_i - theta_0`` (so it needs the
base model), optionally sparsifies each of them, optionally elects one sign per element
(TIES), and adds the combination back to the base:

    theta = theta_0 + lambda * combine_i(alpha_i * sparsify(delta_i))

Parameter names and defaults follow mergekit 0.1.5 (``density``, ``gamma``, ``epsilon``,
``lambda``, ``normalize``, ``select_topk``); the choices ``consensus`` and ``rescale`` are
mergebench's (see each method). ``density`` defaults to 1.0 as in mergekit, which disables
sparsification: set it (e.g. 0.1 as in the in-the-wild merging study's TIES runs) to get the sparse method.

Sparsification treats every tensor alike, 1-D norms and embeddings included (mergekit
does the same): top-k / windows / variance selection pool the whole tensor; DELLA ranks
within rows (first axis), a 1-D tensor being one row. Memory: linear variants keep two
tensor-sized buffers; sign-elected variants keep one stacked copy of the N task vectors
plus a few tensor-sized buffers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from mergebench.baselines._common import task_vectors, weights_for
from mergebench.baselines._sparsify import (
    dare_,
    della_,
    elect_sign,
    keep_count,
    magnitude_trim_,
    magnitude_window_,
    top_k_mask,
)
from mergebench.methods import InputContract, Param, ParameterError, method

__all__ = [
    "breadcrumbs",
    "breadcrumbs_ties",
    "dare_linear",
    "dare_ties",
    "della_linear",
    "della_ties",
    "sce",
    "task_arithmetic",
    "ties",
]

# ----------------------------------------------------------------------------- citations

TA_CITATION = (
    "Gabriel Ilharco, Marco Tulio Ribeiro, Mitchell Wortsman, Suchin Gururangan, Ludwig Schmidt, "
    "Hannaneh Hajishirzi, and Ali Farhadi. Editing Models with Task Arithmetic. ICLR 2023. arXiv:2212.04089."
)
TIES_CITATION = (
    "Prateek Yadav, Derek Tam, Leshem Choshen, Colin Raffel, and Mohit Bansal. TIES-Merging: Resolving "
    "Interference When Merging Models. NeurIPS 2023. arXiv:2306.01708."
)
DARE_CITATION = (
    "Le Yu, Bowen Yu, Haiyang Yu, Fei Huang, and Yongbin Li. Language Models are Super Mario: Absorbing "
    "Abilities from Homologous Models as a Free Lunch. ICML 2024. arXiv:2311.03099."
)
DELLA_CITATION = (
    "Pala Tej Deep, Rishabh Bhardwaj, and Soujanya Poria. DELLA-Merging: Reducing Interference in Model "
    "Merging through Magnitude-Based Sampling. arXiv:2406.11617, 2024."
)
BREADCRUMBS_CITATION = (
    "MohammadReza Davari and Eugene Belilovsky. Model Breadcrumbs: Scaling Multi-Task Model Merging with "
    "Sparse Masks. ECCV 2024. arXiv:2312.06795."
)
SCE_CITATION = (
    "Fanqi Wan, Longguang Zhong, Ziyi Yang, Ruijun Chen, and Xiaojun Quan. FuseChat: Knowledge Fusion of "
    "Chat Models (FuseChat-2.0 technical report, SCE merging). arXiv:2408.07990, 2024."
)
_WITH_TIES = " Sign election and disjoint merge: " + TIES_CITATION

# ----------------------------------------------------------------------------- parameters

LAMBDA = Param("lambda", "float", 1.0, help="scale of the merged task vector (lambda in theta_0 + lambda * delta)")
DENSITY = Param(
    "density", "float", 1.0, ge=0.0, le=1.0, per_expert=True,
    help="fraction of each task vector's entries kept (1.0 = no sparsification); per expert allowed",
)
KEEP_PROB = Param(
    "density", "float", 1.0, ge=0.0, le=1.0, per_expert=True,
    help="keep probability p (drop rate 1 - p; 1.0 = nothing dropped); per expert allowed",
)
GAMMA = Param(
    "gamma", "float", 0.01, ge=0.0, le=1.0, per_expert=True,
    help="fraction of largest-magnitude entries removed as outliers (shrunk if gamma + density > 1)",
)
EPSILON = Param(
    "epsilon", "float", 0.15, ge=0.0, le=0.5, per_expert=True,
    help="half-width of the keep-probability window [density - epsilon, density + epsilon]",
)
CONSENSUS = Param(
    "consensus", "str", "sum", choices=("sum", "count"),
    help="sign election: 'sum' = sign of the weighted sum (TIES paper, mergekit), 'count' = majority of signs",
)
# "none" is how a null is spelled on the command line (Param.coerce maps it to None), so
# "no rescaling" is the null value rather than a third choice.
RESCALE_RANDOM = Param(
    "rescale", "str", "paper", choices=("paper", "l1"), nullable=True,
    help="survivor rescaling: 'paper' = divide by the keep probability, 'l1' = restore the L1 norm "
    "(mergekit's rescale: true), none/null = no rescaling",
)
RESCALE_DET = Param(
    "rescale", "str", None, choices=("l1",), nullable=True,
    help="'l1' rescales the sparsified task vector to its original L1 norm (mergekit's rescale: true); none/null = off",
)
SELECT_TOPK = Param(
    "select_topk", "float", 1.0, ge=0.0, le=1.0,
    help="fraction of entries (by variance across experts, among those with nonzero variance) kept",
)


def _normalize(default: bool, what: str) -> Param:
    return Param("normalize", "bool", default, help=what)


_NORM_LINEAR = "divide the weighted sum by the sum of the weights (a weighted mean)"
_NORM_TIES = "divide each entry by the summed weights of the experts that agree with the elected sign there"

CONTRACT = InputContract(base="required", min_experts=1)
CONTRACT_MEAN = InputContract(base="required", min_experts=1, weights_normalized="normalize")
"""Linear-family contract: with ``normalize`` the kernel divides by the sum of the weights."""

# ----------------------------------------------------------------------------- helpers

Sparsifier = Callable[[torch.Tensor, int], Any]


def _per_expert(params: dict, name: str, n: int, method_name: str) -> list[float]:
    """A per-expert parameter as a list of n floats (the engine passes a tuple; a direct
    kernel call may pass a scalar)."""
    value = params[name]
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ParameterError(f"method {method_name!r}: parameter {name!r} has {len(value)} per-expert values for {n} experts")
        return [float(v) for v in value]
    return [float(value)] * n


def _check_della_window(dens: list[float], eps: list[float], method_name: str) -> None:
    for i, (p, e) in enumerate(zip(dens, eps)):
        if 0 < p < 1 and e > min(p, 1 - p) + 1e-12:
            raise ParameterError(
                f"method {method_name!r}: parameter 'epsilon' ({e}) must be <= min(density, 1 - density) = "
                f"{min(p, 1 - p):.6g} for expert {i} (density {p}), so keep probabilities stay within [0, 1]"
            )


def _validate_della(name: str):
    """Cross-parameter check for the DELLA methods, run by ``validate_params`` before any
    tensor is read (the kernel repeats it for direct calls)."""

    def validate(params: dict[str, Any], n_experts: int | None) -> dict[str, Any]:
        dens, eps = params["density"], params["epsilon"]
        n = n_experts or max(len(v) if isinstance(v, tuple) else 1 for v in (dens, eps))
        _check_della_window(_per_expert(params, "density", n, name), _per_expert(params, "epsilon", n, name), name)
        return params

    return validate


def _linear_merge(base, experts, weights, lam: float, normalize: bool, ctx, sparsify: Sparsifier | None = None):
    """theta_0 + lam * sum_i w_i s(delta_i) [/ sum_i w_i], with two tensor-sized buffers."""
    w = weights_for(weights, base)
    scale = lam
    if normalize:
        total = sum(w)
        if total == 0:
            raise ValueError(f"{ctx.name}: merge weights sum to zero; cannot normalize (set normalize=false)")
        scale = lam / total
    acc = torch.zeros_like(base)
    tmp = torch.empty_like(base)
    for i, (e, c) in enumerate(zip(experts, w)):
        torch.sub(e, base, out=tmp)
        if sparsify is not None:
            sparsify(tmp, i)  # even at weight 0, so random draws do not depend on the weights
        acc.add_(tmp, alpha=c)  # also at weight 0: adds nothing, but NaN/inf inputs stay visible
    return acc.mul_(scale).add_(base)


def _disjoint_merge(stack: torch.Tensor, merge_w: Sequence[float], elect_w: Sequence[float], consensus: str, normalize: bool) -> torch.Tensor:
    """TIES steps 2-3 on stacked (already sparsified) task vectors.

    Elect one sign per entry from ``elect_w[i] * stack[i]``; expert i contributes
    ``merge_w[i] * stack[i]`` where ``sign(elect_w[i] * stack[i])`` equals the elected sign
    (zeros never agree); with ``normalize`` each entry is divided by the summed
    ``merge_w`` of its agreeing experts (entries where none agree get 0).
    """
    sgn = elect_sign(stack, list(elect_w), consensus)
    mixed = torch.zeros_like(stack[0])
    divisor = torch.zeros_like(stack[0]) if normalize else None
    agree = torch.empty_like(stack[0])
    for d, c, e in zip(stack, merge_w, elect_w):
        if c == 0 or e == 0:
            mixed.add_(d, alpha=0.0)  # contributes nothing, but NaN/inf inputs stay visible
            continue
        torch.mul(d, sgn, out=agree)
        (agree.gt_ if e > 0 else agree.lt_)(0)  # in place: 1.0 where sign(e * d) == elected sign
        mixed.addcmul_(d, agree, value=c)
        if divisor is not None:
            divisor.add_(agree, alpha=c)
    del sgn, agree
    if divisor is not None:
        divisor.masked_fill_(divisor == 0, 1.0)
        mixed.div_(divisor)
    return mixed


def _ties_merge(base, experts, weights, lam: float, normalize: bool, consensus: str, ctx, sparsify: Sparsifier | None = None):
    """Sparsify each delta in a stacked copy, then elect signs from the weighted deltas and
    disjoint-merge (mergekit's weighting: the election sees alpha_i * delta_i)."""
    w = weights_for(weights, base)
    stack = task_vectors(base, experts)
    if sparsify is not None:
        for i in range(len(experts)):
            sparsify(stack[i], i)
    mixed = _disjoint_merge(stack, w, w, consensus, normalize)
    del stack
    return mixed.mul_(lam).add_(base)


def _magnitude_sparsifier(params, n, name) -> Sparsifier:
    dens = _per_expert(params, "density", n, name)
    rescale = params["rescale"]
    return lambda d, i: magnitude_trim_(d, dens[i], rescale)


def _dare_sparsifier(params, n, name, ctx) -> Sparsifier:
    dens = _per_expert(params, "density", n, name)
    rescale = params["rescale"]
    return lambda d, i: dare_(d, dens[i], ctx.generator, rescale)


def _della_sparsifier(params, n, name, ctx) -> Sparsifier:
    dens = _per_expert(params, "density", n, name)
    eps = _per_expert(params, "epsilon", n, name)
    _check_della_window(dens, eps, name)
    rescale = params["rescale"]
    return lambda d, i: della_(d, dens[i], eps[i], ctx.generator, rescale)


def _breadcrumbs_sparsifier(params, n, name) -> Sparsifier:
    dens = _per_expert(params, "density", n, name)
    gam = _per_expert(params, "gamma", n, name)
    rescale = params["rescale"]
    return lambda d, i: magnitude_window_(d, dens[i], gam[i], rescale)


# ----------------------------------------------------------------------------- methods


@method(
    "task_arithmetic",
    citation=TA_CITATION + " Normalized form: the in-the-wild merging study, App. C, eq. 12.",
    paper="task_arithmetic2023",
    related_papers=("inthewild",),
    params=[LAMBDA, _normalize(False, _NORM_LINEAR)],
    contract=CONTRACT_MEAN,
    granularity="elementwise",
    properties={"identity_on_base", "order_invariant", "nonfinite_propagates"},
)
def task_arithmetic(base, experts, weights, params, ctx):
    """Task arithmetic: theta_0 + lambda * sum_i alpha_i (theta_i - theta_0), optionally / sum_i alpha_i.

    The in-the-wild merging study eq. 2; ``normalize`` gives App. C eq. 12 (mergekit's default is off, the in-the-wild merging study
    ran with it on). A zero weight sum with ``normalize`` is an error, not silently 1.
    """
    return _linear_merge(base, experts, weights, params["lambda"], params["normalize"], ctx)


@method(
    "ties",
    citation=TIES_CITATION,
    paper="ties2023",
    params=[DENSITY, LAMBDA, _normalize(True, _NORM_TIES), CONSENSUS, RESCALE_DET],
    contract=CONTRACT,
    properties={"identity_on_base", "order_invariant", "idempotent", "nonfinite_propagates"},
)
def ties(base, experts, weights, params, ctx):
    """TIES-Merging: trim each task vector to its top-density entries by magnitude, elect signs, disjoint-merge.

    Trim keeps exactly ``max(1, floor(density * numel))`` entries per tensor (ties broken
    by index); the election uses the weighted trimmed deltas; with ``normalize`` each entry
    is divided by the summed weights of the agreeing experts (the paper's disjoint mean).
    Idempotent only at density 1 (the default): trimming shrinks a lone task vector.
    """
    sp = _magnitude_sparsifier(params, len(experts), "ties")
    return _ties_merge(base, experts, weights, params["lambda"], params["normalize"], params["consensus"], ctx, sp)


@method(
    "dare_linear",
    citation=DARE_CITATION,
    paper="dare2024",
    params=[KEEP_PROB, LAMBDA, _normalize(False, _NORM_LINEAR), RESCALE_RANDOM],
    contract=CONTRACT_MEAN,
    stochastic=True,
    properties={"identity_on_base", "nonfinite_propagates"},
)
def dare_linear(base, experts, weights, params, ctx):
    """DARE + task arithmetic: drop each delta entry with probability 1 - density, rescale, add.

    ``rescale='paper'`` multiplies survivors by 1/density, so E[result] equals task
    arithmetic; 'l1' is mergekit's L1-norm restoration. Masks come from ctx.generator,
    one uniform draw per entry per expert with density < 1, experts in order.
    """
    sp = _dare_sparsifier(params, len(experts), "dare_linear", ctx)
    return _linear_merge(base, experts, weights, params["lambda"], params["normalize"], ctx, sp)


@method(
    "dare_ties",
    citation=DARE_CITATION + _WITH_TIES,
    paper="dare2024",
    related_papers=("ties2023",),
    params=[KEEP_PROB, LAMBDA, _normalize(False, _NORM_TIES), CONSENSUS, RESCALE_RANDOM],
    contract=CONTRACT,
    stochastic=True,
    properties={"identity_on_base", "nonfinite_propagates"},
)
def dare_ties(base, experts, weights, params, ctx):
    """DARE drop-and-rescale on each task vector, then TIES sign election and disjoint merge.

    ``normalize`` defaults to off, as in mergekit.
    """
    sp = _dare_sparsifier(params, len(experts), "dare_ties", ctx)
    return _ties_merge(base, experts, weights, params["lambda"], params["normalize"], params["consensus"], ctx, sp)


@method(
    "della_linear",
    citation=DELLA_CITATION,
    paper="della2024",
    params=[KEEP_PROB, EPSILON, LAMBDA, _normalize(False, _NORM_LINEAR), RESCALE_RANDOM],
    contract=CONTRACT_MEAN,
    stochastic=True,
    validate=_validate_della("della_linear"),
    properties={"identity_on_base", "nonfinite_propagates"},
)
def della_linear(base, experts, weights, params, ctx):
    """DELLA MagPrune (magnitude-ranked keep probabilities in [p - eps, p + eps]) then task arithmetic.

    Within each row (first axis; a 1-D tensor is one row, an embedding's row is one token)
    entries are ranked by |delta| and kept with probability rising linearly from p - eps
    (smallest) to p + eps (largest); 'paper' rescales each survivor by 1/p_i.
    ``epsilon <= min(density, 1 - density)`` is required when 0 < density < 1. The window
    [p - eps, p + eps] is mergekit's; the paper spreads its probabilities over a window of
    total width eps, i.e. its eps is twice this one.
    """
    sp = _della_sparsifier(params, len(experts), "della_linear", ctx)
    return _linear_merge(base, experts, weights, params["lambda"], params["normalize"], ctx, sp)


@method(
    "della_ties",
    citation=DELLA_CITATION + _WITH_TIES,
    paper="della2024",
    related_papers=("ties2023",),
    params=[KEEP_PROB, EPSILON, LAMBDA, _normalize(True, _NORM_TIES), CONSENSUS, RESCALE_RANDOM],
    contract=CONTRACT,
    stochastic=True,
    validate=_validate_della("della_ties"),
    properties={"identity_on_base", "idempotent", "nonfinite_propagates"},
)
def della_ties(base, experts, weights, params, ctx):
    """DELLA: MagPrune each task vector, elect signs, disjoint-merge (mergekit's 'della').

    Same pruning as della_linear; ``normalize`` defaults to on, as in mergekit. Idempotent
    only at density 1 (the default), where nothing is dropped.
    """
    sp = _della_sparsifier(params, len(experts), "della_ties", ctx)
    return _ties_merge(base, experts, weights, params["lambda"], params["normalize"], params["consensus"], ctx, sp)


@method(
    "breadcrumbs",
    citation=BREADCRUMBS_CITATION,
    paper="breadcrumbs2024",
    params=[DENSITY, GAMMA, LAMBDA, _normalize(False, _NORM_LINEAR), RESCALE_DET],
    contract=CONTRACT_MEAN,
    properties={"identity_on_base", "order_invariant", "nonfinite_propagates"},
)
def breadcrumbs(base, experts, weights, params, ctx):
    """Model Breadcrumbs: drop the largest-gamma and the smallest entries of each task vector, keep density, add.

    Per tensor: the top ``floor(gamma * n)`` entries by |delta| are removed as outliers and
    the next ``floor(density * n)`` kept; if gamma + density > 1 the outlier cut shrinks
    (mergekit's rule); density 1 keeps everything.
    """
    sp = _breadcrumbs_sparsifier(params, len(experts), "breadcrumbs")
    return _linear_merge(base, experts, weights, params["lambda"], params["normalize"], ctx, sp)


@method(
    "breadcrumbs_ties",
    citation=BREADCRUMBS_CITATION + _WITH_TIES,
    paper="breadcrumbs2024",
    related_papers=("ties2023",),
    params=[DENSITY, GAMMA, LAMBDA, _normalize(False, _NORM_TIES), CONSENSUS, RESCALE_DET],
    contract=CONTRACT,
    properties={"identity_on_base", "order_invariant", "nonfinite_propagates"},
)
def breadcrumbs_ties(base, experts, weights, params, ctx):
    """Model Breadcrumbs masks, then TIES sign election and disjoint merge."""
    sp = _breadcrumbs_sparsifier(params, len(experts), "breadcrumbs_ties")
    return _ties_merge(base, experts, weights, params["lambda"], params["normalize"], params["consensus"], ctx, sp)


@method(
    "sce",
    citation=SCE_CITATION,
    paper="sce2024",
    params=[SELECT_TOPK],
    contract=InputContract(base="required", min_experts=1, per_expert_weights=False),
    properties={"identity_on_base", "order_invariant", "idempotent", "nonfinite_propagates"},
)
def sce(base, experts, weights, params, ctx):
    """SCE: select high-variance entries, calculate weights from squared magnitudes, erase minority signs, merge.

    Select keeps the ``floor(select_topk * m)`` entries with the largest variance across the
    task vectors (m = entries with nonzero variance; so with one expert and select_topk < 1
    nothing survives and the base is returned). Each expert's weight is its selected task
    vector's sum of squares over the total; signs are elected by the unweighted sum; the
    agreeing entries are averaged with those weights. Per-expert weights are not taken (the
    method computes its own). Idempotent at select_topk = 1 (the default).
    """
    n = len(experts)
    stack = task_vectors(base, experts)
    topk = params["select_topk"]
    if topk < 1:
        mean = stack.mean(dim=0)
        var = torch.zeros_like(base)
        tmp = torch.empty_like(base)
        for d in stack:
            torch.sub(d, mean, out=tmp)
            var.addcmul_(tmp, tmp)
        del mean, tmp
        k = keep_count(topk, int(torch.count_nonzero(var)))
        stack.mul_(top_k_mask(var, k).to(stack.dtype))
        del var
    acc = torch.float64 if base.dtype == torch.float64 else torch.float32
    sq = [float(torch.linalg.vector_norm(d, dtype=acc)) ** 2 for d in stack]
    total = sum(sq)
    eta = [s / total for s in sq] if total > 0 else [1.0 / n] * n
    mixed = _disjoint_merge(stack, eta, [1.0] * n, "sum", normalize=True)
    del stack
    return mixed.add_(base)
