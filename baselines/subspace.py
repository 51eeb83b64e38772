"""Subspace merging: TSV-M, Iso-C and Subspace Boosting (the in-the-wild merging study §4.1, eqs. 5-11).

All three act on the SVD of per-layer task-update matrices. They only make sense for 2-D
layer weights: 1-D tensors (norms, biases), tensors of other ranks and, unless
``svd_embeddings`` is set, embeddings / ``lm_head`` (``ModuleKind.EMBEDDING``; a
49152x576 or 152064x5120 SVD is costly and the papers apply these methods to layer
matrices) take a plain task-vector fallback described in each method's docstring.

Numerics: the SVDs run in float64 for float64 inputs and in float32 otherwise (LAPACK has
no half-precision SVD); the result is cast back to the experts' dtype. Singular values
count as nonzero when they exceed ``max(m, n) * eps * sigma_max`` (the usual numerical-rank
tolerance of ``numpy.linalg.matrix_rank``); directions beyond that rank are left at zero
by Iso-C and Subspace Boosting, because their singular vectors are arbitrary (any basis of
the null space) and inflating them would add basis-dependent noise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mergebench.baselines._common import weights_for
from mergebench.methods import InputContract, ModuleKind, Param, ParameterError, TensorContext, method

_CITE_TSV = (
    "Gargiulo et al., 2025. Task Singular Vectors: Reducing Task Interference in Model Merging. CVPR. "
    "(as written in the in-the-wild merging study, eqs. 5-8)"
)
_CITE_ISO = (
    "Marczak et al., 2025. No Task Left Behind: Isotropic Model Merging with Common and Task-Specific "
    "Subspaces. ICML. (as written in the in-the-wild merging study, eqs. 9-10)"
)
_CITE_SB = (
    "Skorobogat et al., 2025. Subspace-Boosted Model Merging. (as written in the in-the-wild merging study, eq. 11)"
)

INNER_METHODS = (
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "della_linear",
    "della_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
)
"""Task-vector methods ``subspace_boosting`` can wrap (looked up in the registry at call time)."""

_P_LAMBDA = Param("lambda", "float", 1.0, help="scale of the merged update: W = W0 + lambda * dW")
_P_SVD_EMB = Param(
    "svd_embeddings", "bool", False,
    help="also apply the SVD method to embeddings / lm_head (default: task-vector fallback)",
)
_P_FALLBACK_MEAN = Param(
    "fallback_mean", "bool", False,
    help="for tensors taking the task-arithmetic fallback (1-D, embeddings), divide by sum(alpha_i): "
    "the weighted mean of task vectors that the authors' code uses for non-matrix parameters",
)


# ----------------------------------------------------------------------------- helpers


def _svd_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _uses_svd(t: torch.Tensor, params: Mapping[str, Any], ctx: TensorContext) -> bool:
    if t.ndim != 2:
        return False
    return ctx.kind != ModuleKind.EMBEDDING or bool(params.get("svd_embeddings", False))


def _task_sum(
    base: torch.Tensor, experts: Sequence[torch.Tensor], w: Sequence[float], dtype: torch.dtype
) -> torch.Tensor:
    """``sum_i w_i (experts[i] - base)`` in ``dtype``, differences taken before summing
    (so nearly equal weights do not cancel catastrophically); two buffers, no stack."""
    acc = torch.zeros(base.shape, dtype=dtype, device=base.device)
    tmp = torch.empty_like(acc)
    for e, c in zip(experts, w):  # weight 0 too: adds nothing, but NaN/inf inputs stay visible
        tmp.copy_(e)
        tmp.sub_(base)
        acc.add_(tmp, alpha=c)
    return acc


def _task_arithmetic_fallback(base, experts, w, lam: float, mean: bool, ctx: TensorContext) -> torch.Tensor:
    """``W0 + lam * sum_i w_i delta_i`` (divided by ``sum_i w_i`` when ``mean``)."""
    dtype = _svd_dtype(base)
    delta = _task_sum(base, experts, w, dtype)
    scale = lam
    if mean:
        total = sum(w)
        if total == 0:
            raise ValueError(
                f"{ctx.name}: per-expert weights sum to zero; cannot take the weighted mean (fallback_mean)"
            )
        scale = lam / total
    return delta.mul_(scale).add_(base).to(experts[0].dtype)


def _rank_mask(s: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Boolean mask of the numerically nonzero singular values ``s`` (sorted descending)."""
    tol = s[:1] * (max(shape) * torch.finfo(s.dtype).eps)
    return s > tol


def _svd(a: torch.Tensor):
    """Thin SVD; a matrix holding NaN/inf is an error (LAPACK may return finite garbage for
    it, e.g. a zero update, which would hide the bad values)."""
    if not bool(torch.isfinite(a).all()):
        raise ValueError("cannot take the SVD of a matrix holding NaN/inf values")
    return torch.linalg.svd(a, full_matrices=False)


def _polar(a: torch.Tensor) -> torch.Tensor:
    """Closest matrix with orthonormal columns (or rows, if wide) in Frobenius norm:
    ``P Q^T`` from ``a = P D Q^T`` (orthogonal Procrustes, the in-the-wild merging study eq. 7)."""
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


def _finish(base: torch.Tensor, delta: torch.Tensor, lam: float, like: torch.Tensor) -> torch.Tensor:
    """``base + lam * delta`` in ``delta``'s buffer (owned by the caller), in ``like``'s dtype."""
    return delta.mul_(lam).add_(base).to(like.dtype)


# ----------------------------------------------------------------------------- TSV-M


@method(
    "tsv_merge",
    citation=_CITE_TSV,
    paper="tsvm2025",
    related_papers=("inthewild",),
    params=[
        Param(
            "rank_fraction", "float", None, nullable=True, gt=0.0, le=1.0,
            help="fraction of each task vector's singular components kept (default None: 1/T for T experts)",
        ),
        _P_LAMBDA,
        _P_SVD_EMB,
        _P_FALLBACK_MEAN,
    ],
    contract=InputContract(base="required", min_experts=1, weights_normalized="fallback_mean"),
    granularity="matrix",
    properties={"identity_on_base", "order_invariant", "nonfinite_propagates"},
)
def tsv_merge(base, experts, weights, params, ctx):
    """TSV-Merge: per-task truncated SVD, Procrustes-orthogonalized bases, one low-rank update.

    For each 2-D weight, every task vector alpha_i * delta_i keeps its top
    ``k = floor(rank_fraction * min(m, n))`` singular triplets (at least 1; default fraction
    1/T, so the concatenation has at most min(m, n) columns); the left and right bases are
    concatenated and replaced by their orthogonal polar factors, and
    W = W0 + lambda * U_perp Sigma V_perp^T (the in-the-wild merging study eqs. 5-8). The per-expert weights scale
    the singular values and do not change which directions are kept.
    1-D tensors, non-2-D tensors and (unless ``svd_embeddings``) embeddings / lm_head take task
    arithmetic with the same lambda: W0 + lambda * sum_i alpha_i delta_i (divided by
    sum_i alpha_i when ``fallback_mean``).
    """
    w = weights_for(weights, experts[0])
    lam = params["lambda"]
    if not _uses_svd(base, params, ctx):
        return _task_arithmetic_fallback(base, experts, w, lam, params["fallback_mean"], ctx)
    dtype = _svd_dtype(base)
    t = len(experts)
    m, n = base.shape
    r = min(m, n)
    frac = params["rank_fraction"]
    # floor(r / T) exactly when no fraction is given; the tiny slack absorbs 1/3*48 = 15.999...
    k = r // t if frac is None else math.floor(frac * r + 1e-9)
    k = min(max(k, 1), r)

    u_cat = torch.empty((m, t * k), dtype=dtype, device=base.device)
    s_cat = torch.empty(t * k, dtype=dtype, device=base.device)
    vh_cat = torch.empty((t * k, n), dtype=dtype, device=base.device)
    delta = torch.empty((m, n), dtype=dtype, device=base.device)
    for i, (e, c) in enumerate(zip(experts, w)):
        delta.copy_(e)
        delta.sub_(base)
        u, s, vh = _svd(delta)
        cols = slice(i * k, (i + 1) * k)
        u_cat[:, cols] = u[:, :k]
        torch.mul(s[:k], c, out=s_cat[cols])
        vh_cat[cols] = vh[:k]
        del u, s, vh

    u_perp = _polar(u_cat)
    vh_perp = _polar(vh_cat)  # polar(V^T) = polar(V)^T
    torch.matmul(u_perp.mul_(s_cat), vh_perp, out=delta)
    return _finish(base, delta, lam, experts[0])


# ----------------------------------------------------------------------------- Iso-C


@method(
    "iso_c",
    citation=_CITE_ISO,
    paper="isoc2025",
    related_papers=("inthewild",),
    params=[_P_LAMBDA, _P_SVD_EMB, _P_FALLBACK_MEAN],
    contract=InputContract(base="required", min_experts=1, weights_normalized="fallback_mean"),
    granularity="matrix",
    properties={"identity_on_base", "order_invariant", "nonfinite_propagates"},
)
def iso_c(base, experts, weights, params, ctx):
    """Iso-C: task-arithmetic update with its singular spectrum flattened to the mean.

    For each 2-D weight, dW_TA = sum_i alpha_i delta_i = U diag(sigma) V^T; the r numerically
    nonzero singular values (sigma_j > max(m, n) * eps * sigma_1) are all replaced by their
    mean and W = W0 + lambda * sigma_bar U_r V_r^T (the in-the-wild merging study eqs. 9-10). The authors' code
    averages over all min(m, n) values; the two agree whenever dW_TA has full rank (the usual
    case for full fine-tunes) and differ for rank-deficient updates (e.g. LoRA experts), where
    inflating null directions would add arbitrary basis vectors.
    1-D tensors, non-2-D tensors and (unless ``svd_embeddings``) embeddings / lm_head take task
    arithmetic with the same lambda: W0 + lambda * sum_i alpha_i delta_i (divided by
    sum_i alpha_i when ``fallback_mean``).
    """
    w = weights_for(weights, experts[0])
    lam = params["lambda"]
    if not _uses_svd(base, params, ctx):
        return _task_arithmetic_fallback(base, experts, w, lam, params["fallback_mean"], ctx)
    delta = _task_sum(base, experts, w, _svd_dtype(base))
    u, s, vh = _svd(delta)
    keep = _rank_mask(s, base.shape)
    count = keep.sum().clamp_(min=1).to(s.dtype)
    mean = torch.where(keep, s, 0).sum() / count
    s_iso = torch.where(keep, mean, 0)
    torch.matmul(u.mul_(s_iso), vh, out=delta)
    return _finish(base, delta, lam, experts[0])


# ----------------------------------------------------------------------------- Subspace Boosting


def _boost(delta: torch.Tensor, beta: float) -> torch.Tensor:
    """Subspace Boosting of ``delta`` (the in-the-wild merging study eq. 11), written into ``delta``'s buffer.

    j* = min{j : n_j >= beta} with n_j = sum_{i<=j} sigma_i / sum_i sigma_i over the r nonzero
    singular values; sigma_j for j > j* (j <= r) is raised to sigma_{j*}. Comparing the
    cumulative sum with beta * total (total = its last entry) makes beta = 1 exact: j* = r.
    """
    u, s, vh = _svd(delta)
    keep = _rank_mask(s, delta.shape)
    s_kept = torch.where(keep, s, 0)
    csum = torch.cumsum(s_kept, 0)
    total = csum[-1:]
    rank = keep.sum(dim=0, keepdim=True)
    j_star = torch.minimum((csum < beta * total).sum(dim=0, keepdim=True), (rank - 1).clamp_(min=0))
    cutoff = s_kept.gather(0, j_star)
    s_boost = torch.where(keep, torch.maximum(s_kept, cutoff), 0)
    return torch.matmul(u.mul_(s_boost), vh, out=delta)


INHERIT = "inherit"
"""Pass-through value meaning "keep the wrapped method's default" where None is meaningful
(``rescale``: None disables rescaling in the DARE/DELLA family)."""


def _forwarded(params: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """The pass-through parameters that were set: None (or ``INHERIT``) keeps the wrapped
    method's default, except ``rescale``, whose None is forwarded (it means 'off')."""
    out = {}
    for key in names:
        value = params[key]
        if value == INHERIT or (value is None and key != "rescale"):
            continue
        out[key] = value
    return out


def _inner_params(spec, given: Mapping[str, Any], n_experts: int) -> dict[str, Any]:
    """The wrapped method's parameters: its defaults overridden by ``given``, with its own
    ``lambda`` forced to 1 (lambda is applied once, after boosting)."""
    passed = {}
    for key, value in given.items():
        if key not in spec.param_names:
            raise ParameterError(
                f"method {spec.name!r} (wrapped by subspace boosting) has no parameter {key!r}; "
                f"its parameters: {', '.join(spec.param_names) or '(none)'}"
            )
        if isinstance(value, tuple) and len(set(value)) == 1:
            value = value[0]  # one shared value: also fits a method whose parameter is not per-expert
        passed[key] = value
    out = spec.validate_params(passed, n_experts=n_experts)
    if "lambda" in out:
        out["lambda"] = 1.0
    return out


def _boosted_merge(inner_name: str, passthrough: Mapping[str, Any], base, experts, weights, params, ctx):
    from mergebench.methods import get_method  # at call time: the inner module may load later

    spec = get_method(inner_name)
    if spec.prepass is not None or spec.aux_inputs:
        raise ParameterError(
            f"subspace boosting cannot wrap {inner_name!r}: it needs a model-wide prepass or auxiliary inputs"
        )
    if spec.contract.base == "unused":
        raise ParameterError(f"subspace boosting needs a task-vector method; {inner_name!r} ignores the base model")
    inner = _inner_params(spec, passthrough, len(experts))
    dtype, out_dtype = _svd_dtype(base), experts[0].dtype
    if base.dtype != dtype:
        # half-precision inputs: run the wrapped method in float32 so that dW is not the
        # difference of two rounded weights (bf16 rounding of W is comparable to dW itself)
        base, experts = base.to(dtype), [e.to(dtype) for e in experts]
    merged = spec.kernel(base, list(experts), weights, inner, ctx)
    delta = merged.to(dtype, copy=True)
    delta.sub_(base)
    if _uses_svd(base, params, ctx):
        _boost(delta, params["beta"])
    return delta.mul_(params["lambda"]).add_(base).to(out_dtype)


def _checks_inner(names: Sequence[str], inner: str | None = None):
    """A ``validate`` hook: resolve and validate the wrapped method's parameters once per
    run, before any tensor is read (the kernel re-derives them per tensor)."""

    def validate(params: dict[str, Any], n_experts: int | None) -> dict[str, Any]:
        from mergebench.methods import get_method

        _inner_params(get_method(inner or params["base_method"]), _forwarded(params, names), n_experts or 1)
        return params

    return validate


_P_BETA = Param(
    "beta", "float", 0.2, ge=0.0, le=1.0,
    help="cumulative-energy threshold: singular values after the first j with n_j >= beta are raised to sigma_j",
)
_PASS = "passed to the wrapped method when set (None: the wrapped method's default)"
_PASSTHROUGH = (
    Param("density", "float", None, nullable=True, ge=0.0, le=1.0, per_expert=True, help=_PASS),
    Param("normalize", "bool", None, nullable=True, help=_PASS),
    Param("consensus", "str", None, nullable=True, help=_PASS),
    Param(
        "rescale", "str", INHERIT, nullable=True,
        help="passed to the wrapped method: 'inherit' keeps its default, none/null turns rescaling off",
    ),
    Param("epsilon", "float", None, nullable=True, per_expert=True, help=_PASS),
    Param("gamma", "float", None, nullable=True, per_expert=True, help=_PASS),
)
_PASSTHROUGH_NAMES = tuple(p.name for p in _PASSTHROUGH)


@method(
    "subspace_boosting",
    citation=_CITE_SB,
    paper="subspace_boosting2025",
    related_papers=("inthewild",),
    params=[
        Param(
            "base_method", "str", "task_arithmetic", choices=INNER_METHODS,
            help="task-vector method whose update is boosted",
        ),
        _P_BETA,
        _P_LAMBDA,
        *_PASSTHROUGH,
        _P_SVD_EMB,
    ],
    contract=InputContract(base="required", min_experts=1),
    granularity="matrix",
    stochastic=True,  # the wrapped method may be (DARE, DELLA); it then draws from ctx.generator
    properties={"identity_on_base", "nonfinite_propagates"},
    validate=_checks_inner(_PASSTHROUGH_NAMES),
)
def subspace_boosting(base, experts, weights, params, ctx):
    """Subspace Boosting over a task-vector method: raise the weak tail of its update's spectrum.

    Runs ``base_method`` with its lambda forced to 1 to get dW = merged - W0, then for 2-D
    weights boosts dW's spectrum (the in-the-wild merging study eq. 11: with n_j the cumulative normalized sum of
    singular values and j* = min{j : n_j >= beta}, sigma_j for j > j* becomes sigma_{j*}) and
    returns W0 + lambda * dW_boosted. Pass-through parameters left at None ('inherit' for
    ``rescale``) keep the wrapped method's defaults; setting one it does not have is an error. Marked stochastic because DARE/DELLA
    draw random masks (from ctx.generator); with a deterministic method the seed is unused.

    1-D tensors, non-2-D tensors and (unless ``svd_embeddings``) embeddings / lm_head are not
    boosted: they get the wrapped method's merge with the same lambda, W0 + lambda * dW (for
    task arithmetic, exactly task arithmetic; TIES+SB stays TIES on norms and biases).
    """
    given = _forwarded(params, _PASSTHROUGH_NAMES)
    return _boosted_merge(params["base_method"], given, base, experts, weights, params, ctx)


@method(
    "ta_sb",
    citation=_CITE_SB + " Task Arithmetic + Subspace Boosting as in the in-the-wild merging study.",
    paper="subspace_boosting2025",
    related_papers=("task_arithmetic2023", "inthewild"),
    params=[
        _P_BETA,
        _P_LAMBDA,
        Param("normalize", "bool", None, nullable=True, help="passed to task_arithmetic (None: its default)"),
        _P_SVD_EMB,
    ],
    contract=InputContract(base="required", min_experts=1, weights_normalized="normalize"),
    granularity="matrix",
    properties={"identity_on_base", "order_invariant", "nonfinite_propagates"},
    validate=_checks_inner(("normalize",), "task_arithmetic"),
)
def ta_sb(base, experts, weights, params, ctx):
    """TA+SB: ``subspace_boosting`` over ``task_arithmetic`` (the in-the-wild merging study: beta 0.2, lambda 1).

    1-D tensors, non-2-D tensors and (unless ``svd_embeddings``) embeddings / lm_head are not
    boosted: they get the wrapped method's merge with the same lambda, W0 + lambda * dW (for
    task arithmetic, exactly task arithmetic; TIES+SB stays TIES on norms and biases).
    """
    given = _forwarded(params, ("normalize",))
    return _boosted_merge("task_arithmetic", given, base, experts, weights, params, ctx)


@method(
    "ties_sb",
    citation=_CITE_SB + " TIES-Merging + Subspace Boosting as in the in-the-wild merging study.",
    paper="subspace_boosting2025",
    related_papers=("ties2023", "inthewild"),
    params=[
        _P_BETA,
        Param("lambda", "float", 0.1, help="scale of the merged update (the in-the-wild merging study uses 0.1 for TIES+SB)"),
        Param("density", "float", 0.1, ge=0.0, le=1.0, per_expert=True,
              help="fraction of each task vector TIES keeps (the in-the-wild merging study: top 10%)"),
        Param("normalize", "bool", None, nullable=True, help="passed to ties (None: its default)"),
        Param("consensus", "str", None, nullable=True, help="passed to ties (None: its default)"),
        _P_SVD_EMB,
    ],
    contract=InputContract(base="required", min_experts=1),
    granularity="matrix",
    properties={"identity_on_base", "order_invariant", "nonfinite_propagates"},
    validate=_checks_inner(("density", "normalize", "consensus"), "ties"),
)
def ties_sb(base, experts, weights, params, ctx):
    """TIES+SB: ``subspace_boosting`` over ``ties`` with the in-the-wild merging study's settings (lambda 0.1, density 0.1, beta 0.2).

    1-D tensors, non-2-D tensors and (unless ``svd_embeddings``) embeddings / lm_head are not
    boosted: they get the wrapped method's merge with the same lambda, W0 + lambda * dW (for
    task arithmetic, exactly task arithmetic; TIES+SB stays TIES on norms and biases).
    """
    given = _forwarded(params, ("density", "normalize", "consensus"))
    return _boosted_merge("ties", given, base, experts, weights, params, ctx)
