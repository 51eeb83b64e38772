"""SLERP, layer-adaptive SLERP, Multi-SLERP and Karcher: formulas, properties and edge cases.

References below are written in float64 straight from the papers' formulas (layer-adaptive
SLERP eq. 3 and Alg. 1, seed 000 eqs. 4-5, mergekit's Multi-SLERP description), never by
calling the kernels under test.
"""

import itertools
import math

import pytest
import torch

from mergebench.methods import ModuleKind, ParameterError, TensorContext, get_method
from mergebench.testing import method_checks, run_kernel

torch.set_num_threads(1)

SLERP = get_method("slerp")
LAS = get_method("layer_adaptive_slerp")
MULTI = get_method("multislerp")
KARCHER = get_method("karcher")

CTX = TensorContext(name="model.layers.0.mlp.up_proj.weight", layer=0, num_layers=4, kind=ModuleKind.MLP)

CHECKS = [
    c
    for spec, params in [
        (SLERP, None),
        (SLERP, {"t": 0.3}),
        (SLERP, {"t": 0.3, "norm": "interpolate"}),
        (LAS, None),
        (LAS, {"tau_omega": None}),
        (LAS, {"norm": "interpolate"}),
        (MULTI, None),
        (KARCHER, None),
    ]
    for c in method_checks(spec, params)
]


@pytest.mark.parametrize("check", CHECKS, ids=[f"{i}-{c.name}" for i, c in enumerate(CHECKS)])
def test_conformance(check):
    check()


# ------------------------------------------------------------------ float64 references


def unit(x):
    x = x.double().reshape(-1)
    return x / x.norm()


def ref_slerp(a, b, t, eps=1e-6, norm="raw"):
    """Layer-adaptive SLERP eq. 3 / Alg. 1 lines 2-4, omega clipped to [eps, pi - eps].

    ``raw``: the sine coefficients on the raw weight vectors (Alg. 1 line 4). ``interpolate``:
    on the unit vectors, rescaled by the linearly interpolated norm."""
    na, nb = a.double().norm(), b.double().norm()
    u1, u2 = unit(a), unit(b)
    omega = torch.acos(torch.clamp(u1 @ u2, -1, 1)).item()
    omega = min(max(omega, eps), math.pi - eps)
    ca, cb = math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)
    if norm == "raw":
        return (ca * a.double() + cb * b.double()).reshape(a.shape)
    return ((ca * u1 + cb * u2) * ((1 - t) * na + t * nb)).reshape(a.shape)


def sp(t, norm="raw", eps=1e-6):
    return SLERP.validate_params({"t": t, "norm": norm, "epsilon": eps})


def sphere_log(m, u):
    """Log map on the unit sphere at m (unit), of unit vector u."""
    c = torch.clamp(m @ u, -1, 1)
    w = torch.acos(c)
    if w < 1e-12:
        return torch.zeros_like(m)
    return (w / torch.sin(w)) * (u - c * m)


def ref_multislerp(experts, w, base=None, normalize=True):
    """mergekit's Multi-SLERP recipe, step by step: units, weighted Euclidean mean direction,
    tangent projections, weighted tangent mean, one exponential map, weighted mean norm."""
    w = torch.tensor(w, dtype=torch.float64)
    if normalize:
        w = w / w.sum()
    vs = [e.double().reshape(-1) - (base.double().reshape(-1) if base is not None else 0) for e in experts]
    norms = torch.stack([v.norm() for v in vs])
    us = [v / v.norm() for v in vs]
    mean = sum(wi * u for wi, u in zip(w, us))
    mean = mean / mean.norm()
    tangents = [u - (u @ mean) * mean for u in us]
    tr = sum(wi * tv for wi, tv in zip(w, tangents))
    tn = tr.norm()
    res = mean * torch.cos(tn) + (tr * torch.sin(tn) / tn if tn > 0 else 0)
    res = res * (norms * w).sum()
    if base is not None:
        res = res + base.double().reshape(-1)
    return res.reshape(experts[0].shape)


def karcher_residual(result, experts, alpha):
    """|| sum_i alpha_i Log_m(u_i) || at m = result / ||result|| (seed 000 eq. 4)."""
    m = unit(result)
    a = torch.tensor(alpha, dtype=torch.float64)
    a = a / a.sum()
    return sum(ai * sphere_log(m, unit(e)) for ai, e in zip(a, experts)).norm().item()


def rand(shape, seed, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def angle(a, b):
    return torch.acos(torch.clamp(unit(a) @ unit(b), -1, 1)).item()


def close(a, b, atol=1e-10, rtol=1e-8):
    assert a.shape == b.shape
    err = (a.double() - b.double()).abs().max().item()
    assert torch.allclose(a.double(), b.double(), atol=atol, rtol=rtol), f"max abs err {err:.3g}"


# ------------------------------------------------------------------ SLERP


@pytest.mark.parametrize("norm", ["raw", "interpolate"])
@pytest.mark.parametrize("t", [0.0, 0.1, 0.5, 0.77, 1.0])
@pytest.mark.parametrize("shape", [(24, 16), (16,)])
def test_slerp_matches_reference(t, shape, norm):
    a, b = rand(shape, 1), 3.0 * rand(shape, 2)  # unequal norms: the two rules differ
    out = run_kernel(SLERP, None, [a, b], sp(t, norm), CTX)
    close(out, ref_slerp(a, b, t, norm=norm))
    out32 = run_kernel(SLERP, None, [a.float(), b.float()], sp(t, norm), CTX)
    assert out32.dtype == torch.float32
    close(out32, ref_slerp(a, b, t, norm=norm), atol=1e-5, rtol=1e-5)


def test_slerp_default_is_the_papers_raw_rule():
    """Alg. 1 line 4: theta = a theta_1 + b theta_2 on the raw vectors (not their unit directions)."""
    a, b = rand((12, 9), 8), 4.0 * rand((12, 9), 9)
    assert SLERP.validate_params()["norm"] == "raw" and LAS.validate_params()["norm"] == "raw"
    w = angle(a, b)
    ca, cb = math.sin(0.7 * w) / math.sin(w), math.sin(0.3 * w) / math.sin(w)
    close(run_kernel(SLERP, None, [a, b], SLERP.validate_params({"t": 0.3}), CTX), ca * a + cb * b)
    interp = run_kernel(SLERP, None, [a, b], sp(0.3, "interpolate"), CTX)
    assert (interp - (ca * a + cb * b)).abs().max().item() > 1e-2  # unequal norms: the rules differ
    # equal norms: both rules give the same point
    b1 = b * (a.norm() / b.norm())
    close(run_kernel(SLERP, None, [a, b1], sp(0.3), CTX), run_kernel(SLERP, None, [a, b1], sp(0.3, "interpolate"), CTX))


@pytest.mark.parametrize("norm", ["raw", "interpolate"])
def test_slerp_endpoints_and_norm(norm):
    a, b = rand((8, 8), 3), 0.5 * rand((8, 8), 4)
    close(run_kernel(SLERP, None, [a, b], sp(0.0, norm), CTX), a, atol=1e-12)
    close(run_kernel(SLERP, None, [a, b], sp(1.0, norm), CTX), b, atol=1e-12)
    mid = run_kernel(SLERP, None, [a, b], sp(0.25, norm), CTX)
    if norm == "interpolate":
        assert mid.norm().item() == pytest.approx(0.75 * a.norm().item() + 0.25 * b.norm().item(), rel=1e-10)
        # constant angular speed: the result sits at t * omega from the first input
        assert angle(mid, a) == pytest.approx(0.25 * angle(a, b), rel=1e-9)
    else:  # raw: on the geodesic between the directions only when the norms are equal
        b1 = b * (a.norm() / b.norm())
        mid = run_kernel(SLERP, None, [a, b1], sp(0.25, norm), CTX)
        assert mid.norm().item() == pytest.approx(a.norm().item(), rel=1e-10)
        assert angle(mid, a) == pytest.approx(0.25 * angle(a, b1), rel=1e-9)


@pytest.mark.parametrize("norm", ["raw", "interpolate"])
def test_slerp_base_and_one_expert(norm):
    """mergekit's convention: a base and one model, t=0 the base, t=1 the model."""
    a, b = rand((6, 7), 12), 2.0 * rand((6, 7), 13)
    out = run_kernel(SLERP, a, [b], sp(0.4, norm), CTX)
    close(out, ref_slerp(a, b, 0.4, norm=norm))
    close(run_kernel(SLERP, a, [b], sp(0.0, norm), CTX), a, atol=1e-12)
    # two experts: the base (if any) only supplies config and tokenizer
    close(run_kernel(SLERP, rand((6, 7), 14), [a, b], sp(0.4, norm), CTX), out, atol=1e-14)
    with pytest.raises(ParameterError, match="needs 2 models"):
        SLERP.contract.check("slerp", has_base=False, n_experts=1)
    SLERP.contract.check("slerp", has_base=True, n_experts=1)
    with pytest.raises(ParameterError, match="at most 2 experts"):
        SLERP.contract.check("slerp", has_base=True, n_experts=3)


@pytest.mark.parametrize("norm", ["raw", "interpolate"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("factor", [1.0, 3.0, -1.0, -2.0])
def test_slerp_collinear_inputs_are_finite(factor, dtype, norm):
    a = rand((16, 8), 5, dtype)
    for t in (0.0, 0.3, 0.5, 1.0):
        out = run_kernel(SLERP, None, [a, factor * a], sp(t, norm), CTX)
        assert torch.isfinite(out).all()
        if factor > 0:  # same direction: both rules tend to linear interpolation
            close(out, a * ((1 - t) + t * factor), atol=1e-5, rtol=1e-5)
        elif norm == "interpolate" or factor == -1.0:  # antipodal: tends to cos(pi t) u1 times the norm
            expect = a * math.cos(math.pi * t) * ((1 - t) + t * abs(factor))
            close(out, expect, atol=1e-4, rtol=1e-4)
        else:  # raw, antipodal, unequal norms: the clipped coefficients, ~1/sin(eps), as written
            close(out, ref_slerp(a, factor * a.double(), t).to(dtype), atol=1e-4, rtol=1e-4)
    # nearly collinear: a tiny perpendicular perturbation stays close to linear interpolation
    b = a + 1e-9 * rand((16, 8), 6, dtype)
    out = run_kernel(SLERP, None, [a, b], sp(0.4, norm), CTX)
    close(out, 0.6 * a + 0.4 * b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm", ["raw", "interpolate"])
def test_slerp_zero_input_is_linear(norm):
    a, z = rand((6, 5), 7), torch.zeros(6, 5, dtype=torch.float64)
    out = run_kernel(SLERP, None, [z, a], sp(0.3, norm), CTX)
    close(out, 0.3 * a)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_slerp_nonfinite_input_stays_nonfinite(bad):
    a, b = rand((6, 5), 7), rand((6, 5), 8)
    b[2, 3] = bad
    out = run_kernel(SLERP, None, [a, b], sp(0.3), CTX)
    assert not torch.isfinite(out[2, 3]) and torch.isfinite(out[0, 0])  # falls back to the lerp


# ------------------------------------------------------------------ layer-adaptive SLERP

CONTEXTS = {
    "attn": TensorContext(
        name="model.layers.1.self_attn.q_proj.weight", layer=1, num_layers=5, kind=ModuleKind.ATTENTION
    ),
    "mlp": TensorContext(name="model.layers.1.mlp.up_proj.weight", layer=1, num_layers=5, kind=ModuleKind.MLP),
    "norm": TensorContext(name="model.layers.1.input_layernorm.weight", layer=1, num_layers=5, kind=ModuleKind.NORM),
    "embed": TensorContext(name="model.embed_tokens.weight", layer=None, num_layers=5, kind=ModuleKind.EMBEDDING),
}


def las_params(**kw):
    return LAS.validate_params(kw)


@pytest.mark.parametrize("key", list(CONTEXTS))
def test_layer_adaptive_constant_schedule_is_global_slerp(key):
    a, b = rand((12, 10), 10), 2.0 * rand((12, 10), 11)
    p = las_params(t_attention=[0.3], t_mlp=[0.3], t_other=[0.3], tau_omega=None)
    out = run_kernel(LAS, None, [a, b], p, CONTEXTS[key])
    close(out, ref_slerp(a, b, 0.3))
    close(out, run_kernel(SLERP, None, [a, b], sp(0.3), CONTEXTS[key]), atol=1e-14)
    p = las_params(t_attention=[0.3], t_mlp=[0.3], t_other=[0.3], tau_omega=None, norm="interpolate")
    close(run_kernel(LAS, None, [a, b], p, CONTEXTS[key]), ref_slerp(a, b, 0.3, norm="interpolate"))


def test_layer_adaptive_schedule_interpolates_over_depth():
    a, b = rand((12, 10), 12), rand((12, 10), 13)
    p = las_params(t_attention=[0.0, 0.2, 1.0], t_mlp=[1.0, 0.0], t_other=[0.9, 0.1], tau_omega=None)
    # layer 1 of 5: depth 0.25 -> position 0.5 of the 3-point attention schedule -> t = 0.1
    close(run_kernel(LAS, None, [a, b], p, CONTEXTS["attn"]), ref_slerp(a, b, 0.1))
    # the same depth on the 2-point MLP schedule: 1 - 0.25 = 0.75
    close(run_kernel(LAS, None, [a, b], p, CONTEXTS["mlp"]), ref_slerp(a, b, 0.75))
    # norm vectors inside layers follow t_other at their depth: 0.9 - 0.8 * 0.25 = 0.7
    close(run_kernel(LAS, None, [a[0], b[0]], p, CONTEXTS["norm"]), ref_slerp(a[0], b[0], 0.7))
    # tensors outside the layer stack take the first point of t_other
    close(run_kernel(LAS, None, [a, b], p, CONTEXTS["embed"]), ref_slerp(a, b, 0.9))
    last = TensorContext(
        name="model.layers.4.self_attn.o_proj.weight", layer=4, num_layers=5, kind=ModuleKind.ATTENTION
    )
    close(run_kernel(LAS, None, [a, b], p, last), b, atol=1e-12)


def model_pair(n_layers, noise, seed):
    """Two 'models' (dicts of tensors): parent 2 = parent 1 + noise * random."""
    names = ["model.embed_tokens.weight"]
    for layer in range(n_layers):
        names += [f"model.layers.{layer}.self_attn.q_proj.weight", f"model.layers.{layer}.mlp.up_proj.weight",
                  f"model.layers.{layer}.input_layernorm.weight"]
    shapes = {n: ((8,) if "norm" in n else (8, 8)) for n in names}
    m1 = {n: rand(shapes[n], seed + i) for i, n in enumerate(names)}
    m2 = {n: m1[n] + noise * rand(shapes[n], 1000 + seed + i) for i, n in enumerate(names)}
    return m1, m2


def ctx_for(name, n_layers, stats):
    from mergebench.methods import layer_index, module_kind

    return TensorContext(
        name=name, layer=layer_index(name), num_layers=n_layers, kind=module_kind(name), model_stats=stats
    )


def ref_mean_layer_angle(m1, m2):
    """Alg. 1 line 2 per layer (all of a layer's tensors concatenated), then the mean over layers."""
    from mergebench.methods import layer_index

    layers = sorted({layer_index(n) for n in m1 if layer_index(n) is not None})
    angles = []
    for layer in layers:
        names = [n for n in m1 if layer_index(n) == layer]
        x = torch.cat([m1[n].reshape(-1) for n in names])
        y = torch.cat([m2[n].reshape(-1) for n in names])
        angles.append(angle(x, y))
    return sum(angles) / len(angles)


@pytest.mark.parametrize("noise, triggers", [(0.1, False), (3.0, True)])
def test_layer_adaptive_guardrail(noise, triggers):
    from mergebench.baselines.spherical import mean_layer_angle

    n_layers = 3
    m1, m2 = model_pair(n_layers, noise, seed=20)
    omega_bar = ref_mean_layer_angle(m1, m2)
    tau = 0.5
    assert (omega_bar > tau) == triggers
    p = las_params(t_attention=[0.0, 1.0], t_mlp=[1.0, 0.0], t_other=[0.2], t=0.6, tau_omega=tau)
    # what the engine does: one prepass over every tensor, then the kernels see all stats
    stats = {n: dict(LAS.prepass(None, [m1[n], m2[n]], p, ctx_for(n, n_layers, {}))) for n in m1}
    assert mean_layer_angle(stats) == pytest.approx(omega_bar, rel=1e-9)
    for n in m1:
        ctx = ctx_for(n, n_layers, stats)
        out = LAS.kernel(None, [m1[n], m2[n]], torch.ones(2), p, ctx)
        if triggers:
            t = 0.6
        elif ctx.kind == ModuleKind.ATTENTION:
            t = ctx.depth
        elif ctx.kind == ModuleKind.MLP:
            t = 1.0 - ctx.depth
        else:
            t = 0.2
        close(out, ref_slerp(m1[n], m2[n], t))


def test_layer_adaptive_prepass_off_without_guardrail():
    a, b = rand((4, 4), 30), rand((4, 4), 31)
    assert LAS.prepass(None, [a, b], las_params(tau_omega=None), CTX) == {}
    stats = LAS.prepass(None, [a, b], las_params(), CTX)
    assert stats["omega"] == pytest.approx(angle(a, b), rel=1e-12)
    assert stats["weight"] == 16


# ------------------------------------------------------------------ Multi-SLERP


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp_matches_mergekit_recipe(with_base, normalize):
    base = rand((10, 12), 40)
    experts = [base + rand((10, 12), 41 + i) * s for i, s in enumerate([0.5, 1.0, 2.0, 0.7])]
    w = [0.1, 0.4, 0.3, 0.6]
    p = {"normalize_weights": normalize, "eps": 1e-8}
    out = MULTI.kernel(base if with_base else None, experts, torch.tensor(w, dtype=torch.float64), p, CTX)
    close(out, ref_multislerp(experts, w, base if with_base else None, normalize))


def test_multislerp_degenerate_mean_falls_back_to_linear():
    a = rand((5, 5), 50)
    experts = [a, -a, torch.zeros_like(a)]
    out = MULTI.kernel(None, experts, torch.ones(3), {"normalize_weights": True, "eps": 1e-8}, CTX)
    assert torch.isfinite(out).all()
    close(out, torch.zeros_like(a))


# ------------------------------------------------------------------ Karcher

KP = {"max_iter": 200, "tol": 1e-13, "eta": 1.0}


def test_karcher_single_model_is_that_model():
    a = rand((7, 3), 60, torch.float32)
    out = run_kernel(KARCHER, None, [a], KARCHER.validate_params(), CTX)
    assert torch.equal(out, a) and out.data_ptr() != a.data_ptr()
    w = torch.tensor([1.0, 2.0, 3.0])
    out = run_kernel(KARCHER, None, [a, a.clone(), a.clone()], KARCHER.validate_params(), CTX, weights=w)
    close(out, a, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("weights, t", [([1.0, 1.0], 0.5), ([0.7, 0.3], 0.3), ([1.0, 4.0], 0.8)])
def test_karcher_of_two_is_slerp(weights, t):
    """Two points: the weighted Karcher mean is the geodesic point at fraction w2 / (w1 + w2),
    and the norm average is the same linear one: SLERP with norm="interpolate" (the default
    raw SLERP differs for unequal norms); equal weights give that SLERP's midpoint."""
    a, b = rand((9, 11), 61), 2.5 * rand((9, 11), 62)
    out = run_kernel(KARCHER, None, [a, b], KP, CTX, weights=torch.tensor(weights, dtype=torch.float64))
    close(out, ref_slerp(a, b, t, norm="interpolate"), atol=1e-10)
    if t == 0.5:
        close(out, run_kernel(SLERP, None, [a, b], sp(0.5, "interpolate"), CTX), atol=1e-10)


@pytest.mark.parametrize("n", [3, 4, 5, 6])
def test_karcher_first_order_condition(n):
    g = torch.Generator().manual_seed(70 + n)
    experts = [torch.randn(20, 15, generator=g, dtype=torch.float64) * (0.5 + i) for i in range(n)]
    alpha = (torch.rand(n, generator=g, dtype=torch.float64) * 3 + 0.1).tolist()
    out = run_kernel(KARCHER, None, experts, KP, CTX, weights=torch.tensor(alpha, dtype=torch.float64))
    assert karcher_residual(out, experts, alpha) < 1e-10
    a = torch.tensor(alpha, dtype=torch.float64) / sum(alpha)
    assert out.norm().item() == pytest.approx(sum(ai * e.norm() for ai, e in zip(a, experts)).item(), rel=1e-10)
    # mergekit-aligned defaults (10 iterations, tol 1e-5) already land close to the mean
    w = torch.tensor(alpha, dtype=torch.float64)
    out = run_kernel(KARCHER, None, experts, KARCHER.validate_params(), CTX, weights=w)
    assert karcher_residual(out, experts, alpha) < 1e-4
    # float32 inputs converge to the same point
    out32 = run_kernel(KARCHER, None, [e.float() for e in experts], KP, CTX, weights=w)
    assert out32.dtype == torch.float32
    assert karcher_residual(out32, experts, alpha) < 1e-5


def test_karcher_is_not_the_chordal_mean():
    """The iteration moves: for spread-out experts the Karcher mean differs from the start."""
    experts = [rand((30,), 80 + i) for i in range(4)]
    alpha = [0.1, 0.2, 0.3, 0.4]
    chordal = sum(a * unit(e) for a, e in zip(alpha, experts))
    assert karcher_residual(chordal, experts, alpha) > 1e-3
    out = run_kernel(KARCHER, None, experts, KP, CTX, weights=torch.tensor(alpha, dtype=torch.float64))
    assert angle(out, chordal) > 1e-3


def test_karcher_permutation_invariance():
    experts = [rand((6, 7), 90 + i) for i in range(5)]
    w = torch.tensor([0.5, 1.0, 1.5, 2.0, 2.5])
    ref = run_kernel(KARCHER, None, experts, KARCHER.validate_params(), CTX, weights=w)
    for perm in list(itertools.permutations(range(5)))[1::17]:
        permuted = [experts[i] for i in perm]
        out = run_kernel(KARCHER, None, permuted, KARCHER.validate_params(), CTX, weights=w[list(perm)])
        close(out, ref, atol=1e-12)


def test_karcher_zero_norm_experts():
    a, b = rand((4, 4), 100), rand((4, 4), 101)
    z = torch.zeros(4, 4, dtype=torch.float64)
    out = run_kernel(KARCHER, None, [a, z, b], KP, CTX)
    assert torch.isfinite(out).all()
    # the zero tensor has no direction but counts (with norm 0) in the norm average
    close(unit(out), unit(ref_slerp(a, b, 0.5, norm="interpolate")), atol=1e-10)
    assert out.norm().item() == pytest.approx((a.norm() + b.norm()).item() / 3, rel=1e-10)
    close(run_kernel(KARCHER, None, [z, z.clone()], KP, CTX), z)


@pytest.mark.parametrize("with_fisher", [False, True])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_karcher_nonfinite_input_is_never_zeroed(bad, with_fisher):
    """A NaN/inf tensor has no direction; it used to come out as all zeros (finite!). Now the
    result is the weighted linear mean, so the bad element stays non-finite."""
    experts = [rand((5, 4), 104 + i) for i in range(3)]
    experts[1][2, 1] = bad
    ctx = fisher_ctx([torch.ones(5, 4, dtype=torch.float64) for _ in experts]) if with_fisher else CTX
    w = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
    out = run_kernel(KARCHER, None, experts, KP, ctx, weights=w)
    assert not torch.isfinite(out[2, 1])
    expect = (experts[0] + 2 * experts[1] + experts[2]) / 4
    keep = torch.isfinite(expect)
    close(out[keep], expect[keep])


def test_karcher_rejects_negative_weights():
    a, b = rand((3,), 102), rand((3,), 103)
    with pytest.raises(ValueError, match="nonnegative"):
        run_kernel(KARCHER, None, [a, b], KP, CTX, weights=torch.tensor([1.0, -1.0]))


def fisher_ctx(fisher):
    return TensorContext(
        name=CTX.name, layer=CTX.layer, num_layers=CTX.num_layers, kind=CTX.kind, aux={"fisher": fisher}
    )


def test_karcher_equal_fisher_is_plain_karcher():
    experts = [rand((8, 6), 110 + i, torch.float32) for i in range(4)]
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    f = rand((8, 6), 120, torch.float32).abs() + 0.1
    fisher = [f.clone() for _ in experts]
    copies = [x.clone() for x in fisher]
    plain = run_kernel(KARCHER, None, experts, KP, CTX, weights=w)
    pre = run_kernel(KARCHER, None, experts, KP, fisher_ctx(fisher), weights=w)
    close(pre, plain, atol=1e-5, rtol=1e-5)  # two code paths (Gram space vs full vectors)
    assert all(torch.equal(x, y) for x, y in zip(fisher, copies))
    # all-zero Fisher carries no information: the plain weighted mean is used everywhere
    zero = [torch.zeros_like(f) for _ in experts]
    close(run_kernel(KARCHER, None, experts, KP, fisher_ctx(zero), weights=w), plain, atol=1e-5, rtol=1e-5)


def test_karcher_fisher_first_order_condition_and_pull():
    experts = [rand((40,), 130 + i) for i in range(3)]
    g = torch.Generator().manual_seed(140)
    fisher = [torch.rand(40, generator=g, dtype=torch.float64) + 0.01 for _ in experts]
    out = run_kernel(KARCHER, None, experts, KP, fisher_ctx(fisher))
    # Fisher-weighted fixed point (equal weights): the tangent projection of sum F Log / sum F vanishes
    m = unit(out)
    num = sum(f * sphere_log(m, unit(e)) for f, e in zip(fisher, experts))
    v = num / sum(fisher)
    v = v - (v @ m) * m
    assert v.norm().item() < 1e-9
    # Fisher concentrated on expert 0 pulls the mean toward it
    plain = run_kernel(KARCHER, None, experts, KP, CTX)
    ones = torch.ones(40, dtype=torch.float64)
    heavy = [100.0 * ones, ones.clone(), ones.clone()]
    pulled = run_kernel(KARCHER, None, experts, KP, fisher_ctx(heavy))
    assert angle(pulled, experts[0]) < 0.5 * angle(plain, experts[0])


def test_karcher_fisher_validation():
    a, b = rand((3,), 150), rand((3,), 151)
    with pytest.raises(ValueError, match="Fisher tensors"):
        run_kernel(KARCHER, None, [a, b], KP, fisher_ctx([a.abs()]))
    with pytest.raises(ValueError, match="nonnegative"):
        run_kernel(KARCHER, None, [a, b], KP, fisher_ctx([a.abs(), -b.abs()]))


@pytest.mark.parametrize("spec", [SLERP, LAS, MULTI, KARCHER], ids=lambda s: s.name)
def test_bfloat16_inputs(spec):
    a, b = rand((16, 16), 160, torch.bfloat16), rand((16, 16), 161, torch.bfloat16)
    out = run_kernel(spec, a, [a, b], spec.validate_params(), CTX)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# ------------------------------------------------------------------ through the CLI


@pytest.mark.parametrize("norm", ["raw", "interpolate"])
def test_cli_slerp_base_and_one_expert(tiny_pool, tmp_path, norm):
    """`mergebench merge --method slerp --base A --experts B` (mergekit's convention): t=0 is
    the base, t=1 the expert; every tensor matches the float64 formula."""
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from mergebench.cli import app

    base, experts = tiny_pool
    out = tmp_path / "slerp"
    res = CliRunner().invoke(app, ["merge", "--method", "slerp", "--base", str(base), "--experts", str(experts[0]),
                                   "--set", "t=0.3", "--set", f"norm={norm}", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    merged = load_file(str(out / "model.safetensors"))
    a, b = load_file(str(base / "model.safetensors")), load_file(str(experts[0] / "model.safetensors"))
    assert merged.keys() == a.keys()
    for k in merged:
        close(merged[k], ref_slerp(a[k].double(), b[k].double(), 0.3, norm=norm).float(), atol=1e-6, rtol=1e-5)
    res = CliRunner().invoke(app, ["merge", "--method", "slerp", "--experts", str(experts[0]), "--out",
                                   str(tmp_path / "x"), "-q"])
    assert res.exit_code == 2 and "needs 2 models" in res.output and not (tmp_path / "x").exists()
