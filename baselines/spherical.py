"""The spherical family: SLERP, layer-adaptive SLERP, Multi-SLERP and the Karcher mean.

All four treat each tensor as one vector and measure angles between whole tensors. SLERP and
layer-adaptive SLERP apply the sine coefficients to the raw weight vectors by default (the
layer-adaptive SLERP paper, eq. 3 and Alg. 1 line 4, as mergekit does), or, with
``norm="interpolate"``, to the unit directions with the norms interpolated linearly;
Multi-SLERP and Karcher combine unit directions and rescale by the mean norm. Norms and dot
products are accumulated in float32 (float64 for float64 inputs; Karcher's Gram matrix
always in float64), angles and coefficients are computed in float64 on the host, and the
merged tensor comes back in the experts' dtype and device.

Conventions shared by the family (and where they differ from mergekit 0.1.5):

* One angle per tensor (the whole tensor is one vector, as in the layer-adaptive SLERP paper's Alg. 1 and the Fisher–Rao merging paper
  Sec. 3.4), as mergekit 0.1.5's ``slerp`` also does.
* SLERP's two norm conventions agree when the two tensors have equal norms. With unequal
  norms ``raw`` does not stay on the great circle between the directions' scales (its norm
  is not the interpolated one), and for nearly antipodal tensors of unequal norms its
  clipped coefficients reach ~1/sin(epsilon); ``interpolate`` stays bounded there.
* 1-D tensors (norm weights, biases) and embeddings are handled exactly like matrices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from mergebench.baselines._common import merge_weights, weighted_sum, weights_for
from mergebench.methods import InputContract, ModuleKind, Param, TensorContext, method
from mergebench.methods.naming import layer_index

__all__ = ["karcher", "layer_adaptive_slerp", "multislerp", "slerp"]

SHOEMAKE_1985 = (
    "K. Shoemake. Animating rotation with quaternion curves. In Proceedings of the 12th Annual Conference on "
    "Computer Graphics and Interactive Techniques (SIGGRAPH '85), pp. 245-254, 1985."
)
LAYER_ADAPTIVE_SLERP_PAPER = (
    "L. Rage, Y. Lalain, M. Escriva, M. Roberge, P. Lemaistre, A.-L. Rochet, G. Reus and B. P. Bhuyan. "
    "Geometric Model Merging for Efficient and Scalable Adaptation of Large Language Models "
    "(Layer-Adaptive SLERP). IEEE-format manuscript, ECE Paris / Racine.ai / Universite Paris-Saclay."
)
MERGEKIT = (
    "C. Goddard, S. Siriwardhana, M. Ehghaghi, L. Meyers, V. Karpukhin, B. Benedict, M. McQuade and "
    "J. Solawetz. Arcee's MergeKit: A Toolkit for Merging Large Language Models. In Proceedings of the 2024 "
    "Conference on Empirical Methods in Natural Language Processing: Industry Track, pp. 477-485, 2024."
)
KARCHER_MERGING_PAPER = (
    "J. Wang, Z. Ye and W. Yin. Functionality-Oriented LLM Merging on the Fisher-Rao Manifold. "
    "arXiv:2603.04972, 2026."
)
KARCHER_1977 = (
    "H. Karcher. Riemannian center of mass and mollifier smoothing. Communications on Pure and Applied "
    "Mathematics 30(5):509-541, 1977."
)


# --------------------------------------------------------------------------------------
# shared pieces


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 otherwise (bf16/fp16 sums drift)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _flat(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` as a 1-D tensor of ``dtype``: a view when possible, a copy only when the dtype differs
    (or the tensor is not contiguous). Callers never write into the result."""
    f = t.reshape(-1)
    return f if f.dtype == dtype else f.to(dtype)


def _check_same_shape(experts: Sequence[torch.Tensor], ctx: TensorContext, base: torch.Tensor | None = None) -> None:
    shape = experts[0].shape
    for i, e in enumerate(experts):
        if e.shape != shape:
            raise ValueError(f"{ctx.name}: expert {i} has shape {tuple(e.shape)}, expert 0 has {tuple(shape)}")
    if base is not None and base.shape != shape:
        raise ValueError(f"{ctx.name}: base has shape {tuple(base.shape)}, experts have {tuple(shape)}")


def _pair_stats(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """``(<a, b>, ||a||, ||b||)`` as Python floats, with one host sync."""
    acc = _acc_dtype(a)
    x, y = _flat(a, acc), _flat(b, acc)
    s = torch.stack([torch.dot(x, y), torch.linalg.vector_norm(x), torch.linalg.vector_norm(y)])
    dot, na, nb = s.tolist()
    return dot, na, nb


def _angle(dot: float, na: float, nb: float) -> float | None:
    """Angle between two vectors from their dot product and norms; None if either is zero."""
    if na <= 0.0 or nb <= 0.0 or not math.isfinite(na * nb):
        return None
    return math.acos(max(-1.0, min(1.0, dot / na / nb)))


def _slerp_coefficients(omega: float, t: float, eps: float) -> tuple[float, float]:
    """The layer-adaptive SLERP paper's eq. 3 coefficients with the angle clipped to [eps, pi - eps].

    Evaluated in float64 on the host. Clipping keeps sin(omega) >= sin(eps) > 0, and near
    both ends the ratios stay finite and continuous: for omega <= eps they tend to
    (1 - t, t) (linear interpolation of the unit vectors), and for exactly antipodal
    unit vectors a*u1 + b*u2 tends to cos(pi t) * u1.
    """
    w = min(max(omega, eps), math.pi - eps)
    s = math.sin(w)
    return math.sin((1.0 - t) * w) / s, math.sin(t * w) / s


NORM_MODES = ("raw", "interpolate")


def _slerp_pair(
    a: torch.Tensor,
    b: torch.Tensor,
    t: float,
    eps: float,
    stats: tuple[float, float, float] | None = None,
    norm: str = "raw",
) -> torch.Tensor:
    """SLERP of two tensors with one angle omega = angle(a, b), clipped to [eps, pi - eps].

    ``norm="raw"`` (the layer-adaptive SLERP paper's eq. 3 / Alg. 1 line 4, and mergekit):
    result = a_c * a + b_c * b with a_c = sin((1-t) omega) / sin omega, b_c = sin(t omega) / sin omega.
    ``norm="interpolate"``: the coefficients act on the unit directions and the result is
    rescaled to the interpolated norm, [a_c * a/||a|| + b_c * b/||b||] * ((1 - t)||a|| + t||b||).
    Either way one fused weighted sum of the two inputs in their own dtype (no normalised
    copies; float64 only when the pair is nearly antipodal and the coefficients are huge).
    If either tensor is zero (or holds NaN/inf) the angle is undefined; both rules then give
    (1 - t) a + t b, which is what we return.
    """
    dot, na, nb = stats if stats is not None else _pair_stats(a, b)
    omega = _angle(dot, na, nb)
    if omega is None:
        return weighted_sum([a, b], [1.0 - t, t])
    ca, cb = _slerp_coefficients(omega, t, eps)
    if norm == "raw":
        coeffs = [ca, cb]
    elif norm == "interpolate":
        scale = (1.0 - t) * na + t * nb
        coeffs = [ca * scale / na, cb * scale / nb]
    else:
        raise ValueError(f"unknown SLERP norm mode {norm!r}; use one of {', '.join(NORM_MODES)}")
    if max(abs(ca), abs(cb)) > 1e3 and a.dtype != torch.float64:
        # nearly antipodal: the two huge terms cancel; sum them in float64 so exactly
        # antipodal low-precision inputs keep the finite limit instead of rounding noise
        return weighted_sum([a.double(), b.double()], coeffs).to(a.dtype)
    return weighted_sum([a, b], coeffs)


_T = Param("t", "float", 0.5, ge=0.0, le=1.0, help="interpolation coefficient: 0 gives experts[0], 1 gives experts[1]")
_EPS = Param(
    "epsilon", "float", 1e-6, gt=0.0, lt=math.pi / 2,
    help="angle clipping: omega is clipped to [epsilon, pi - epsilon] (layer-adaptive SLERP)",
)
_NORM = Param(
    "norm", "str", "raw", choices=NORM_MODES,
    help="'raw': sine coefficients on the raw weight vectors (the layer-adaptive SLERP paper, eq. 3 / "
    "Alg. 1; mergekit); 'interpolate': on the unit directions, with the norms interpolated linearly",
)
_TWO = InputContract(base="unused", min_experts=2, max_experts=2, per_expert_weights=False)
_BASE_AND_ONE_OR_TWO = InputContract(
    base="optional", min_experts=1, max_experts=2, min_models=2, per_expert_weights=False
)


# --------------------------------------------------------------------------------------
# SLERP


@method(
    "slerp",
    version="2.0",
    citation=f"{SHOEMAKE_1985} Applied to LLM weights as in: {LAYER_ADAPTIVE_SLERP_PAPER} (eq. 3, Alg. 1)",
    paper="slerp1985",
    related_papers=("layer_adaptive_slerp",),
    params=[_T, _EPS, _NORM],
    contract=_BASE_AND_ONE_OR_TWO,
    granularity="tensor",
    properties={"idempotent", "nonfinite_propagates"},
)
def slerp(base, experts, weights, params, ctx):
    """Spherical linear interpolation of two models, one angle per tensor (layer-adaptive SLERP paper, eq. 3).

    The two models are a base and one expert (mergekit's convention: t=0 gives the base, t=1
    the expert), or two experts (t=0 gives experts[0], t=1 experts[1]; a base given as well
    then only supplies config and tokenizer). omega = angle(theta_1, theta_2), the angle
    between the whole tensors, clipped to [epsilon, pi - epsilon].

    ``norm="raw"`` (default; the paper's eq. 3 and Alg. 1 line 4, as mergekit computes it):
    theta = sin((1-t) omega)/sin(omega) theta_1 + sin(t omega)/sin(omega) theta_2 on the raw
    weight vectors. ``norm="interpolate"`` (mergebench 1.x's rule): the same coefficients on
    the unit directions, rescaled by the interpolated norm (1 - t)||theta_1|| + t||theta_2||,
    so the result's norm is exactly that. The two agree when the norms are equal. Nearly
    collinear pairs stay finite through the clipping (both tend to linear interpolation);
    exactly antipodal pairs tend to cos(pi t) theta_1 for equal norms, while for unequal norms
    the raw coefficients grow to ~1/sin(epsilon). A zero tensor has no angle: both rules fall
    back to (1 - t) theta_1 + t theta_2.

    Differences from mergekit 0.1.5 ``slerp``: mergekit switches to linear interpolation
    when |cos| > 0.9995 (here the clipped formula is kept), gives sin(t pi/2) theta_2 when
    theta_1 is all zeros (it takes the angle as pi/2), and needs a base.
    """
    _check_same_shape(experts, ctx, base if len(experts) == 1 else None)
    first, second = (experts[0], experts[1]) if len(experts) == 2 else (base, experts[0])
    if first is None:
        raise ValueError(f"{ctx.name}: slerp needs two models: a base and one expert, or two experts")
    return _slerp_pair(first, second, params["t"], params["epsilon"], norm=params["norm"])


# --------------------------------------------------------------------------------------
# Layer-adaptive SLERP


def _schedule_value(schedule: Sequence[float], depth: float | None) -> float:
    """Piecewise-linear interpolation of ``schedule`` (evenly spaced over depth [0, 1]).

    Same rule as a mergekit gradient. Tensors outside the layer stack (depth None) take
    the first point, as mergekit evaluates its gradients at t=0 for them.
    """
    if len(schedule) == 1 or depth is None:
        return float(schedule[0])
    pos = min(max(depth, 0.0), 1.0) * (len(schedule) - 1)
    i0 = min(int(math.floor(pos)), len(schedule) - 1)
    i1 = min(i0 + 1, len(schedule) - 1)
    frac = pos - i0
    return (1.0 - frac) * schedule[i0] + frac * schedule[i1]


def _angle_prepass(base, experts, params, ctx) -> Mapping[str, float]:
    """Per-tensor statistics for the mean-angle guardrail (nothing when it is off).

    ``omega`` (radians, unclipped; NaN when a tensor is zero) and ``weight`` (numel) are for
    reports; ``dot``, ``sq1``, ``sq2`` let the kernel rebuild exact per-layer angles.
    """
    if params.get("tau_omega") is None:
        return {}
    dot, na, nb = _pair_stats(experts[0], experts[1])
    omega = _angle(dot, na, nb)
    return {
        "omega": float("nan") if omega is None else omega,
        "weight": float(experts[0].numel()),
        "dot": dot,
        "sq1": na * na,
        "sq2": nb * nb,
    }


_MEAN_ANGLE_CACHE: tuple[object, int, float | None] | None = None


def mean_layer_angle(model_stats: Mapping[str, Mapping[str, float]]) -> float | None:
    """Mean layer angle (the layer-adaptive SLERP paper's Sec. III-A, omega-bar) from the prepass statistics.

    omega_l is the angle between the two parents' *whole layer l* (all tensors of the layer
    concatenated, as in Alg. 1 line 2), rebuilt exactly from per-tensor dot products and
    squared norms; omega-bar is the unweighted mean over layers (layers have equal size, so
    this is also the parameter-weighted mean over layers). Tensors outside the layer stack
    (embeddings, final norm, lm_head) are left out, unless no tensor lies in a layer, in
    which case each tensor counts as its own block. None when nothing is usable.

    Cached on the identity (and size) of the mapping, since every tensor of a merge asks
    the same question.
    """
    global _MEAN_ANGLE_CACHE
    cached = _MEAN_ANGLE_CACHE
    if cached is not None and cached[0] is model_stats and cached[1] == len(model_stats):
        return cached[2]
    layers: dict[object, list[float]] = {}
    loose: dict[object, list[float]] = {}
    for name, s in model_stats.items():
        if not all(k in s for k in ("dot", "sq1", "sq2")):
            continue
        li = layer_index(name)
        group, key = (layers, li) if li is not None else (loose, name)
        acc = group.setdefault(key, [0.0, 0.0, 0.0])
        acc[0] += s["dot"]
        acc[1] += s["sq1"]
        acc[2] += s["sq2"]
    groups = layers or loose
    angles = [a for d, s1, s2 in groups.values() if (a := _angle(d, math.sqrt(s1), math.sqrt(s2))) is not None]
    value = sum(angles) / len(angles) if angles else None
    _MEAN_ANGLE_CACHE = (model_stats, len(model_stats), value)
    return value


@method(
    "layer_adaptive_slerp",
    version="2.0",
    citation=LAYER_ADAPTIVE_SLERP_PAPER + " Sec. III-A, eq. 4 and Alg. 1.",
    paper="layer_adaptive_slerp",
    params=[
        Param(
            "t_attention", "floats", (0.0, 0.25, 0.5, 0.75, 1.0), ge=0.0, le=1.0,
            help="schedule for attention tensors, spread evenly over depth (one value = constant)",
        ),
        Param(
            "t_mlp", "floats", (1.0, 0.75, 0.5, 0.25, 0.0), ge=0.0, le=1.0,
            help="schedule for MLP tensors, spread evenly over depth (one value = constant)",
        ),
        Param(
            "t_other", "floats", (0.5,), ge=0.0, le=1.0,
            help="schedule for every other tensor: embeddings, lm_head, norms (one value = constant)",
        ),
        Param("t", "float", 0.5, ge=0.0, le=1.0, help="global SLERP coefficient used when the guardrail fires"),
        Param(
            "tau_omega", "float", math.pi / 4, gt=0.0, le=math.pi, nullable=True,
            help="guardrail: if the mean layer angle (radians) exceeds this, use global SLERP with t; None = off "
            "(default pi/4: unrelated parents are ~pi/2 apart, fine-tunes of one base far less)",
        ),
        _EPS,
        _NORM,
    ],
    contract=_TWO,
    granularity="tensor",
    prepass=_angle_prepass,
    properties={"idempotent", "nonfinite_propagates"},
)
def layer_adaptive_slerp(base, experts, weights, params, ctx):
    """SLERP with a coefficient per layer and module type (the layer-adaptive SLERP paper's eq. 4, Alg. 1).

    The coefficient of a tensor is its schedule evaluated at ``ctx.depth`` (layer / (L-1)),
    linearly interpolated between evenly spaced points: ``t_attention`` for attention
    tensors, ``t_mlp`` for MLP tensors, ``t_other`` for everything else, including norm
    vectors inside layers (1-D tensors are interpolated like any other tensor).
    Tensors outside the layer stack (embeddings, final norm, lm_head) use the first point
    of ``t_other`` (mergekit's convention for gradients). Defaults are the paper's
    "Q-template" (attention 0 -> 1, MLP 1 -> 0, t = 0.5 elsewhere).

    Guardrail (Sec. III-A (i)): the prepass measures every tensor; if the mean layer angle
    (see :func:`mean_layer_angle`) exceeds ``tau_omega``, the whole model falls back to
    global SLERP with ``t``. Each tensor is then merged exactly as :func:`slerp` does (Alg. 1
    line 4: the coefficients apply to the raw weight vectors; ``norm="interpolate"`` for
    the unit-direction variant). The
    paper gives no value for tau_omega; the default pi/4 fires only for parents that are
    barely related (independent random layers are ~pi/2 apart, so pi/2 would never fire).
    The tokenizer-overlap guardrail and Procrustes alignment of the paper are out of scope.
    """
    _check_same_shape(experts, ctx)
    own = ctx.model_stats.get(ctx.name, {})
    stats = None  # reuse this tensor's prepass numbers: saves a pass over both tensors
    if all(k in own for k in ("dot", "sq1", "sq2")):
        stats = (own["dot"], math.sqrt(own["sq1"]), math.sqrt(own["sq2"]))
    t = None
    tau = params["tau_omega"]
    if tau is not None:
        omega_bar = mean_layer_angle(ctx.model_stats)
        if omega_bar is None and stats is None:  # no prepass ran: judge this tensor alone
            stats = _pair_stats(experts[0], experts[1])
            omega_bar = _angle(*stats)
        if omega_bar is not None and omega_bar > tau:
            t = params["t"]
    if t is None:
        by_kind = {ModuleKind.ATTENTION: params["t_attention"], ModuleKind.MLP: params["t_mlp"]}
        schedule = by_kind.get(ctx.kind, params["t_other"])
        t = _schedule_value(schedule, ctx.depth)
    return _slerp_pair(experts[0], experts[1], t, params["epsilon"], stats, norm=params["norm"])


# --------------------------------------------------------------------------------------
# Multi-SLERP


@method(
    "multislerp",
    citation=(
        "C. Goddard. Multi-SLERP (barycentric interpolation on a hypersphere), blog post, "
        "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea ; implemented in " + MERGEKIT
    ),
    paper="multislerp",
    related_papers=("mergekit2024",),
    params=[
        Param("normalize_weights", "bool", True, help="divide the per-expert weights by their sum"),
        Param("eps", "float", 1e-8, gt=0.0, help="a weighted mean direction shorter than this is degenerate"),
    ],
    contract=InputContract(base="optional", min_experts=2, weights_normalized="normalize_weights"),
    granularity="tensor",
    properties={"idempotent", "order_invariant", "identity_on_base", "nonfinite_propagates"},
)
def multislerp(base, experts, weights, params, ctx):
    """Weighted spherical barycentre in one exponential-map step (mergekit's Multi-SLERP rule).

    With a base, works on task vectors theta_i - base and adds the base back (as mergekit).
    Each vector is split into a unit direction u_i and a norm n_i; the directions are
    averaged, m = sum_i w_i u_i / ||sum_i w_i u_i||, and the result is m * sum_i w_i n_i.

    mergekit 0.1.5 writes this as "project to the tangent space at m, average, Exp back"
    with the projection u_i - <u_i, m> m. That weighted tangent mean is identically zero
    (sum_i w_i <u_i, m> = ||sum_i w_i u_i||), so its single Exp step returns m itself: the
    rule is the normalised extrinsic (chordal) mean, computed here directly. mergebench keeps
    this one-step rule for ``multislerp``; the iterated, intrinsic mean is ``karcher``.

    Zero vectors contribute no direction (and norm 0). If the mean direction is degenerate
    (||sum w_i u_i|| < eps, e.g. antipodal experts or all-zero task vectors) the result is
    the weighted linear average; mergekit does that only for two inputs and raises otherwise.
    """
    _check_same_shape(experts, ctx, base)
    w = merge_weights(weights, experts[0], params["normalize_weights"], f"{ctx.name}: multislerp")
    shape, dtype = experts[0].shape, experts[0].dtype
    acc = _acc_dtype(experts[0])
    b = _flat(base, acc) if base is not None else None
    direction = torch.zeros(experts[0].numel(), dtype=acc, device=experts[0].device)
    linear = torch.zeros_like(direction)
    tmp = torch.empty_like(direction) if b is not None else None
    norm_sum = torch.zeros((), dtype=acc, device=direction.device)
    for wi, e in zip(w, experts):
        if b is not None:
            v = torch.sub(_flat(e, acc), b, out=tmp)
        else:
            v = _flat(e, acc)
        n = torch.linalg.vector_norm(v)
        norm_sum.add_(n * wi)
        # no host sync: the coefficient stays on the device
        direction.addcmul_(v, torch.where(n > 0, wi / n, torch.zeros_like(n)))
        linear.add_(v, alpha=wi)
    dn = float(torch.linalg.vector_norm(direction))
    if dn < params["eps"]:
        out = linear
    else:
        out = direction.mul_(norm_sum / dn)
    if b is not None:
        out.add_(b)
    return out.reshape(shape).to(dtype)


# --------------------------------------------------------------------------------------
# Karcher mean


@method(
    "karcher",
    citation=f"{KARCHER_MERGING_PAPER} Secs. 3.3-3.4; the Riemannian centre of mass of {KARCHER_1977}",
    paper="karcher2026",
    related_papers=("karcher1977",),
    params=[
        Param("max_iter", "int", 10, ge=1, help="maximum fixed-point iterations (mergekit's default)"),
        Param("tol", "float", 1e-5, gt=0.0, help="stop when the norm of the mean tangent vector is below this"),
        Param("eta", "float", 1.0, gt=0.0, le=1.0, help="step size of the exponential-map update (Fisher–Rao merging paper, eq. 5)"),
    ],
    contract=InputContract(base="unused", min_experts=1, weights_normalized=True, nonnegative_weights=True),
    granularity="tensor",
    aux_inputs=("fisher",),
    properties={"idempotent", "order_invariant", "nonfinite_propagates"},
)
def karcher(base, experts, weights, params, ctx):
    """Weighted Karcher mean on the unit sphere, rescaled by the mean norm (the Fisher–Rao merging paper Sec. 3.3-3.4).

    Per tensor: u_i = theta_i / ||theta_i||; alpha = weights / sum(weights); start at the
    normalised weighted chordal mean; iterate v = sum_i alpha_i Log_m(u_i),
    m <- Exp_m(eta v) until ||v|| < tol or max_iter; return m * sum_i alpha_i ||theta_i||.
    Log_m(u) = omega / sin(omega) * (u - cos(omega) m) and Exp_m(v) = cos|v| m + sin|v| v/|v|.
    The base is not used (the Fisher–Rao merging paper's mean is over the given models; pass the base as an
    expert to include it). mergekit 0.1.5 ignores per-model weights and counts a configured
    base as one more input; here the weights are honoured.

    Without Fisher, every iterate lies in the span of the experts, so the iteration runs on
    N coefficients using the experts' float64 Gram matrix (one streamed pass to build it,
    one weighted sum at the end): the same iterates as the vector form, at a fraction of
    the memory traffic, with no per-iteration device sync.

    Optional diagonal Fisher (``aux["fisher"]``, one nonnegative tensor per expert): the
    tangent mean becomes the elementwise Fisher-weighted mean
    sum_i alpha_i F_i * Log_m(u_i) / sum_i alpha_i F_i, projected back onto the tangent
    space at m. This is mergebench's reading of the Fisher–Rao merging paper's "natural-gradient-style
    preconditioning inside the log map"; coordinates where every F_i is zero use the plain
    weighted mean. Equal Fisher tensors give exactly the plain Karcher mean. This variant
    iterates on full vectors (buffers allocated once; convergence read on the host every
    few iterations, with zero steps after convergence, so the result equals stopping at the
    first ||v|| < tol).

    Zero tensors have no direction: they are left out of the direction mean but still count
    (with norm 0) in the norm average; all-zero inputs give zeros. Only exact zeros are left
    out (mergekit 0.1.5 also drops inputs whose norm is at most ``tol``). A tensor holding
    NaN/inf has no direction either: the result is then the weighted linear mean, so the
    non-finite values reach the output instead of vanishing.
    """
    _check_same_shape(experts, ctx)
    n_exp = len(experts)
    alpha = weights_for(weights, experts[0])
    if any(a < 0 for a in alpha):
        raise ValueError(f"{ctx.name}: karcher weights must be nonnegative, got {alpha}")
    total = sum(alpha)
    if total <= 0:
        raise ValueError(f"{ctx.name}: karcher weights sum to zero")
    alpha = [a / total for a in alpha]
    if n_exp == 1:
        return experts[0].clone()
    fisher = ctx.aux.get("fisher") if ctx.aux else None
    if fisher is None:
        return _karcher_gram(experts, alpha, params)
    return _karcher_fisher(experts, alpha, fisher, params, ctx)


_GRAM_CHUNK = 1 << 20  # elements per expert per block when building the Gram matrix


def _gram(experts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Float64 Gram matrix <theta_i, theta_j> (on the CPU), streamed in blocks."""
    flat = [e.reshape(-1) for e in experts]
    d, n = flat[0].numel(), len(flat)
    dev = flat[0].device
    buf = torch.empty((n, min(_GRAM_CHUNK, max(d, 1))), dtype=torch.float64, device=dev)
    g = torch.zeros((n, n), dtype=torch.float64, device=dev)
    for s in range(0, d, _GRAM_CHUNK):
        e = min(s + _GRAM_CHUNK, d)
        block = buf[:, : e - s]
        for i, f in enumerate(flat):
            block[i].copy_(f[s:e])
        g.addmm_(block, block.T)
    return g.cpu()


def _sphere_karcher_coefficients(
    gu: torch.Tensor, a: torch.Tensor, max_iter: int, tol: float, eta: float
) -> torch.Tensor:
    """Karcher mean of unit vectors with Gram matrix ``gu`` (float64, K x K), in coefficients.

    Returns beta with m = sum_i beta_i u_i, ||m|| = 1. Same algebra as the vector form:
    v = sum_i a_i r_i (u_i - c_i m), r = omega / sin(omega), c = <m, u_i>.
    """
    def normalise(b: torch.Tensor) -> torch.Tensor | None:
        nn = float(b @ gu @ b)
        return b / math.sqrt(nn) if nn > 1e-24 else None

    beta = normalise(a.clone())
    if beta is None:  # the chordal mean vanishes: start at the heaviest direction
        beta = torch.zeros_like(a)
        beta[int(torch.argmax(a))] = 1.0
    for _ in range(max_iter):
        cos = (gu @ beta).clamp_(-1.0, 1.0)
        omega = torch.acos(cos)
        ratio = torch.where(omega > 1e-4, omega / torch.sin(omega).clamp_min(1e-300), 1.0 + omega * omega / 6.0)
        v = a * ratio - float((a * ratio * cos).sum()) * beta
        v -= float(v @ gu @ beta) * beta  # exact tangent projection (||m|| = 1)
        vn = math.sqrt(max(float(v @ gu @ v), 0.0))
        if vn < tol:
            break
        step = eta * vn
        nxt = normalise(math.cos(step) * beta + (math.sin(step) / vn) * v)
        if nxt is None:
            break
        beta = nxt
    return beta


def _nonfinite_mean(experts, alpha) -> torch.Tensor:
    """A NaN/inf input has no direction: the weighted linear mean, so every non-finite input
    element reaches the output (instead of the zeros a skipped input would give)."""
    acc = _acc_dtype(experts[0])
    return weighted_sum([e.to(acc) for e in experts], alpha).to(experts[0].dtype)


def _karcher_gram(experts, alpha, params):
    g = _gram(experts)
    if not bool(torch.isfinite(g.diagonal()).all()):
        return _nonfinite_mean(experts, alpha)
    norms = g.diagonal().clamp_min(0).sqrt().tolist()
    scale = sum(a * n for a, n in zip(alpha, norms))
    valid = [i for i, n in enumerate(norms) if n > 0.0 and alpha[i] > 0.0]
    if not valid or not math.isfinite(scale) or scale == 0.0:
        return torch.zeros_like(experts[0])
    idx = torch.tensor(valid)
    inv = torch.tensor([1.0 / norms[i] for i in valid], dtype=torch.float64)
    gu = g[idx][:, idx] * inv[:, None] * inv[None, :]
    a = torch.tensor([alpha[i] for i in valid], dtype=torch.float64)
    a /= a.sum()
    beta = _sphere_karcher_coefficients(gu, a, int(params["max_iter"]), float(params["tol"]), float(params["eta"]))
    coeffs = (beta * inv * scale).tolist()
    acc = _acc_dtype(experts[0])
    out = torch.zeros(experts[0].shape, dtype=acc, device=experts[0].device)
    for c, i in zip(coeffs, valid):
        out.add_(experts[i], alpha=c)
    return out.to(experts[0].dtype)


_CHECK_EVERY = 4


def _karcher_fisher(experts, alpha, fisher, params, ctx):
    n_exp = len(experts)
    shape, dtype, device = experts[0].shape, experts[0].dtype, experts[0].device
    acc = _acc_dtype(experts[0])
    xs = [_flat(e, acc) for e in experts]
    numel = xs[0].numel()
    fisher = _fisher_inputs(fisher, ctx, n_exp, numel, acc)
    norms = torch.stack([torch.linalg.vector_norm(x) for x in xs]).tolist()  # one host sync
    if not all(math.isfinite(n) for n in norms):
        return _nonfinite_mean(experts, alpha)
    scale = sum(a * n for a, n in zip(alpha, norms))
    valid = [i for i in range(n_exp) if norms[i] > 0.0 and alpha[i] > 0.0]
    if not valid or not math.isfinite(scale) or scale == 0.0:
        return torch.zeros_like(experts[0])
    a_sum = sum(alpha[i] for i in valid)
    a_dir = [alpha[i] / a_sum for i in valid]
    xs = [xs[i] for i in valid]
    inv_n = [1.0 / norms[i] for i in valid]
    fisher = [fisher[i] for i in valid]
    k = len(valid)

    # initial point: normalised weighted chordal mean (or the heaviest direction if it vanishes)
    m = torch.zeros(numel, dtype=acc, device=device)
    for a, x, inv in zip(a_dir, xs, inv_n):
        m.add_(x, alpha=a * inv)
    mn = float(torch.linalg.vector_norm(m))
    if mn < 1e-12:
        j = max(range(k), key=lambda i: a_dir[i])
        torch.mul(xs[j], inv_n[j], out=m)
    else:
        m.div_(mn)
    if k > 1:
        _fisher_iterate(m, xs, a_dir, inv_n, fisher, params)
    return m.mul_(scale).reshape(shape).to(dtype)


def _fisher_inputs(fisher, ctx: TensorContext, n: int, numel: int, acc: torch.dtype) -> list[torch.Tensor]:
    if len(fisher) != n:
        raise ValueError(f"{ctx.name}: got {len(fisher)} Fisher tensors for {n} experts")
    out = []
    for i, f in enumerate(fisher):
        if f.numel() != numel:
            raise ValueError(f"{ctx.name}: Fisher tensor {i} has {f.numel()} elements, the experts have {numel}")
        out.append(_flat(f, acc))
    if bool(torch.stack([(f < 0).any() for f in out]).any()):
        raise ValueError(f"{ctx.name}: Fisher tensors must be nonnegative")
    return out


def _fisher_iterate(m, xs, a_dir, inv_n, fisher, params) -> None:
    """Fisher-preconditioned fixed-point iteration on full vectors, updating ``m`` in place."""
    acc, device = m.dtype, m.device
    k = len(xs)
    inv_t = torch.tensor(inv_n, dtype=acc, device=device)
    eta, tol = float(params["eta"]), float(params["tol"])
    v = torch.empty_like(m)
    num = torch.empty_like(m)
    tmp = torch.empty_like(m)
    cos = torch.empty(k, dtype=acc, device=device)
    done = torch.zeros((), dtype=torch.bool, device=device)
    zero = torch.zeros((), dtype=acc, device=device)
    den = torch.zeros_like(m)
    for a, f in zip(a_dir, fisher):
        den.add_(f, alpha=a)
    no_info = den == 0
    plain = torch.empty_like(m) if bool(no_info.any()) else None
    den.masked_fill_(no_info, 1.0)

    for it in range(int(params["max_iter"])):
        for i, x in enumerate(xs):
            torch.dot(m, x, out=cos[i])
        cos.mul_(inv_t).clamp_(-1.0, 1.0)
        omega = torch.acos(cos)
        # omega / sin(omega), with its Taylor series near 0 (sin(omega) ~ omega there)
        ratio = torch.where(omega > 1e-4, omega / torch.sin(omega).clamp_min(1e-300), 1.0 + omega * omega / 6.0)
        num.zero_()
        if plain is not None:
            plain.zero_()
        for i, (x, f) in enumerate(zip(xs, fisher)):
            torch.mul(m, -(ratio[i] * cos[i]), out=tmp)  # tmp = Log_m(u_i)
            tmp.addcmul_(x, ratio[i] * inv_t[i])
            num.addcmul_(f, tmp, value=a_dir[i])
            if plain is not None:
                plain.add_(tmp, alpha=a_dir[i])
        torch.div(num, den, out=v)
        if plain is not None:
            torch.where(no_info, plain, v, out=v)
        v.addcmul_(m, -torch.dot(v, m))  # project onto the tangent space at m
        vn = torch.linalg.vector_norm(v)
        done |= vn < tol
        step = torch.where(done, zero, eta * vn)
        m.mul_(torch.cos(step))
        m.addcmul_(v, torch.where(vn > 0, torch.sin(step) / vn.clamp_min(1e-300), zero))
        m.div_(torch.linalg.vector_norm(m).clamp_min(1e-300))
        if (it + 1) % _CHECK_EVERY == 0 and bool(done):
            break
