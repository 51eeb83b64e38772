"""Tests of the subspace merge methods (TSV-M, Iso-C, Subspace Boosting; seed 001 eqs. 5-11).

References are written here from the equations in numpy float64, independently of the kernels.
Subspace Boosting wraps task-vector methods from ``baselines.task_vector``; tests needing
one that is not registered are skipped with a reason.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from mergebench.baselines import subspace
from mergebench.methods import ModuleKind, ParameterError, TensorContext, get_method
from mergebench.testing import check_method, run_kernel

torch.set_num_threads(1)

MATRIX = TensorContext(name="model.layers.0.mlp.down_proj.weight", layer=0, num_layers=2, kind=ModuleKind.MLP)
VECTOR = TensorContext(name="model.layers.0.input_layernorm.weight", layer=0, num_layers=2, kind=ModuleKind.NORM)
EMBED = TensorContext(name="model.embed_tokens.weight", layer=None, num_layers=2, kind=ModuleKind.EMBEDDING)


def _available(name: str) -> bool:
    try:
        get_method(name)
    except Exception:  # not registered yet, or its module is still being written
        return False
    return True


def needs(name: str):
    return pytest.mark.skipif(not _available(name), reason=f"method {name!r} is not registered (task_vector.py)")


def make(shape, n, seed=0, spread=0.1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    experts = [base + spread * torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]
    return base.to(dtype), [e.to(dtype) for e in experts]


def merge(spec, base, experts, ctx=MATRIX, weights=None, **params):
    p = spec.validate_params(params, n_experts=len(experts))
    w = None if weights is None else torch.tensor(weights, dtype=torch.float32)
    return run_kernel(spec, base, experts, p, ctx, weights=w)


def low_rank(m, n, rank, g):
    f64 = torch.float64
    return torch.randn(m, rank, dtype=f64, generator=g) @ torch.randn(rank, n, dtype=f64, generator=g)


def np_(t):
    return t.detach().to(torch.float64).numpy()


def ta_params():
    """Parameters making the registered task_arithmetic a plain weighted sum (no normalization)."""
    names = get_method("task_arithmetic").param_names
    return {"normalize": False} if "normalize" in names else {}


# ------------------------------------------------------------------ float64 references (numpy)


def ref_task_arithmetic(base, experts, alphas, lam, mean=False):
    b = np_(base)
    d = sum(a * (np_(e) - b) for a, e in zip(alphas, experts))
    if mean:
        d = d / sum(alphas)
    return b + lam * d


def ref_polar(a):
    p, _, qt = np.linalg.svd(a, full_matrices=False)
    return p @ qt


def ref_tsv(base, experts, alphas, lam, k):
    """Seed 001 eqs. 5-8."""
    b = np_(base)
    us, ss, vs = [], [], []
    for a, e in zip(alphas, experts):
        u, s, vt = np.linalg.svd(a * (np_(e) - b), full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vt[:k].T)
    u_perp = ref_polar(np.concatenate(us, axis=1))
    v_perp = ref_polar(np.concatenate(vs, axis=1))
    sigma = np.diag(np.concatenate(ss))
    return b + lam * (u_perp @ sigma @ v_perp.T)


def ref_rank(s, shape):
    return int((s > s[0] * max(shape) * np.finfo(np.float64).eps).sum()) if s[0] > 0 else 0


def ref_iso_c(base, experts, alphas, lam):
    """Seed 001 eqs. 9-10, mean over the numerically nonzero singular values."""
    b = np_(base)
    d = sum(a * (np_(e) - b) for a, e in zip(alphas, experts))
    u, s, vt = np.linalg.svd(d, full_matrices=False)
    r = ref_rank(s, d.shape)
    return b + lam * s[:r].mean() * (u[:, :r] @ vt[:r])


def ref_boost_spectrum(s, beta):
    """Eq. 11 on a descending spectrum: j* = min{j : n_j >= beta}, sigma_j -> sigma_{j*} for j > j*."""
    n = np.cumsum(s) / s.sum()
    j_star = next(j for j in range(len(s)) if n[j] >= beta - 1e-15)
    out = s.copy()
    out[j_star + 1 :] = s[j_star]
    return out, j_star


def ref_boost(delta, beta):
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    s2, _ = ref_boost_spectrum(s, beta)
    return u @ np.diag(s2) @ vt


# ------------------------------------------------------------------ conformance kit


OWN = ["tsv_merge", "iso_c"]
WRAPPING = {"subspace_boosting": "task_arithmetic", "ta_sb": "task_arithmetic", "ties_sb": "ties"}


@pytest.mark.parametrize("name", OWN)
def test_conformance_own(name):
    spec = getattr(subspace, name)
    check_method(spec)
    check_method(spec, {"svd_embeddings": True, "lambda": 0.7, "fallback_mean": True})


def test_conformance_tsv_rank_fraction():
    check_method(subspace.tsv_merge, {"rank_fraction": 0.5})


@pytest.mark.parametrize("name", sorted(WRAPPING))
def test_conformance_boosting(name):
    if not _available(WRAPPING[name]):
        pytest.skip(f"{WRAPPING[name]!r} is not registered yet")
    check_method(getattr(subspace, name))
    check_method(getattr(subspace, name), {"svd_embeddings": True, "beta": 0.0})


@pytest.mark.parametrize("inner", subspace.INNER_METHODS)
def test_conformance_boosting_every_inner_method(inner):
    if not _available(inner):
        pytest.skip(f"{inner!r} is not registered yet")
    check_method(subspace.subspace_boosting, {"base_method": inner})


def test_registered_through_entry_points():
    for name in [*OWN, *WRAPPING]:
        assert get_method(name) is getattr(subspace, name)
        assert get_method(name).granularity == "matrix"
        assert get_method(name).contract.base == "required"


# ------------------------------------------------------------------ TSV-M


@pytest.mark.parametrize("shape", [(48, 32), (32, 48)])
def test_tsv_matches_reference(shape):
    base, experts = make(shape, 3, seed=1)
    alphas = [1.0, 0.5, 2.0]
    out = merge(subspace.tsv_merge, base, experts, weights=alphas, **{"lambda": 0.7})
    k = min(shape) // 3
    np.testing.assert_allclose(np_(out), ref_tsv(base, experts, alphas, 0.7, k), rtol=0, atol=1e-11)


def test_tsv_float32_close_to_float64_reference():
    base, experts = make((64, 64), 4, seed=2, dtype=torch.float32)
    out = merge(subspace.tsv_merge, base, experts)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(np_(out), ref_tsv(base, experts, [1.0] * 4, 1.0, 16), rtol=0, atol=2e-5)


def test_tsv_bfloat16_inputs():
    base, experts = make((48, 32), 3, seed=3, dtype=torch.bfloat16)
    out = merge(subspace.tsv_merge, base, experts)
    assert out.dtype == torch.bfloat16
    ref = ref_tsv(base, experts, [1.0] * 3, 1.0, 10)
    np.testing.assert_allclose(np_(out), ref, rtol=0, atol=3e-2)


def test_tsv_rank_fraction_parameter():
    base, experts = make((48, 32), 3, seed=4)
    out = merge(subspace.tsv_merge, base, experts, rank_fraction=0.25)
    np.testing.assert_allclose(np_(out), ref_tsv(base, experts, [1.0] * 3, 1.0, 8), rtol=0, atol=1e-11)
    # the default (None) is 1/T: floor(32 / 3) = 10 components per task
    default = merge(subspace.tsv_merge, base, experts)
    np.testing.assert_allclose(np_(default), ref_tsv(base, experts, [1.0] * 3, 1.0, 10), rtol=0, atol=1e-11)
    assert not np.allclose(np_(out), np_(default))


def _orthogonal_task_vectors(m, n, t, rank, seed):
    """Task vectors A_i diag(s_i) B_i^T with mutually orthogonal column and row spaces."""
    g = np.random.default_rng(seed)
    a, _ = np.linalg.qr(g.standard_normal((m, t * rank)))
    b, _ = np.linalg.qr(g.standard_normal((n, t * rank)))
    out = []
    for i in range(t):
        s = np.sort(g.uniform(0.1, 2.0, rank))[::-1]
        cols = slice(i * rank, (i + 1) * rank)
        out.append((a[:, cols], s, b[:, cols]))
    return out


def test_tsv_orthogonal_task_vectors_equal_task_arithmetic_of_truncations():
    m, n, t, rank, k = 64, 48, 3, 16, 12  # rank_fraction 0.25 of 48 keeps 12 of each rank-16 vector
    parts = _orthogonal_task_vectors(m, n, t, rank, seed=5)
    base = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    experts = [base + torch.from_numpy(a @ np.diag(s) @ b.T) for a, s, b in parts]
    out = merge(subspace.tsv_merge, base, experts, rank_fraction=0.25)
    truncated = sum(a[:, :k] @ np.diag(s[:k]) @ b[:, :k].T for a, s, b in parts)
    np.testing.assert_allclose(np_(out) - np_(base), truncated, rtol=0, atol=1e-12)
    # keeping everything (rank 16 = 48 / 3 = the default 1/T share) gives task arithmetic
    full = merge(subspace.tsv_merge, base, experts)
    np.testing.assert_allclose(np_(full), ref_task_arithmetic(base, experts, [1.0] * t, 1.0), rtol=0, atol=1e-12)


def test_tsv_weights_scale_task_vectors():
    base, experts = make((40, 24), 3, seed=6)
    alphas = [0.5, 1.5, 3.0]
    weighted = merge(subspace.tsv_merge, base, experts, weights=alphas)
    prescaled = [base + a * (e - base) for a, e in zip(alphas, experts)]
    torch.testing.assert_close(weighted, merge(subspace.tsv_merge, base, prescaled), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", OWN)
def test_single_expert(name):
    """T = 1: TSV keeps all min(m, n) components (its bases are already orthonormal), so it is
    task arithmetic; Iso-C instead flattens that one task vector's spectrum."""
    base, experts = make((40, 24), 1, seed=29)
    out = merge(getattr(subspace, name), base, experts, **{"lambda": 0.8})
    ta = ref_task_arithmetic(base, experts, [1.0], 0.8)
    if name == "tsv_merge":
        np.testing.assert_allclose(np_(out), ta, rtol=0, atol=1e-12)
    else:
        np.testing.assert_allclose(np_(out), ref_iso_c(base, experts, [1.0], 0.8), rtol=0, atol=1e-12)
        assert not np.allclose(np_(out), ta)


def test_tsv_more_experts_than_rank_keeps_one_component_each():
    base, experts = make((6, 4), 5, seed=7)
    out = merge(subspace.tsv_merge, base, experts)
    np.testing.assert_allclose(np_(out), ref_tsv(base, experts, [1.0] * 5, 1.0, 1), rtol=0, atol=1e-11)


# ------------------------------------------------------------------ Iso-C


def test_iso_c_matches_reference():
    base, experts = make((48, 32), 3, seed=8)
    alphas = [1.0, -0.5, 2.0]
    out = merge(subspace.iso_c, base, experts, weights=alphas, **{"lambda": 0.3})
    np.testing.assert_allclose(np_(out), ref_iso_c(base, experts, alphas, 0.3), rtol=0, atol=1e-12)


def test_iso_c_flat_spectrum_equal_to_the_mean_on_the_same_subspace():
    base, experts = make((64, 64), 4, seed=9)
    out = merge(subspace.iso_c, base, experts)
    delta_ta = sum(np_(e) - np_(base) for e in experts)
    s_ta = np.linalg.svd(delta_ta, compute_uv=False)
    s_out = np.linalg.svd(np_(out) - np_(base), compute_uv=False)
    np.testing.assert_allclose(s_out, np.full(64, s_ta.mean()), rtol=1e-10)
    # same subspace: U sigma_bar V^T = sigma_bar * polar(delta_TA)
    np.testing.assert_allclose(np_(out) - np_(base), s_ta.mean() * ref_polar(delta_ta), rtol=0, atol=1e-10)


def test_iso_c_rank_deficient_update_keeps_its_rank():
    """r counts the numerically nonzero singular values; null directions stay at zero."""
    g = torch.Generator().manual_seed(10)
    base = torch.randn(48, 32, dtype=torch.float64, generator=g)
    experts = [base + low_rank(48, 32, 2, g) for _ in range(3)]
    out = merge(subspace.iso_c, base, experts)
    delta_ta = sum(np_(e) - np_(base) for e in experts)
    s_ta = np.linalg.svd(delta_ta, compute_uv=False)
    assert ref_rank(s_ta, delta_ta.shape) == 6
    s_out = np.linalg.svd(np_(out) - np_(base), compute_uv=False)
    np.testing.assert_allclose(s_out[:6], np.full(6, s_ta[:6].mean()), rtol=1e-10)
    assert s_out[6:].max() < 1e-12 * s_out[0]
    np.testing.assert_allclose(np_(out), ref_iso_c(base, experts, [1.0] * 3, 1.0), rtol=0, atol=1e-12)


def test_iso_c_float32_close_to_float64_reference():
    base, experts = make((64, 48), 3, seed=11, dtype=torch.float32)
    out = merge(subspace.iso_c, base, experts)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(np_(out), ref_iso_c(base, experts, [1.0] * 3, 1.0), rtol=0, atol=2e-5)


# ------------------------------------------------------------------ fallbacks (1-D, embeddings)


@pytest.mark.parametrize("name", OWN)
def test_vector_fallback_is_task_arithmetic(name):
    spec = getattr(subspace, name)
    base, experts = make((32,), 3, seed=12)
    alphas = [1.0, 0.5, 2.0]
    out = merge(spec, base, experts, ctx=VECTOR, weights=alphas, **{"lambda": 0.4})
    np.testing.assert_allclose(np_(out), ref_task_arithmetic(base, experts, alphas, 0.4), rtol=0, atol=1e-14)
    mean = merge(spec, base, experts, ctx=VECTOR, weights=alphas, fallback_mean=True, **{"lambda": 0.4})
    ref = ref_task_arithmetic(base, experts, alphas, 0.4, mean=True)
    np.testing.assert_allclose(np_(mean), ref, rtol=0, atol=1e-14)


@pytest.mark.parametrize("name", OWN)
def test_vector_fallback_float32(name):
    base, experts = make((32,), 3, seed=13, dtype=torch.float32)
    out = merge(getattr(subspace, name), base, experts, ctx=VECTOR)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(np_(out), ref_task_arithmetic(base, experts, [1.0] * 3, 1.0), rtol=0, atol=1e-6)


def test_fallback_mean_with_zero_weight_sum_is_a_clear_error():
    base, experts = make((8,), 2, seed=14)
    with pytest.raises(ValueError, match="input_layernorm.*sum to zero"):
        merge(subspace.iso_c, base, experts, ctx=VECTOR, weights=[1.0, -1.0], fallback_mean=True)


@pytest.mark.parametrize("name", OWN)
def test_embeddings_take_the_fallback_unless_asked(name):
    spec = getattr(subspace, name)
    base, experts = make((40, 16), 3, seed=15)
    out = merge(spec, base, experts, ctx=EMBED)
    np.testing.assert_allclose(np_(out), ref_task_arithmetic(base, experts, [1.0] * 3, 1.0), rtol=0, atol=1e-14)
    svd = merge(spec, base, experts, ctx=EMBED, svd_embeddings=True)
    ref = ref_tsv(base, experts, [1.0] * 3, 1.0, 5) if name == "tsv_merge" else ref_iso_c(base, experts, [1.0] * 3, 1.0)
    np.testing.assert_allclose(np_(svd), ref, rtol=0, atol=1e-12)


# ------------------------------------------------------------------ Subspace Boosting


def test_boost_spectrum_reference_sanity():
    # the reference itself on a hand-checked case: n = [.4, .7, .9, 1.0]
    s, j = ref_boost_spectrum(np.array([4.0, 3.0, 2.0, 1.0]), 0.5)
    assert j == 1 and s.tolist() == [4.0, 3.0, 3.0, 3.0]
    s, j = ref_boost_spectrum(np.array([4.0, 3.0, 2.0, 1.0]), 0.4)
    assert j == 0 and s.tolist() == [4.0, 4.0, 4.0, 4.0]


@needs("task_arithmetic")
@pytest.mark.parametrize("beta", [0.0, 0.05, 0.2, 0.5, 0.9])
def test_boosting_matches_reference(beta):
    base, experts = make((48, 32), 3, seed=16)
    alphas = [1.0, 0.5, 2.0]
    out = merge(subspace.subspace_boosting, base, experts, weights=alphas, beta=beta, **{"lambda": 0.6}, **ta_params())
    delta_ta = ref_task_arithmetic(base, experts, alphas, 1.0) - np_(base)
    np.testing.assert_allclose(np_(out), np_(base) + 0.6 * ref_boost(delta_ta, beta), rtol=0, atol=1e-11)


@needs("task_arithmetic")
def test_boosting_small_beta_flattens_the_tail_to_sigma_j_star():
    base, experts = make((64, 64), 4, seed=17)
    out = merge(subspace.ta_sb, base, experts, beta=0.1, **ta_params())
    delta_ta = ref_task_arithmetic(base, experts, [1.0] * 4, 1.0) - np_(base)
    s_ta = np.linalg.svd(delta_ta, compute_uv=False)
    n = np.cumsum(s_ta) / s_ta.sum()
    j_star = int(np.argmax(n >= 0.1))
    assert 0 < j_star < 20
    s_out = np.linalg.svd(np_(out) - np_(base), compute_uv=False)
    np.testing.assert_allclose(s_out[: j_star + 1], s_ta[: j_star + 1], rtol=1e-10)
    np.testing.assert_allclose(s_out[j_star + 1 :], s_ta[j_star], rtol=1e-10)


@needs("task_arithmetic")
@pytest.mark.parametrize("name", ["subspace_boosting", "ta_sb"])
def test_boosting_beta_one_is_the_inner_method(name):
    base, experts = make((48, 32), 3, seed=18)
    alphas = [1.0, 0.5, 2.0]
    out = merge(getattr(subspace, name), base, experts, weights=alphas, beta=1.0, **{"lambda": 0.5}, **ta_params())
    # lambda applied once: W0 + 0.5 * sum alpha_i delta_i (not 0.25)
    np.testing.assert_allclose(np_(out), ref_task_arithmetic(base, experts, alphas, 0.5), rtol=0, atol=1e-12)


@needs("task_arithmetic")
def test_boosting_lambda_applied_once_for_any_beta():
    base, experts = make((32, 32), 3, seed=19)
    one = merge(subspace.ta_sb, base, experts, beta=0.2, **{"lambda": 1.0})
    half = merge(subspace.ta_sb, base, experts, beta=0.2, **{"lambda": 0.5})
    torch.testing.assert_close(half - base, 0.5 * (one - base), rtol=0, atol=1e-12)
    assert not torch.allclose(half - base, 0.25 * (one - base))


@needs("task_arithmetic")
def test_boosting_float32_close_to_float64_reference():
    base, experts = make((64, 48), 3, seed=20, dtype=torch.float32)
    out = merge(subspace.ta_sb, base, experts, **ta_params())
    assert out.dtype == torch.float32
    delta_ta = ref_task_arithmetic(base, experts, [1.0] * 3, 1.0) - np_(base)
    np.testing.assert_allclose(np_(out), np_(base) + ref_boost(delta_ta, 0.2), rtol=0, atol=2e-5)


@needs("task_arithmetic")
def test_boosting_rank_deficient_update_does_not_inflate_null_directions():
    g = torch.Generator().manual_seed(21)
    base = torch.randn(40, 24, dtype=torch.float64, generator=g)
    experts = [base + low_rank(40, 24, 1, g) for _ in range(3)]
    out = merge(subspace.ta_sb, base, experts, beta=0.0, **ta_params())
    s_out = np.linalg.svd(np_(out) - np_(base), compute_uv=False)
    delta_ta = ref_task_arithmetic(base, experts, [1.0] * 3, 1.0) - np_(base)
    s_ta = np.linalg.svd(delta_ta, compute_uv=False)
    np.testing.assert_allclose(s_out[:3], s_ta[0], rtol=1e-10)  # beta = 0: all r = 3 raised to sigma_1
    assert s_out[3:].max() < 1e-12 * s_out[0]


@needs("task_arithmetic")
def test_boosting_vector_and_embedding_fallback_is_task_arithmetic():
    spec = subspace.subspace_boosting
    base, experts = make((32,), 3, seed=22)
    alphas = [1.0, 0.5, 2.0]
    out = merge(spec, base, experts, ctx=VECTOR, weights=alphas, beta=0.0, **{"lambda": 0.4}, **ta_params())
    np.testing.assert_allclose(np_(out), ref_task_arithmetic(base, experts, alphas, 0.4), rtol=0, atol=1e-14)
    base, experts = make((40, 16), 3, seed=23)
    emb = merge(spec, base, experts, ctx=EMBED, beta=0.0, **ta_params())
    np.testing.assert_allclose(np_(emb), ref_task_arithmetic(base, experts, [1.0] * 3, 1.0), rtol=0, atol=1e-14)
    boosted = merge(spec, base, experts, ctx=EMBED, beta=0.0, svd_embeddings=True, **ta_params())
    delta_ta = ref_task_arithmetic(base, experts, [1.0] * 3, 1.0) - np_(base)
    np.testing.assert_allclose(np_(boosted), np_(base) + ref_boost(delta_ta, 0.0), rtol=0, atol=1e-11)


@needs("ties")
def test_boosting_over_ties_beta_one_is_ties_with_the_same_lambda():
    ties = get_method("ties")
    base, experts = make((48, 32), 3, seed=24)
    alphas = [1.0, 0.5, 2.0]
    density = {"density": 0.5} if "density" in ties.param_names else {}
    sb = subspace.subspace_boosting
    out = merge(sb, base, experts, weights=alphas, base_method="ties", beta=1.0, **{"lambda": 0.3}, **density)
    expected = merge(ties, base, experts, weights=alphas, **{"lambda": 0.3}, **density)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    # 1-D tensors are not boosted: TIES with the same lambda whatever beta is
    vb, ve = make((32,), 3, seed=25)
    vec = merge(sb, vb, ve, ctx=VECTOR, base_method="ties", beta=0.0, **{"lambda": 0.3}, **density)
    torch.testing.assert_close(vec, merge(ties, vb, ve, ctx=VECTOR, **{"lambda": 0.3}, **density), rtol=0, atol=1e-12)


@needs("ties")
def test_ties_sb_is_boosted_ties_with_seed_001_settings():
    ties = get_method("ties")
    base, experts = make((48, 32), 3, seed=26)
    out = merge(subspace.ties_sb, base, experts)
    inner = {k: v for k, v in {"density": 0.1, "lambda": 1.0}.items() if k in ties.param_names}
    delta = np_(merge(ties, base, experts, **inner)) - np_(base)
    np.testing.assert_allclose(np_(out), np_(base) + 0.1 * ref_boost(delta, 0.2), rtol=0, atol=1e-11)


@needs("task_arithmetic")
def test_boosting_rejects_a_parameter_the_inner_method_lacks():
    names = set(get_method("task_arithmetic").param_names)
    foreign = next((p for p in ("density", "consensus", "epsilon", "gamma", "rescale") if p not in names), None)
    if foreign is None:
        pytest.skip("task_arithmetic takes every pass-through parameter")
    value = {"density": 0.5, "consensus": "sum", "epsilon": 0.1, "gamma": 0.01, "rescale": "l1"}[foreign]
    base, experts = make((8, 8), 2)
    with pytest.raises(ParameterError, match=f"task_arithmetic.*{foreign}"):
        merge(subspace.subspace_boosting, base, experts, **{foreign: value})


def test_boosting_parameter_validation():
    spec = subspace.subspace_boosting
    with pytest.raises(ParameterError, match="beta"):
        spec.validate_params({"beta": 1.5})
    with pytest.raises(ParameterError, match="base_method"):
        spec.validate_params({"base_method": "iso_c"})
    with pytest.raises(ParameterError, match="rank_fraction"):
        subspace.tsv_merge.validate_params({"rank_fraction": 0.0})


def test_kernels_do_not_mutate_inputs_with_weights():
    base, experts = make((24, 16), 3, seed=27, dtype=torch.float32)
    copies = [base.clone(), *[e.clone() for e in experts]]
    for name in OWN:
        merge(getattr(subspace, name), base, experts, weights=[0.5, 1.0, 2.0])
    for a, b in zip(copies, [base, *experts]):
        assert torch.equal(a, b)


def test_docstrings_state_the_fallback():
    for name in [*OWN, *WRAPPING]:
        doc = getattr(subspace, name).kernel.__doc__
        assert "1-D" in doc and "embeddings" in doc, name


def test_tsv_wall_time_on_a_moderate_matrix():
    """Smoke bound: 4 experts of 512x512 float32 (6 SVDs) finish well under a few seconds."""
    import time

    base, experts = make((512, 512), 4, seed=28, dtype=torch.float32)
    t0 = time.perf_counter()
    merge(subspace.tsv_merge, base, experts)
    assert time.perf_counter() - t0 < 10.0


@needs("dare_linear")
@pytest.mark.parametrize("rescale", ["inherit", None, "l1"])
def test_boosting_over_dare_forwards_rescale_and_the_generator(rescale):
    """beta = 1 over a stochastic method: the same draws (ctx.generator) and the same rescale
    as calling it directly; rescale=None means 'no rescaling', 'inherit' its default."""
    dare = get_method("dare_linear")
    base, experts = make((32, 24), 3, seed=30)
    out = merge(subspace.subspace_boosting, base, experts, base_method="dare_linear", beta=1.0, density=0.5,
                rescale=rescale, **{"lambda": 0.7})
    direct = {} if rescale == "inherit" else {"rescale": rescale}
    expected = merge(dare, base, experts, density=0.5, **direct, **{"lambda": 0.7})
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    if rescale is None:
        default = merge(dare, base, experts, density=0.5, **{"lambda": 0.7})
        assert not torch.allclose(out, default)  # 'none' really differs from the default rescaling


@needs("task_arithmetic")
def test_boosting_bfloat16_inputs():
    base, experts = make((48, 32), 3, seed=31, spread=0.02, dtype=torch.bfloat16)
    out = merge(subspace.ta_sb, base, experts, **ta_params())
    assert out.dtype == torch.bfloat16
    delta_ta = ref_task_arithmetic(base, experts, [1.0] * 3, 1.0) - np_(base)
    ref = np_(base) + ref_boost(delta_ta, 0.2)
    # within bf16 rounding of the output (|W| < 5: half an ulp is at most 2**-6)
    np.testing.assert_allclose(np_(out), ref, rtol=0, atol=2**-6 + 1e-6)


def test_wrapped_method_parameters_are_validated_before_any_tensor():
    from mergebench.methods import ParameterError, get_method

    spec = get_method("subspace_boosting")
    with pytest.raises(ParameterError, match="has no parameter 'gamma'"):
        spec.validate_params({"base_method": "ties", "gamma": 0.1}, n_experts=2)
    with pytest.raises(ParameterError, match="consensus"):
        get_method("ties_sb").validate_params({"consensus": "vote"}, n_experts=2)
    assert spec.validate_params({"base_method": "breadcrumbs", "gamma": 0.1}, n_experts=2)["gamma"] == (0.1, 0.1)
