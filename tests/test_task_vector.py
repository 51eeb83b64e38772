"""Task-vector family (baselines/task_vector.py): conformance, float64 references written
from the papers' formulas, stochastic behaviour, parameter validation, mergekit parity."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from mergebench.baselines._sparsify import della_keep_probs, keep_count, kth_largest, top_k_mask
from mergebench.methods import ParameterError, TensorContext, get_method
from mergebench.testing import method_checks

METHODS = [
    "task_arithmetic", "ties", "dare_linear", "dare_ties", "della_linear", "della_ties",
    "breadcrumbs", "breadcrumbs_ties", "sce",
]
# Non-default parameters that switch the sparsification on.
SPARSE = {
    "task_arithmetic": {"normalize": True, "lambda": 0.7},
    "ties": {"density": 0.3, "consensus": "count"},
    "dare_linear": {"density": 0.4},
    "dare_ties": {"density": 0.4, "rescale": "l1", "normalize": True},
    "della_linear": {"density": 0.4, "epsilon": 0.2},
    "della_ties": {"density": 0.5, "epsilon": 0.1, "rescale": None},
    "breadcrumbs": {"density": 0.5, "gamma": 0.1, "rescale": "l1"},
    "breadcrumbs_ties": {"density": 0.5, "gamma": 0.1, "normalize": True},
    "sce": {"select_topk": 0.3},
}


def _conformance_cases():
    for name in METHODS:
        spec = get_method(name)
        for check in method_checks(spec):
            yield pytest.param(check, id=f"default-{check.name}")
        # idempotence is declared for default params only (sparsifying a lone task vector shrinks it)
        relaxed = dataclasses.replace(spec, properties=spec.properties - {"idempotent"})
        for check in method_checks(relaxed, SPARSE[name]):
            yield pytest.param(check, id=f"sparse-{check.name}")


@pytest.mark.parametrize("check", list(_conformance_cases()))
def test_conformance(check):
    check()


# ----------------------------------------------------------------------------- fixtures


def _data(shape=(12, 10), n=3, seed=0, spread=0.1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    experts = [base + spread * torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]
    return base.to(dtype), [e.to(dtype) for e in experts]


def _run(name, base, experts, weights=None, seed=None, **params):
    spec = get_method(name)
    p = spec.validate_params(params, n_experts=len(experts))
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    w = torch.ones(len(experts)) if weights is None else torch.tensor(weights, dtype=torch.float64)
    return spec(base, experts, w, p, TensorContext(name="model.layers.0.mlp.up_proj.weight", generator=gen))


def _draws(seed, shape, densities):
    """The uniforms the kernel draws (documented protocol: one float32 rand per expert with 0 < p < 1)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(shape, generator=g, dtype=torch.float32) if 0 < p < 1 else None for p in densities]


# ----------------------------------------------------------------------------- references (float64)


def ref_trim(delta, density):
    """TIES trim: keep the k = max(1, floor(density n)) largest |delta| (ties: lower index)."""
    if density >= 1:
        return delta.clone()
    flat = delta.reshape(-1)
    k = max(1, math.floor(density * flat.numel() + 1e-6)) if density > 0 else 0
    order = torch.argsort(-flat.abs(), stable=True)
    out = torch.zeros_like(flat)
    out[order[:k]] = flat[order[:k]]
    return out.reshape(delta.shape)


def ref_window(delta, density, gamma):
    """Breadcrumbs: by descending |delta|, skip the first floor(gamma n) (shrunk to fit), keep floor(density n)."""
    if density >= 1:
        return delta.clone()
    flat = delta.reshape(-1)
    n = flat.numel()
    keep = math.floor(density * n + 1e-6)
    top = min(math.floor(gamma * n + 1e-6), n - keep)
    order = torch.argsort(-flat.abs(), stable=True)[top : top + keep]
    out = torch.zeros_like(flat)
    out[order] = flat[order]
    return out.reshape(delta.shape)


def ref_disjoint(deltas, weights, consensus="sum", normalize=True):
    """TIES steps 2-3 from the paper: elected sign gamma = sgn(sum_i w_i d_i) (or the majority
    of sgn(w_i d_i)), A = {i : sgn(w_i d_i) = gamma}, merged = sum_{i in A} w_i d_i [/ sum_{i in A} w_i]."""
    wd = [w * d for w, d in zip(weights, deltas)]
    if consensus == "sum":
        vote = sum(wd)
    else:
        vote = sum(torch.sign(x) for x in wd)
    gamma = torch.where(vote >= 0, 1.0, -1.0).double()
    num = torch.zeros_like(deltas[0])
    den = torch.zeros_like(deltas[0])
    for w, x in zip(weights, wd):
        inA = (torch.sign(x) == gamma).double()
        num += inA * x
        den += inA * w
    if normalize:
        den[den == 0] = 1.0
        return num / den
    return num


def ref_della_probs(delta, p, eps):
    """DELLA MagPrune: per row, rank r in 0..n-1 by ascending |delta|, p_r = p - eps + 2 eps r / (n - 1)."""
    rows = delta.reshape(1, -1) if delta.dim() == 1 else delta.reshape(delta.shape[0], -1)
    n = rows.shape[1]
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1, stable=True), dim=1).double()
    return (p - eps) + 2 * eps * ranks / (n - 1)


def _rescaled(delta, keep, scale_paper, rescale):
    kept = delta * keep
    if rescale == "paper":
        return torch.where(keep > 0, kept * scale_paper, 0.0)
    if rescale == "l1":
        return kept * (delta.abs().sum() / kept.abs().sum()) if kept.abs().sum() > 0 else kept
    return kept


def ref_dare(delta, p, u, rescale):
    if p >= 1:
        return delta.clone()
    return _rescaled(delta, (u < p).double(), 1.0 / p, rescale)


def ref_della(delta, p, eps, u, rescale):
    if p >= 1:
        return delta.clone()
    probs = ref_della_probs(delta, p, eps).reshape(delta.shape)
    keep = (u.double().reshape(delta.shape) < probs).double()
    return _rescaled(delta, keep, 1.0 / probs, rescale)


def ref_sce(base, experts, topk):
    d = torch.stack([e - base for e in experts]).double()
    if topk < 1:
        var = d.var(dim=0, unbiased=False).reshape(-1)
        m = int((var != 0).sum())
        k = math.floor(topk * m + 1e-6)
        keep = torch.zeros_like(var)
        keep[torch.argsort(-var, stable=True)[:k]] = 1.0
        d = d * keep.reshape(base.shape)
    ss = (d**2).sum(dim=tuple(range(1, d.dim())))
    eta = ss / ss.sum() if ss.sum() > 0 else torch.full_like(ss, 1 / len(experts))
    gamma = torch.where(d.sum(0) >= 0, 1.0, -1.0).double()
    inA = (torch.sign(d) == gamma).double()
    w = eta.reshape(-1, *([1] * base.dim()))
    num = (w * inA * d).sum(0)
    den = (w * inA).sum(0)
    den[den == 0] = 1.0
    return base + num / den


# ----------------------------------------------------------------------------- task arithmetic


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("lam", [1.0, 0.3, -0.5])
def test_task_arithmetic_matches_eq2_and_eq12(normalize, lam):
    base, experts = _data(n=4, seed=1)
    w = [1.0, 0.5, -0.25, 2.0]
    delta = sum(a * (e - base) for a, e in zip(w, experts))
    if normalize:
        delta = delta / sum(w)
    out = _run("task_arithmetic", base, experts, w, normalize=normalize, **{"lambda": lam})
    torch.testing.assert_close(out, base + lam * delta, rtol=1e-12, atol=1e-12)


def test_task_arithmetic_zero_weight_sum_with_normalize_is_an_error():
    base, experts = _data(n=2)
    with pytest.raises(ValueError, match="sum to zero"):
        _run("task_arithmetic", base, experts, [1.0, -1.0], normalize=True)


# ----------------------------------------------------------------------------- TIES


@pytest.mark.parametrize("density", [0.1, 0.37, 1.0, (0.2, 0.55, 1.0, 0.05)])
@pytest.mark.parametrize("consensus", ["sum", "count"])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_matches_reference(density, consensus, normalize):
    base, experts = _data(shape=(16, 9), n=4, seed=2)
    w = [1.0, 0.7, 1.3, 0.4]
    dens = density if isinstance(density, tuple) else (density,) * 4
    trimmed = [ref_trim(e - base, p) for e, p in zip(experts, dens)]
    lam = 0.6
    expected = base + lam * ref_disjoint(trimmed, w, consensus, normalize)
    out = _run("ties", base, experts, w, density=density, consensus=consensus, normalize=normalize, **{"lambda": lam})
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("density", [0.05, 0.3, 0.77])
def test_ties_trim_keeps_exactly_top_k(dtype, density):
    """One expert: the merge is the trimmed task vector itself. Exactly k entries survive,
    and every kept magnitude is >= every dropped one, even with many exact ties (integers)."""
    g = torch.Generator().manual_seed(3)
    base = torch.zeros(50, 40, dtype=dtype)
    delta = torch.randint(-6, 7, (50, 40), generator=g).to(dtype)  # lots of ties, some zeros
    delta[delta == 0] = 1
    out = _run("ties", base, [base + delta], density=density)
    k = max(1, math.floor(density * delta.numel() + 1e-6))
    kept = out != 0
    assert int(kept.sum()) == k
    assert delta[kept].abs().min() >= delta[~kept].abs().max()
    torch.testing.assert_close(out[kept], delta[kept])


def test_sign_election_sum_and_count_differ():
    # one entry, three experts: +1, +1, -5. Sum elects '-', count elects '+'.
    base = torch.zeros(1, dtype=torch.float64)
    experts = [base + 1.0, base + 1.0, base - 5.0]
    by_sum = _run("ties", base, experts, consensus="sum")
    by_count = _run("ties", base, experts, consensus="count")
    assert by_sum.item() == pytest.approx(-5.0)  # only the '-' expert agrees; mean over it
    assert by_count.item() == pytest.approx(1.0)  # the two '+' experts agree; their mean
    unnorm = _run("ties", base, experts, consensus="count", normalize=False)
    assert unnorm.item() == pytest.approx(2.0)


def test_ties_votes_with_weighted_deltas():
    # deltas +1, +1, +3 with weights 1, 1, -1: the weighted deltas +1, +1, -3 sum to -1, so
    # '-' is elected and only the third expert agrees: w*d = -3, divided by its weight -1.
    base = torch.zeros(1, dtype=torch.float64)
    experts = [base + 1.0, base + 1.0, base + 3.0]
    w = [1.0, 1.0, -1.0]
    assert _run("ties", base, experts, w).item() == pytest.approx(3.0)
    assert _run("ties", base, experts, w, normalize=False).item() == pytest.approx(-3.0)
    assert _run("ties", base, experts, w, consensus="count").item() == pytest.approx(1.0)


# ----------------------------------------------------------------------------- DARE


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("rescale", ["paper", "l1", None])
@pytest.mark.parametrize("density,w", [(0.3, [1.0, 0.6, 1.4]), ((0.2, 1.0, 0.9), [1.0, 0.6, 1.4]), (0.5, [1.0, 0.0, 1.4])])
def test_dare_matches_reference_with_same_draws(method, rescale, density, w):
    """A zero-weight expert still consumes its draws, so the other masks do not shift."""
    base, experts = _data(shape=(14, 11), n=3, seed=4)
    dens = density if isinstance(density, tuple) else (density,) * 3
    u = _draws(99, base.shape, dens)
    dropped = [ref_dare(e - base, p, ui, rescale) for e, p, ui in zip(experts, dens, u)]
    if method == "dare_linear":
        merged = sum(a * d for a, d in zip(w, dropped))
    else:
        merged = ref_disjoint(dropped, w, "sum", normalize=False)
    out = _run(method, base, experts, w, seed=99, density=density, rescale=rescale)
    torch.testing.assert_close(out, base + merged, rtol=1e-10, atol=1e-12)


def test_dare_is_unbiased():
    """E[DARE(delta)] = delta with the paper's 1/p rescale: the mean over S seeds is within
    a few standard errors (sd = |sum_i w_i d_i| ... per entry, computed exactly) of task arithmetic."""
    base, experts = _data(shape=(10, 10), n=3, seed=5)
    p, S = 0.3, 600
    deltas = [e - base for e in experts]
    mean = torch.zeros_like(base)
    for s in range(S):
        mean += _run("dare_linear", base, experts, seed=s, density=p) - base
    mean /= S
    target = sum(deltas)
    # Var of one draw of sum_i B_i d_i / p = sum_i d_i^2 (1 - p) / p
    se = torch.sqrt(sum(d**2 for d in deltas) * (1 - p) / p / S)
    z = (mean - target) / se
    assert z.abs().max() < 5.0
    assert abs(z.mean()) < 5.0 / math.sqrt(z.numel())  # no systematic bias overall
    # 'none' keeps survivors as they are: expectation p * delta instead
    none = sum(_run("dare_linear", base, experts, seed=s, density=p, rescale=None) - base for s in range(S)) / S
    assert ((none - p * target) / (se * p)).abs().max() < 5.0


def test_dare_l1_rescale_preserves_l1_norm():
    base, experts = _data(n=1, seed=6)
    out = _run("dare_linear", base, experts, seed=3, density=0.25, rescale="l1")
    delta = experts[0] - base
    assert (out - base).abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-10)
    kept = (out - base) != 0
    assert 0 < int(kept.sum()) < delta.numel()


def test_dare_extremes_and_generator_requirement():
    base, experts = _data(n=2)
    torch.testing.assert_close(_run("dare_linear", base, experts, seed=1, density=0.0), base)
    # density 1 draws nothing and needs no generator: plain task arithmetic
    torch.testing.assert_close(_run("dare_linear", base, experts, density=1.0), base + sum(e - base for e in experts))
    with pytest.raises(ValueError, match="generator"):
        _run("dare_linear", base, experts, density=0.5)
    a = _run("dare_linear", base, experts, seed=1, density=0.5)
    b = _run("dare_linear", base, experts, seed=2, density=0.5)
    assert not torch.equal(a, b)


# ----------------------------------------------------------------------------- DELLA


@pytest.mark.parametrize("shape", [(9, 13), (17,), (4, 3, 5)])
def test_della_probabilities_in_window_and_rank_ordered(shape):
    g = torch.Generator().manual_seed(7)
    delta = torch.randn(shape, generator=g, dtype=torch.float64)
    p, eps = 0.4, 0.25
    probs = della_keep_probs(delta, p, eps)
    rows = delta.reshape(1, -1) if delta.dim() == 1 else delta.reshape(shape[0], -1)
    assert probs.shape == rows.shape
    assert probs.min() >= p - eps - 1e-12 and probs.max() <= p + eps + 1e-12
    for r, pr in zip(rows, probs):
        order = torch.argsort(r.abs())
        assert torch.all(torch.diff(pr[order]) > 0), "keep probability must rise with |delta|"
        assert pr.min().item() == pytest.approx(p - eps) and pr.max().item() == pytest.approx(p + eps)
        assert pr.mean().item() == pytest.approx(p)
    torch.testing.assert_close(probs, ref_della_probs(delta, p, eps))


@pytest.mark.parametrize("method", ["della_linear", "della_ties"])
@pytest.mark.parametrize("rescale", ["paper", "l1", None])
def test_della_matches_reference_with_same_draws(method, rescale):
    base, experts = _data(shape=(8, 15), n=3, seed=8)
    w = [1.0, 0.5, 1.5]
    dens, eps = (0.5, 0.3, 0.7), (0.2, 0.3, 0.3)  # closed windows [0.3, 0.7], [0, 0.6], [0.4, 1]
    u = _draws(11, base.shape, dens)
    pruned = [ref_della(e - base, p, ep, ui, rescale) for e, p, ep, ui in zip(experts, dens, eps, u)]
    if method == "della_linear":
        merged = sum(a * d for a, d in zip(w, pruned))
    else:
        merged = ref_disjoint(pruned, w, "sum", normalize=True)
    out = _run(method, base, experts, w, seed=11, density=dens, epsilon=eps, rescale=rescale, **{"lambda": 0.8})
    torch.testing.assert_close(out, base + 0.8 * merged, rtol=1e-10, atol=1e-12)


def test_della_is_unbiased_and_keeps_large_entries_more_often():
    base, experts = _data(shape=(6, 20), n=1, seed=9)
    delta = experts[0] - base
    p, eps, S = 0.4, 0.3, 600
    mean = torch.zeros_like(base)
    kept = torch.zeros_like(base)
    for s in range(S):
        d = _run("della_linear", base, experts, seed=s, density=p, epsilon=eps) - base
        mean += d
        kept += (d != 0).double()
    mean /= S
    kept /= S
    probs = ref_della_probs(delta, p, eps)
    se_keep = torch.sqrt(probs * (1 - probs) / S)
    assert ((kept - probs) / se_keep).abs().max() < 5.0
    se = delta.abs() * torch.sqrt((1 - probs) / probs / S)
    assert ((mean - delta) / se).abs().max() < 5.0


# ----------------------------------------------------------------------------- Breadcrumbs


@pytest.mark.parametrize("density,gamma", [(0.5, 0.1), (0.9, 0.2), (0.3, 0.0), (1.0, 0.05), ((0.4, 0.6), (0.05, 0.3))])
@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_matches_reference(method, density, gamma):
    base, experts = _data(shape=(10, 12), n=2, seed=10)
    w = [0.8, 1.2]
    dens = density if isinstance(density, tuple) else (density,) * 2
    gams = gamma if isinstance(gamma, tuple) else (gamma,) * 2
    masked = [ref_window(e - base, p, g) for e, p, g in zip(experts, dens, gams)]
    merged = sum(a * d for a, d in zip(w, masked)) if method == "breadcrumbs" else ref_disjoint(masked, w, "sum", False)
    out = _run(method, base, experts, w, density=density, gamma=gamma)
    torch.testing.assert_close(out, base + merged, rtol=1e-12, atol=1e-12)


def test_breadcrumbs_drops_the_outliers():
    base = torch.zeros(100, dtype=torch.float64)
    delta = torch.arange(1, 101, dtype=torch.float64)  # |delta| ranks are the values themselves
    out = _run("breadcrumbs", base, [delta], density=0.5, gamma=0.1)
    assert torch.equal(out != 0, (delta > 40) & (delta <= 90))


# ----------------------------------------------------------------------------- SCE


@pytest.mark.parametrize("topk", [1.0, 0.3, 0.05])
@pytest.mark.parametrize("n", [2, 4])
def test_sce_matches_reference(topk, n):
    base, experts = _data(shape=(11, 9), n=n, seed=12)
    out = _run("sce", base, experts, select_topk=topk)
    torch.testing.assert_close(out, ref_sce(base, experts, topk), rtol=1e-12, atol=1e-12)


def test_sce_single_expert():
    base, experts = _data(n=1, seed=13)
    torch.testing.assert_close(_run("sce", base, experts), experts[0])  # nothing selected away
    torch.testing.assert_close(_run("sce", base, experts, select_topk=0.5), base)  # zero variance everywhere


# ----------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", METHODS)
def test_half_precision_inputs(name, dtype):
    base, experts = _data(shape=(24, 16), n=3, seed=16, dtype=dtype)
    out = _run(name, base, experts, seed=0, **SPARSE[name])
    assert out.dtype == dtype and out.shape == base.shape and torch.isfinite(out).all()
    ref = _run(name, base.double(), [e.double() for e in experts], seed=0, **SPARSE[name])
    # same draws and (for distinct magnitudes) the same masks: agreement within a few bf16 ulps of the delta scale
    close = (out.double() - ref).abs() <= 0.02 + 0.02 * ref.abs()
    assert close.double().mean() > 0.9


# ----------------------------------------------------------------------------- helpers


def test_top_k_mask_exact_with_ties():
    a = torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0, 0.0])
    assert top_k_mask(a, 2).tolist() == [True, False, True, False, False, False]  # ties: lower index first
    assert top_k_mask(a, 4).tolist() == [True, False, True, True, True, False]
    assert not top_k_mask(a, 0).any() and top_k_mask(a, 6).all()
    assert keep_count(0.57, 100) == 57 and keep_count(0.001, 10, at_least_one=True) == 1


@pytest.mark.parametrize("kind", ["randn", "ties", "sorted", "constant", "rare"])
def test_kth_largest_bracketed_selection_is_exact(kind):
    """Force the sample-bracketed path (tiny sample) and compare with a full sort."""
    n = 30000
    g = torch.Generator().manual_seed(15)
    a = {
        "randn": lambda: torch.randn(n, generator=g).abs(),
        "ties": lambda: torch.randint(0, 9, (n,), generator=g).float(),
        "sorted": lambda: torch.linspace(0, 1, n),
        "constant": lambda: torch.full((n,), 0.25),
        "rare": lambda: torch.where(torch.rand(n, generator=g) < 0.001, 5.0 + torch.rand(n, generator=g), 0.0),
    }[kind]()
    desc = torch.sort(a, descending=True).values
    for k in (1, 7, 20, 45, n // 10, n // 2, n - 3, n):
        assert kth_largest(a, k, direct=0, sample=512).item() == desc[k - 1].item(), k


# ----------------------------------------------------------------------------- parameter validation


@pytest.mark.parametrize(
    "method,params,name",
    [
        ("ties", {"density": 1.5}, "density"),
        ("ties", {"density": -0.1}, "density"),
        ("dare_linear", {"density": 2}, "density"),
        ("ties", {"consensus": "median"}, "consensus"),
        ("dare_ties", {"rescale": "l2"}, "rescale"),
        ("ties", {"rescale": "paper"}, "rescale"),
        ("della_ties", {"epsilon": 0.6}, "epsilon"),
        ("breadcrumbs", {"gamma": -0.01}, "gamma"),
        ("sce", {"select_topk": 1.2}, "select_topk"),
        ("task_arithmetic", {"lambda": "big"}, "lambda"),
        ("ties", {"density": [0.5, 0.5]}, "density"),  # 2 values for 3 experts
        ("ties", {"dens1ty": 0.5}, "dens1ty"),
    ],
)
def test_parameter_errors_name_the_parameter(method, params, name):
    with pytest.raises(ParameterError, match=name):
        get_method(method).validate_params(params, n_experts=3)


@pytest.mark.parametrize("method", ["della_linear", "della_ties"])
def test_della_window_must_fit_in_unit_interval(method):
    base, experts = _data(n=2)
    with pytest.raises(ParameterError, match="epsilon"):
        _run(method, base, experts, seed=0, density=0.1)  # default epsilon 0.15 > density
    with pytest.raises(ParameterError, match="epsilon"):
        _run(method, base, experts, seed=0, density=(0.5, 0.9), epsilon=0.2)
    _run(method, base, experts, seed=0, density=0.2, epsilon=0.2)  # closed window [0, 0.4] is fine
    # caught by validate_params already, before any tensor is read
    with pytest.raises(ParameterError, match="epsilon"):
        get_method(method).validate_params({"density": 0.9, "epsilon": 0.15}, n_experts=2)
    with pytest.raises(ParameterError, match="epsilon"):
        get_method(method).validate_params({"density": 0.05})
    # and by the kernel when called directly with unvalidated parameters
    params = {"density": 0.1, "epsilon": 0.15, "lambda": 1.0, "normalize": False, "rescale": "paper", "consensus": "sum"}
    with pytest.raises(ParameterError, match="epsilon"):
        get_method(method)(base, experts, torch.ones(2), params, TensorContext(generator=torch.Generator()))


# ----------------------------------------------------------------------------- mergekit parity (deterministic methods)


@pytest.mark.parametrize(
    "method,ours,theirs",
    [
        ("task_arithmetic", {"lambda": 0.7}, {"lambda": 0.7}),
        ("task_arithmetic", {"normalize": True}, {"normalize": True}),
        ("ties", {"density": 0.25, "lambda": 0.5}, {"density": 0.25, "lambda": 0.5}),
        ("ties", {"density": 0.25, "normalize": False, "rescale": "l1"}, {"density": 0.25, "normalize": False, "rescale": True}),
        ("breadcrumbs", {"density": 0.5, "gamma": 0.1}, {"density": 0.5, "gamma": 0.1}),
        ("breadcrumbs_ties", {"density": 0.95, "gamma": 0.1}, {"density": 0.95, "gamma": 0.1}),
        ("sce", {"select_topk": 0.25}, {"select_topk": 0.25}),
    ],
)
def test_matches_mergekit(method, ours, theirs):
    api = pytest.importorskip("mergekit.merge_methods.api")
    base, experts = _data(shape=(20, 16), n=4, seed=14)
    w = [1.0, 0.5, 2.0, 0.8] if method != "sce" else None
    out = _run(method, base, experts, w, **ours)
    params = dict(theirs, **({"weight": w} if w else {}))
    ref = api.merge_tensors([base, *experts], method, parameters=params, base_index=0)
    torch.testing.assert_close(out, ref.double(), rtol=1e-6, atol=1e-7)
