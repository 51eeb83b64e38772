"""Differential tests against the published mergekit 0.1.5 (the oracle) on tiny random Llamas.

Both tools read the same checkpoints (mergekit through its in-memory
``merge_state_dicts``, or its full ``run_merge`` YAML pipeline; mergebench through its
streaming engine) and every output tensor is compared. Where mergebench deliberately
differs (see ``docs/mergekit-differences.md``), the test asserts the documented
difference instead of skipping: e.g. mergekit's Karcher equals mergebench's equal-weight
Karcher of base + experts, and differs from mergebench's weighted one.

Random masks: the two tools cannot share an RNG stream (mergekit draws from the global
torch RNG, mergebench from a per-tensor seeded generator), so DARE/DELLA are compared (1)
exactly at density 1, (2) exactly with mergekit's Bernoulli draw routed through the same
per-tensor generator mergebench uses (everything else stays mergekit's code), and (3)
statistically with each tool's own RNG.
"""

from __future__ import annotations

import math
import os
import textwrap
import types
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.mergekit,
    pytest.mark.filterwarnings("ignore:numpy.core is deprecated:DeprecationWarning"),  # mergekit's own import
]

mm = pytest.importorskip("mergekit.merge_methods")  # slow import: once per module

from mergekit import sparsify as mk_sparsify  # noqa: E402
from mergekit.merge_methods.generalized_task_arithmetic import (  # noqa: E402
    ConsensusMethod,
    GeneralizedTaskArithmeticMerge,
)
from safetensors.torch import load_file  # noqa: E402

from mergebench.engine import merge, tensor_seed  # noqa: E402
from mergebench.engine.request import MergeRequest  # noqa: E402
from mergebench.toy import make_tiny_pool, tiny_llama_state, write_checkpoint  # noqa: E402

W = [1.0, 0.5, 0.3]  # deliberately unequal weights
IDS = ["e0", "e1", "e2"]
MEASURED: dict[str, float] = {}  # max abs error per case, for the differences note


# -- fixtures and helpers ----------------------------------------------------------------


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """Base + 3 experts on disk and the same tensors in memory (keys: base, e0, e1, e2)."""
    root = tmp_path_factory.mktemp("mk_oracle")
    base, experts = make_tiny_pool(root, 3)
    paths = {"base": base, **{f"e{i}": p for i, p in enumerate(experts)}}
    states = {k: load_file(str(p / "model.safetensors")) for k, p in paths.items()}
    return types.SimpleNamespace(root=root, paths=paths, sd=states)


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    out = os.environ.get("MERGEBENCH_ORACLE_REPORT")
    if out:
        import json

        Path(out).write_text(json.dumps(MEASURED, indent=2, sort_keys=True))


def run_mb(pool, method, experts, base=None, weights=None, params=None, per_expert=None, **kw):
    """mergebench's engine, in memory, on the pool's checkpoints."""
    req = MergeRequest(
        method=method,
        experts=[str(pool.paths[e]) for e in experts],
        base=str(pool.paths[base]) if base else None,
        weights=weights,
        params=params or {},
        per_expert_params=per_expert or {},
        **kw,
    )
    return merge(req, None, progress=False).state_dict


def run_mk(pool, method, inputs, base=None, parameters=None, **kw):
    """mergekit's in-memory API on the same tensors."""
    return mm.merge_state_dicts({k: pool.sd[k] for k in inputs}, method, parameters=parameters, base=base, **kw)


def max_err(a: dict, b: dict) -> float:
    assert set(a) == set(b), set(a) ^ set(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def record(label: str, err: float) -> float:
    MEASURED[label] = err
    return err


@pytest.fixture
def aligned_masks(monkeypatch):
    """Route mergekit's Bernoulli draws through mergebench's per-tensor generator.

    mergekit's sparsifiers call ``torch.bernoulli(probs)`` (probs = density, or DELLA's
    rank-based probabilities); mergebench draws one ``torch.rand(shape)`` per sparsified
    task vector from ``Generator().manual_seed(tensor_seed(name, seed))`` and keeps
    ``u < p``. Replacing only that draw makes the masks identical; mergekit's pruning,
    rescaling, sign election and combination all stay its own code.
    """
    state: dict = {"gen": None, "seed": 0}

    class TorchWithAlignedBernoulli(types.ModuleType):
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def bernoulli(p):
            u = torch.rand(p.shape, generator=state["gen"], dtype=torch.float32, device=p.device)
            return (u < p).to(p.dtype)

    original = GeneralizedTaskArithmeticMerge.merge_group

    def merge_group(self, group, /, **kw):
        state["gen"] = torch.Generator().manual_seed(tensor_seed(group.metadata.name, state["seed"]))
        return original(self, group, **kw)

    monkeypatch.setattr(mk_sparsify, "torch", TorchWithAlignedBernoulli("torch_aligned"))
    monkeypatch.setattr(GeneralizedTaskArithmeticMerge, "merge_group", merge_group)
    return state


WMAP = dict(zip(IDS, W))
ALL = ["base", *IDS]

# (label, mergebench method, mb kwargs, mergekit method, mk inputs, mk base, mk parameters, tolerance)
EXACT = [
    ("linear", "linear", dict(weights=W), "linear", IDS, None, {"weight": W}, 1e-6),
    ("linear unnormalized", "linear", dict(weights=W, params={"normalize": False}), "linear", IDS, None,
     {"weight": W, "normalize": False}, 1e-6),
    ("task_arithmetic", "task_arithmetic", dict(base="base", weights=W, params={"lambda": 0.8}), "task_arithmetic",
     ALL, "base", {"weight": WMAP, "lambda": 0.8}, 1e-6),
    ("task_arithmetic normalized", "task_arithmetic", dict(base="base", weights=W, params={"normalize": True}),
     "task_arithmetic", ALL, "base", {"weight": WMAP, "normalize": True}, 1e-6),
    ("ties density 0.5", "ties", dict(base="base", weights=W, params={"density": 0.5}), "ties", ALL, "base",
     {"weight": WMAP, "density": 0.5}, 1e-6),
    ("ties per-model density", "ties", dict(base="base", weights=W, per_expert={"density": [0.3, 0.5, 0.9]},
     params={"lambda": 1.2}), "ties", ALL, "base", {"weight": WMAP, "density": dict(zip(IDS, [0.3, 0.5, 0.9])),
     "lambda": 1.2}, 1e-6),
    ("ties rescale l1", "ties", dict(base="base", weights=W, params={"density": 0.5, "rescale": "l1"}), "ties", ALL,
     "base", {"weight": WMAP, "density": 0.5, "rescale": True}, 1e-6),
    ("breadcrumbs", "breadcrumbs", dict(base="base", weights=W, params={"density": 0.5, "gamma": 0.05}),
     "breadcrumbs", ALL, "base", {"weight": WMAP, "density": 0.5, "gamma": 0.05}, 1e-6),
    ("breadcrumbs_ties", "breadcrumbs_ties", dict(base="base", weights=W, params={"density": 0.6, "gamma": 0.02}),
     "breadcrumbs_ties", ALL, "base", {"weight": WMAP, "density": 0.6, "gamma": 0.02}, 1e-6),
    ("dare_linear density 1", "dare_linear", dict(base="base", weights=W, params={"density": 1.0}), "dare_linear",
     ALL, "base", {"weight": WMAP, "density": 1.0}, 1e-6),
    ("dare_ties density 1", "dare_ties", dict(base="base", weights=W, params={"density": 1.0}), "dare_ties", ALL,
     "base", {"weight": WMAP, "density": 1.0}, 1e-6),
    ("della_ties density 1", "della_ties", dict(base="base", weights=W, params={"density": 1.0}), "della", ALL,
     "base", {"weight": WMAP, "density": 1.0}, 1e-6),
    ("della_linear density 1", "della_linear", dict(base="base", weights=W, params={"density": 1.0}),
     "della_linear", ALL, "base", {"weight": WMAP, "density": 1.0}, 1e-6),
    ("sce", "sce", dict(base="base"), "sce", ALL, "base", {}, 1e-6),
    ("sce select_topk 0.5", "sce", dict(base="base", params={"select_topk": 0.5}), "sce", ALL, "base",
     {"select_topk": 0.5}, 1e-6),
    ("model_stock mean_cosine", "model_stock", dict(base="base", params={"theta": "mean_cosine"}), "model_stock",
     ALL, "base", {}, 1e-6),
    ("model_stock filter_wise mean_cosine", "model_stock", dict(base="base", params={"filter_wise": True,
     "theta": "mean_cosine"}), "model_stock", ALL, "base", {"filter_wise": True}, 1e-6),
    ("multislerp with base", "multislerp", dict(base="base", weights=W), "multislerp", ALL, "base",
     {"weight": WMAP}, 1e-6),
    ("multislerp without base", "multislerp", dict(weights=W), "multislerp", IDS, None, {"weight": W}, 1e-6),
]  # fmt: skip


@pytest.mark.parametrize(
    ("label", "mb_method", "mb_kw", "mk_method", "mk_inputs", "mk_base", "mk_params", "tol"),
    EXACT,
    ids=[c[0] for c in EXACT],
)
def test_matches_mergekit(pool, label, mb_method, mb_kw, mk_method, mk_inputs, mk_base, mk_params, tol):
    ours = run_mb(pool, mb_method, IDS, **mb_kw)
    theirs = run_mk(pool, mk_method, mk_inputs, mk_base, mk_params)
    assert record(label, max_err(ours, theirs)) <= tol


# -- DARE / DELLA ----------------------------------------------------------------------------

RANDOM = [
    ("dare_linear", "dare_linear", {"density": 0.4}),
    ("dare_ties", "dare_ties", {"density": 0.4}),
    ("della_ties", "della", {"density": 0.4, "epsilon": 0.1}),
    ("della_linear", "della_linear", {"density": 0.4, "epsilon": 0.1}),
]


@pytest.mark.parametrize(("mb_method", "mk_method", "params"), RANDOM, ids=[r[0] for r in RANDOM])
def test_random_methods_with_aligned_masks_and_l1_rescale_match(pool, aligned_masks, mb_method, mk_method, params):
    ours = run_mb(pool, mb_method, IDS, base="base", weights=W, params={**params, "rescale": "l1"})
    theirs = run_mk(pool, mk_method, ALL, "base", {"weight": WMAP, **params})  # mergekit default: rescale (L1)
    assert record(f"{mb_method} rescale=l1, aligned masks", max_err(ours, theirs)) <= 1e-6
    # and with rescaling off on both sides
    ours = run_mb(pool, mb_method, IDS, base="base", weights=W, params={**params, "rescale": None})
    theirs = run_mk(pool, mk_method, ALL, "base", {"weight": WMAP, **params, "rescale": False})
    assert record(f"{mb_method} no rescale, aligned masks", max_err(ours, theirs)) <= 1e-6


@pytest.mark.parametrize(("mb_method", "mk_method", "params"), RANDOM[::2], ids=["dare", "della"])
def test_paper_rescale_differs_from_mergekit_l1_by_the_documented_factor(
    pool, aligned_masks, mb_method, mk_method, params
):
    """Same masks, one expert: mergekit scales survivors by ||d||_1 / ||m*d||_1 (one factor
    per tensor); mergebench's default (the papers) by 1/p (DARE) or 1/p_i (DELLA)."""
    b = pool.sd["base"]
    ours = run_mb(pool, mb_method, ["e0"], base="base", params=params)  # rescale: 'paper' (default)
    theirs = run_mk(pool, mk_method, ["base", "e0"], "base", {"weight": {"e0": 1.0}, **params})
    unscaled = run_mb(pool, mb_method, ["e0"], base="base", params={**params, "rescale": None})
    worst = 0.0
    for name in b:
        d = pool.sd["e0"][name].double() - b[name].double()
        kept = (unscaled[name].double() - b[name].double()) != 0
        md = d * kept
        if kept.sum() == 0:
            continue
        # mergekit: the masked delta times one L1 factor
        mk_factor = d.abs().sum() / md.abs().sum()
        torch.testing.assert_close(theirs[name].double() - b[name].double(), md * mk_factor, atol=1e-6, rtol=1e-5)
        # mergebench: the masked delta divided by each element's keep probability
        if mb_method == "dare_linear":
            probs = torch.full_like(d, params["density"])
        else:  # DELLA: p - eps ... p + eps by magnitude rank within each row
            rows = d.reshape(1, -1) if d.dim() == 1 else d.reshape(d.shape[0], -1)
            rank = rows.abs().argsort(dim=1).argsort(dim=1).double()
            p, e = params["density"], params["epsilon"]
            probs = (p - e + 2 * e * rank / (rows.shape[1] - 1)).reshape(d.shape)
        torch.testing.assert_close(ours[name].double() - b[name].double(), md / probs, atol=1e-6, rtol=1e-5)
        worst = max(worst, float((ours[name].double() - theirs[name].double()).abs().max()))
    assert record(f"{mb_method} paper vs mergekit l1 (documented difference)", worst) > 1e-3


def test_dare_statistics_agree_without_shared_rng(pool):
    """Each tool with its own RNG: same keep rate (binomial bounds), and with L1 rescaling
    both restore every tensor's L1 norm exactly."""
    density = 0.3
    torch.manual_seed(1234)
    theirs = run_mk(pool, "dare_linear", ["base", "e0"], "base", {"weight": {"e0": 1.0}, "density": density})
    ours = run_mb(pool, "dare_linear", ["e0"], base="base", params={"density": density, "rescale": "l1"}, seed=5)
    b, e = pool.sd["base"], pool.sd["e0"]
    kept = {"mergekit": 0, "mergebench": 0}
    total = 0
    for name in b:
        d = e[name].double() - b[name].double()
        for tool, out in (("mergekit", theirs), ("mergebench", ours)):
            od = out[name].double() - b[name].double()
            kept[tool] += int((od != 0).sum())
            torch.testing.assert_close(od.abs().sum(), d.abs().sum(), rtol=1e-5, atol=1e-8)
        total += d.numel()
    sd = math.sqrt(density * (1 - density) * total)
    for tool, k in kept.items():
        assert abs(k - density * total) < 5 * sd, (tool, k / total)
    assert abs(kept["mergekit"] - kept["mergebench"]) < 7 * sd


def test_della_keeps_large_magnitudes_more_often_in_both(pool):
    """DELLA's rank-dependent keep probability, measured per magnitude quartile within rows."""
    p, eps = 0.5, 0.4
    torch.manual_seed(99)
    theirs = run_mk(pool, "della_linear", ["base", "e0"], "base", {"weight": {"e0": 1.0}, "density": p, "epsilon": eps})
    ours = run_mb(pool, "della_linear", ["e0"], base="base", params={"density": p, "epsilon": eps}, seed=3)
    b = pool.sd["base"]
    rates = {}
    for tool, out in (("mergekit", theirs), ("mergebench", ours)):
        lo = hi = n_lo = n_hi = 0
        for name in b:
            if b[name].dim() != 2:
                continue
            d = pool.sd["e0"][name] - b[name]
            q = d.abs().argsort(dim=1).argsort(dim=1).double() / (d.shape[1] - 1)  # rank in [0, 1] per row
            k = (out[name] - b[name]) != 0
            lo, n_lo = lo + int(k[q < 0.25].sum()), n_lo + int((q < 0.25).sum())
            hi, n_hi = hi + int(k[q > 0.75].sum()), n_hi + int((q > 0.75).sum())
        rates[tool] = (lo / n_lo, hi / n_hi)
    # expected keep probability: p - eps + 2 eps q, averaged over each quartile
    exp_lo, exp_hi = p - eps + 2 * eps * 0.125, p - eps + 2 * eps * 0.875
    for tool, (r_lo, r_hi) in rates.items():
        assert abs(r_lo - exp_lo) < 0.03 and abs(r_hi - exp_hi) < 0.03, (tool, rates)


def test_rng_sources(pool):
    """mergekit's random methods follow the global torch RNG; mergebench's ignore it and
    follow the request seed (one generator per tensor)."""
    params = {"weight": {"e0": 1.0}, "density": 0.5}
    torch.manual_seed(0)
    a = run_mk(pool, "dare_linear", ["base", "e0"], "base", params)
    torch.manual_seed(0)
    a2 = run_mk(pool, "dare_linear", ["base", "e0"], "base", params)
    torch.manual_seed(1)
    b = run_mk(pool, "dare_linear", ["base", "e0"], "base", params)
    assert max_err(a, a2) == 0 and max_err(a, b) > 0
    torch.manual_seed(0)
    x = run_mb(pool, "dare_linear", ["e0"], base="base", params={"density": 0.5}, seed=0)
    torch.manual_seed(1)
    x2 = run_mb(pool, "dare_linear", ["e0"], base="base", params={"density": 0.5}, seed=0)
    y = run_mb(pool, "dare_linear", ["e0"], base="base", params={"density": 0.5}, seed=1)
    assert max_err(x, x2) == 0 and max_err(x, y) > 0


def test_della_ranks_along_different_axes_on_3d_tensors(monkeypatch):
    """DELLA's magnitude ranks: mergekit ranks along dim 1 (per (i, :, k) fibre of a 3-D
    tensor); mergebench within each first-axis slice (all other axes flattened). Identical
    for 1-D and 2-D tensors (every LLM weight), different for 3-D ones (documented)."""
    from mergebench.baselines._sparsify import della_keep_probs

    seen = []

    class CaptureBernoulli(types.ModuleType):
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def bernoulli(p):
            seen.append(p.clone())
            return torch.ones_like(p)

    monkeypatch.setattr(mk_sparsify, "torch", CaptureBernoulli("torch_capture"))
    g = torch.Generator().manual_seed(3)
    for shape in [(7,), (5, 9), (3, 4, 6)]:
        seen.clear()
        delta = torch.randn(shape, generator=g)
        mk_sparsify.della_magprune(delta, 0.5, 0.2)
        theirs = seen[0].reshape(shape).double()
        ours = della_keep_probs(delta, 0.5, 0.2).reshape(shape).double()
        err = float((ours - theirs).abs().max())
        if len(shape) < 3:
            assert err <= 1e-6, shape
        else:
            assert record("della keep probabilities on a 3-D tensor (documented difference)", err) > 1e-2


def test_sce_small_task_vectors_get_uniform_weights_in_mergekit():
    """mergekit's SCE switches to uniform weights when sum_i mean(delta_i^2) < 1e-6 (task
    vectors of entries ~1e-4, common for real fine-tunes); mergebench always weights by the
    squared norms (uniform only when all are zero). Both equal a float64 formula."""
    g = torch.Generator().manual_seed(11)
    base = torch.randn(8, 8, generator=g, dtype=torch.float64)
    experts = [base + s * 1e-4 * torch.randn(8, 8, generator=g, dtype=torch.float64) for s in (1.0, 3.0)]
    d = torch.stack([e - base for e in experts])
    assert float(d.square().reshape(2, -1).mean(1).sum()) < 1e-6
    sign = torch.where(d.sum(0) >= 0, 1.0, -1.0).double()
    agree = (d * sign > 0).double()

    def ref(eta):
        w = torch.tensor(eta, dtype=torch.float64).reshape(2, 1, 1) * agree
        return base + (d * w).sum(0) / w.sum(0).clamp_min(1e-300) * (w.sum(0) > 0)

    sq = d.square().reshape(2, -1).sum(1)
    theirs = mm.merge_tensors([base, *experts], "sce", base_index=0)
    torch.testing.assert_close(theirs, ref([0.5, 0.5]), atol=1e-12, rtol=1e-9)
    from mergebench.methods import TensorContext, get_method

    spec = get_method("sce")
    ours = spec(base, experts, torch.ones(2), spec.validate_params({}, 2), TensorContext(name="model.layers.0.mlp.up_proj.weight"))
    torch.testing.assert_close(ours, ref((sq / sq.sum()).tolist()), atol=1e-12, rtol=1e-9)
    assert record("sce, task vectors ~1e-4 (documented difference)", float((ours - theirs).abs().max())) > 1e-6


def test_karcher_drops_near_zero_norm_inputs_in_mergekit_only():
    """mergekit leaves inputs with norm <= tol (1e-5) out of the direction mean (they still
    count in the mean norm); mergebench leaves out only exact zeros."""
    from mergebench.methods import TensorContext, get_method

    g = torch.Generator().manual_seed(12)
    a, b = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    tiny = 1e-7 * torch.randn(6, 5, generator=g, dtype=torch.float64)
    theirs = mm.merge_tensors([a, b, tiny], "karcher")
    spec = get_method("karcher")
    ctx = TensorContext(name="model.layers.0.mlp.up_proj.weight")
    params = spec.validate_params({}, 3)
    ours = spec(None, [a, b, tiny], torch.ones(3, dtype=torch.float64), params, ctx)
    # mergekit's direction is the Karcher mean of a and b alone (their SLERP midpoint direction)
    two = spec(None, [a, b], torch.ones(2, dtype=torch.float64), params, ctx)
    cos = float((theirs.reshape(-1) @ two.reshape(-1)) / (theirs.norm() * two.norm()))
    assert cos == pytest.approx(1.0, abs=1e-6)
    assert float(theirs.norm()) == pytest.approx(float((a.norm() + b.norm() + tiny.norm()) / 3), rel=1e-6)
    assert record("karcher with a 1e-7-norm input (documented difference)", float((ours - theirs).abs().max())) > 1e-2


# -- TIES details ----------------------------------------------------------------------------


def test_keep_count_rounding_differs_on_float_products():
    """k = floor(density * n + 1e-6) in mergebench vs int(density * n) in mergekit:
    0.57 * 100 = 56.999... keeps 57 entries in mergebench, 56 in mergekit."""
    from mergebench import get_method
    from mergebench.methods import TensorContext

    g = torch.Generator().manual_seed(0)
    base = torch.zeros(100)
    expert = torch.randn(100, generator=g)
    theirs = mm.merge_tensors([base, expert], "ties", base_index=0, parameters={"weight": 1.0, "density": 0.57})
    spec = get_method("ties")
    ours = spec(base, [expert], torch.ones(1), spec.validate_params({"density": 0.57}, 1), TensorContext(name="x"))
    assert int((theirs != 0).sum()) == 56 and int((ours != 0).sum()) == 57
    # the 56 mergekit keeps are the 56 largest, which mergebench keeps too
    assert torch.equal(ours[theirs != 0], theirs[theirs != 0])


def test_topk_ties_at_the_threshold_are_broken_by_index():
    """Equal magnitudes at the TIES threshold (common in bf16, and in float32 tensors of tens of
    millions of entries): both keep exactly k entries and everything above the threshold;
    mergebench keeps the tied entries with the lowest flat indices, mergekit whichever its
    unstable argsort puts first."""
    from mergebench import get_method
    from mergebench.methods import TensorContext

    g = torch.Generator().manual_seed(0)
    levels = torch.tensor([0.1, 0.2, 0.3, 0.4])
    delta = levels[torch.randint(0, 4, (1000,), generator=g)] * torch.sign(torch.randn(1000, generator=g))
    base = torch.zeros(1000)
    density = 0.55
    k = int(density * 1000)
    theirs = mm.merge_tensors([base, delta], "ties", base_index=0, parameters={"weight": 1.0, "density": density})
    spec = get_method("ties")
    params = spec.validate_params({"density": density}, 1)
    ours = spec(base, [delta], torch.ones(1), params, TensorContext(name="x"))
    thr = delta.abs().sort(descending=True).values[k - 1]
    for out in (ours, theirs):
        assert int((out != 0).sum()) == k
        assert torch.equal(out[delta.abs() > thr], delta[delta.abs() > thr])
    tied = torch.nonzero(delta.abs() == thr).flatten()
    n_tied_kept = k - int((delta.abs() > thr).sum())
    assert torch.equal(torch.nonzero(ours.abs() == thr).flatten(), tied[:n_tied_kept])


def test_count_consensus_matches_mergekits_unreachable_path(pool):
    """mergekit implements sign election by count but registers no method using it (YAML
    cannot select it); building that method by hand matches mergebench's consensus='count'."""
    counted = GeneralizedTaskArithmeticMerge(
        consensus_method=ConsensusMethod.count,
        sparsification_method=mk_sparsify.SparsificationMethod.magnitude,
        default_normalize=True,
        default_rescale=False,
        method_name="ties_count_test",
        method_pretty_name=None,
        method_reference_url=None,
    )
    theirs = run_mk(pool, counted, ALL, "base", {"weight": WMAP, "density": 0.5})
    ours = run_mb(pool, "ties", IDS, base="base", weights=W, params={"density": 0.5, "consensus": "count"})
    assert record("ties consensus=count (hand-built mergekit method)", max_err(ours, theirs)) <= 1e-6
    summed = run_mb(pool, "ties", IDS, base="base", weights=W, params={"density": 0.5})
    assert max_err(ours, summed) > 1e-4  # the election rule matters on this pool


# -- spherical methods -------------------------------------------------------------------------


def test_karcher_mergekit_ignores_weights_and_averages_the_base(pool):
    theirs = run_mk(pool, "karcher", ALL, "base")
    same = run_mb(pool, "karcher", ALL)  # mergebench: base as one more expert, equal weights
    assert record("karcher: mergekit vs mergebench equal-weight mean of base + experts", max_err(same, theirs)) <= 1e-5
    weighted = run_mb(pool, "karcher", IDS, weights=W)
    assert record("karcher weighted, base unused (documented difference)", max_err(weighted, theirs)) > 1e-3
    with pytest.raises(TypeError, match="Unknown parameter"):  # its in-memory API has no weight at all
        run_mk(pool, "karcher", ALL, "base", {"weight": dict(zip(ALL, [1.0, *W]))})


def test_multislerp_is_one_step_in_both(pool):
    """mergekit's Multi-SLERP = one Exp step from the normalised chordal mean; with a
    vanishing tangent mean that is the chordal mean itself. mergebench's multislerp matches
    (test_matches_mergekit); here: both equal an independent float64 chordal-mean formula,
    and differ from the iterated Karcher mean with the same weights."""
    theirs = run_mk(pool, "multislerp", IDS, None, {"weight": W})
    karcher = run_mb(pool, "karcher", IDS, weights=W, params={"max_iter": 100, "tol": 1e-12})
    w = torch.tensor(W, dtype=torch.float64) / sum(W)
    for name, out in theirs.items():
        xs = [pool.sd[i][name].double().reshape(-1) for i in IDS]
        norms = torch.stack([x.norm() for x in xs])
        m = sum(wi * x / n for wi, x, n in zip(w, xs, norms))
        ref = (m / m.norm() * (w * norms).sum()).reshape(out.shape)
        torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=1e-5)
    assert record("multislerp (one step) vs karcher (iterated), same weights", max_err(theirs, karcher)) > 1e-6


def test_multislerp_degenerate_mean_falls_back_instead_of_raising():
    """Antipodal inputs whose weighted unit mean vanishes: mergekit raises for more than two
    inputs; mergebench returns the weighted linear average."""
    from mergebench import get_method
    from mergebench.methods import TensorContext

    g = torch.Generator().manual_seed(0)
    a, c = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    tensors, weights = [a, -a, c], [1.0, 1.0, 1e-12]
    with pytest.raises(ValueError, match="weighted sum of the input tensors is zero"):
        mm.merge_tensors(tensors, "multislerp", parameters={"weight": weights})
    spec = get_method("multislerp")
    ours = spec(None, tensors, torch.tensor(weights), spec.validate_params({"eps": 1e-6}, 3), TensorContext(name="x"))
    w = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    torch.testing.assert_close(ours.double(), sum(wi * t.double() for wi, t in zip(w, tensors)), atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def equal_norm_pair(pool):
    """The pool's base and expert 0 with each expert tensor rescaled to the base tensor's norm."""
    root = pool.root / "equal_norms"
    state, cfg = tiny_llama_state(0)
    b, e = pool.sd["base"], pool.sd["e0"]
    scaled = {k: e[k] * (b[k].norm() / e[k].norm()) for k in e}
    write_checkpoint(root / "expert", scaled, cfg, tokenizer=False)
    pool.paths["e0_scaled"] = root / "expert"
    pool.sd["e0_scaled"] = load_file(str(root / "expert" / "model.safetensors"))
    return pool


def _cos(a, b):
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("norm", ["raw", "interpolate"])
def test_slerp_matches_when_norms_are_equal(equal_norm_pair, norm):
    """One angle per whole tensor in both (not per row: the rows' norms differ here), t=0
    at the base. With equal norms both of mergebench's norm rules are mergekit's formula.
    mergekit switches to plain lerp when |cos| > 0.9995; mergebench keeps the spherical
    formula, which differs from lerp by O(t(1-t) omega^2)."""
    pool, t = equal_norm_pair, 0.3
    ours = run_mb(pool, "slerp", ["e0_scaled"], base="base", params={"t": t, "norm": norm})
    theirs = run_mk(pool, "slerp", ["base", "e0_scaled"], "base", {"t": t})
    spherical = lerped = 0.0
    for name in ours:
        a, b = pool.sd["base"][name], pool.sd["e0_scaled"][name]
        err = float((ours[name] - theirs[name]).abs().max())
        c = _cos(a, b)
        if abs(c) > 0.9995:
            torch.testing.assert_close(theirs[name], (1 - t) * a + t * b, atol=1e-6, rtol=1e-6)
            omega = math.acos(c)
            assert err <= t * (1 - t) * omega**2 * float(a.abs().max()) + 1e-6
            lerped = max(lerped, err)
        else:
            spherical = max(spherical, err)
    assert record(f"slerp {norm}, equal norms, spherical branch", spherical) <= 1e-6
    record(f"slerp {norm}, equal norms, tensors where mergekit falls back to lerp", lerped)


def test_slerp_raw_is_mergekits_formula_and_interpolate_differs(pool):
    """Unequal norms. Both tools apply sin((1-t)w)/sin w and sin(tw)/sin w to the raw
    tensors by default (the layer-adaptive SLERP paper's Alg. 1 line 4), given as base + one
    model or as two experts; ``norm="interpolate"`` applies them to the unit directions and
    rescales by (1-t)||a|| + t||b|| (documented difference)."""
    t = 0.3
    theirs = run_mk(pool, "slerp", ["base", "e0"], "base", {"t": t})
    raw = run_mb(pool, "slerp", ["e0"], base="base", params={"t": t})
    assert max_err(raw, run_mb(pool, "slerp", ["base", "e0"], params={"t": t})) == 0.0
    interp = run_mb(pool, "slerp", ["base", "e0"], params={"t": t, "norm": "interpolate"})
    spherical = worst = 0.0
    for name in raw:
        a, b = pool.sd["base"][name].double(), pool.sd["e0"][name].double()
        c = _cos(a, b)
        if abs(c) > 0.9995:
            continue
        w = math.acos(c)
        ca, cb = math.sin((1 - t) * w) / math.sin(w), math.sin(t * w) / math.sin(w)
        torch.testing.assert_close(theirs[name].double(), ca * a + cb * b, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(raw[name].double(), ca * a + cb * b, atol=1e-6, rtol=1e-5)
        spherical = max(spherical, float((raw[name] - theirs[name]).abs().max()))
        na, nb = float(a.norm()), float(b.norm())
        ref = (ca * a / na + cb * b / nb) * ((1 - t) * na + t * nb)
        torch.testing.assert_close(interp[name].double(), ref, atol=1e-6, rtol=1e-5)
        worst = max(worst, float((interp[name].double() - theirs[name].double()).abs().max()))
    assert record("slerp raw (default), unequal norms, spherical branch", spherical) <= 1e-6
    assert record("slerp interpolate, unequal norms (documented difference)", worst) > 1e-4


def test_slerp_of_an_all_zero_tensor_differs():
    """mergekit takes the angle to a zero tensor as pi/2 and returns sin(t pi/2) b; mergebench
    has no angle there and returns the linear interpolation t b (documented difference)."""
    from mergebench.methods import TensorContext, get_method
    from mergebench.testing import run_kernel

    spec = get_method("slerp")
    b = torch.randn(4, 6, generator=torch.Generator().manual_seed(5))
    z = torch.zeros_like(b)
    t = 0.3
    theirs = mm.merge_tensors([z, b], "slerp", base_index=0, parameters={"t": t})
    torch.testing.assert_close(theirs, math.sin(t * math.pi / 2) * b)
    ours = run_kernel(spec, z, [b], spec.validate_params({"t": t}), TensorContext(name="model.norm.weight"))
    torch.testing.assert_close(ours, t * b)
    record("slerp of an all-zero base tensor (documented difference)", float((ours - theirs).abs().max()))


def test_model_stock_mean_angle_differs_from_mergekits_mean_cosine(pool, tmp_path):
    """The in-the-wild study's eq. 4 takes the mean pairwise ANGLE (mergebench's default);
    mergekit averages the cosines. Equal for two experts, different for three (asserted
    against an independent float64 eq. 4), also through the YAML pipeline."""
    theirs = run_mk(pool, "model_stock", ALL, "base", {})
    ours = run_mb(pool, "model_stock", IDS, base="base")
    assert record("model_stock mean angle (default) vs mergekit, N=3 (documented difference)", max_err(ours, theirs)) > 1e-6
    two_mk = run_mk(pool, "model_stock", ["base", "e0", "e1"], "base", {})
    assert record("model_stock N=2 (both rules agree)", max_err(run_mb(pool, "model_stock", ["e0", "e1"], base="base"), two_mk)) <= 1e-6
    for name in ours:
        b = pool.sd["base"][name].double().reshape(-1)
        d = [pool.sd[k][name].double().reshape(-1) - b for k in IDS]
        angles = [math.acos(max(-1.0, min(1.0, float(d[i] @ d[j] / (d[i].norm() * d[j].norm())))))
                  for i in range(3) for j in range(i + 1, 3)]
        c = math.cos(sum(angles) / 3)
        t = 3 * c / (1 + 2 * c)
        ref = (b + t * sum(d) / 3).reshape(ours[name].shape)
        torch.testing.assert_close(ours[name].double(), ref, atol=1e-6, rtol=1e-5)
    yaml_text = """
        merge_method: model_stock
        base_model: {base}
        models: [{{model: {e0}}}, {{model: {e1}}}, {{model: {e2}}}]
        """
    _, ours_yaml, theirs_yaml = _run_yaml(pool, tmp_path, yaml_text)
    assert max_err(ours_yaml, ours) <= 1e-6 and max_err(ours_yaml, theirs_yaml) > 1e-6


# -- Arcee Fusion ------------------------------------------------------------------------------


def test_arcee_fusion_agrees_except_at_the_fence(pool):
    """Both copy the expert's value where importance >= median + 1.5 IQR and keep the base
    elsewhere. Float32 importance rounding (mergekit adds 1e-8 inside the softmax and takes
    log(p/q); mergebench uses log-softmax) can flip elements lying at the fence itself."""
    ours = run_mb(pool, "arcee_fusion", ["e0"], base="base")
    theirs = run_mk(pool, "arcee_fusion", ["base", "e0"], "base")
    flips = total = 0
    for name in ours:
        b, e = pool.sd["base"][name], pool.sd["e0"][name]
        for out in (ours[name], theirs[name]):
            assert torch.all((out == b) | (out == e))
        diff = (ours[name] != theirs[name]).reshape(-1)
        total += diff.numel()
        flips += int(diff.sum())
        if diff.any():  # independent float64 importance: the flipped elements sit at the fence
            cols = b.shape[-1]
            bb, ee = b.double().reshape(-1, cols), e.double().reshape(-1, cols)
            lp, lq = torch.log_softmax(ee, -1), torch.log_softmax(bb, -1)
            imp = ((ee - bb).abs() * (lp.exp() * (lp - lq)).sum(-1, keepdim=True)).reshape(-1)
            s = imp.sort().values
            q = lambda p: s[int(math.floor(p * (s.numel() - 1)))]  # noqa: E731
            fence = q(0.5) + 1.5 * (q(0.75) - q(0.25))
            assert float(((imp[diff] - fence) / fence).abs().max()) < 1e-2, name
    MEASURED["arcee_fusion: fraction of elements differing (fence ties)"] = flips / total
    assert flips / total < 1e-3


def test_arcee_fusion_quantiles_on_large_tensors():
    """Above 1M elements mergekit estimates the fence from 1M elements sampled with the
    global RNG (so its result depends on torch.manual_seed); mergebench's quantiles are exact."""
    from mergebench import get_method
    from mergebench.methods import TensorContext

    g = torch.Generator().manual_seed(0)
    base = 0.02 * torch.randn(1024, 1536, generator=g)
    expert = base + 0.005 * torch.randn(1024, 1536, generator=g)
    runs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        runs.append(mm.merge_tensors([base, expert], "arcee_fusion", base_index=0))
    assert not torch.equal(runs[0], runs[1])
    spec = get_method("arcee_fusion")
    params = spec.validate_params({}, 1)
    ours = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        ctx = TensorContext(name="model.layers.0.mlp.up_proj.weight")
        ours.append(spec(base, [expert], torch.ones(1), params, ctx))
    assert torch.equal(ours[0], ours[1])
    MEASURED["arcee_fusion 1.5M-element tensor: fraction differing from mergekit (sampled fence)"] = float(
        (ours[0] != runs[0]).double().mean()
    )


# -- computation dtype ---------------------------------------------------------------------------


def test_compute_dtype_bf16_inputs(tmp_path_factory):
    """bf16 checkpoints: mergekit computes task arithmetic in bf16 unless told otherwise;
    mergebench computes in its request dtype (float32 by default) and rounds once at the end."""
    root = tmp_path_factory.mktemp("bf16_pool")
    base, experts = make_tiny_pool(root, 2, dtype=torch.bfloat16, tokenizer=False)
    sd = [load_file(str(p / "model.safetensors")) for p in [base, *experts]]
    models = {"base": sd[0], "e0": sd[1], "e1": sd[2]}
    params = {"weight": {"e0": 0.7, "e1": 0.45}, "lambda": 1.3}
    req = dict(method="task_arithmetic", base=str(base), experts=[str(p) for p in experts], weights=[0.7, 0.45],
               params={"lambda": 1.3}, out_dtype="bfloat16")
    ours = merge(MergeRequest(**req), None, progress=False).state_dict
    theirs_bf16 = mm.merge_state_dicts(models, "task_arithmetic", parameters=params, base="base")
    theirs_f32 = mm.merge_state_dicts(models, "task_arithmetic", parameters=params, base="base",
                                      dtype=torch.float32, out_dtype=torch.bfloat16)
    err_ours = err_f32 = abs_ours = abs_bf16 = ref_l1 = 0.0
    differ = total = 0
    for name in ours:
        b = sd[0][name].double()
        ref = b + 1.3 * (0.7 * (sd[1][name].double() - b) + 0.45 * (sd[2][name].double() - b))
        ulp = ref.abs().clamp_min(1e-30) * 2.0**-7  # one bf16 ulp (upper bound)
        err_ours = max(err_ours, float(((ours[name].double() - ref).abs() / ulp).max()))
        abs_ours += float((ours[name].double() - ref).abs().sum())
        abs_bf16 += float((theirs_bf16[name].double() - ref).abs().sum())
        ref_l1 += float(ref.abs().sum())
        err_f32 = max(err_f32, float(((ours[name].double() - theirs_f32[name].double()).abs() / ulp).max()))
        differ, total = differ + int((ours[name] != theirs_f32[name]).sum()), total + ref.numel()
        assert theirs_bf16[name].dtype == torch.bfloat16 == ours[name].dtype
    # mergekit told to compute in float32 agrees up to float32 summation order (1-ulp double rounding)
    record("task_arithmetic bf16 inputs, mergekit dtype=float32 vs mergebench", max_err(ours, theirs_f32))
    MEASURED["task_arithmetic bf16, mergekit dtype=float32: fraction differing by 1 ulp"] = differ / total
    assert err_f32 <= 1.0 and differ / total < 1e-3
    MEASURED["task_arithmetic bf16: mergebench max error vs float64 (bf16 ulps of the result)"] = err_ours
    MEASURED["task_arithmetic bf16: mergebench relative L1 error vs float64"] = abs_ours / ref_l1
    MEASURED["task_arithmetic bf16: mergekit (bf16 math) relative L1 error vs float64"] = abs_bf16 / ref_l1
    assert err_ours <= 0.51  # correctly rounded: one rounding, at the end
    assert abs_bf16 > 1.5 * abs_ours  # rounding at every step costs accuracy


# -- the full YAML pipeline ----------------------------------------------------------------------


def _run_yaml(pool, tmp_path, text: str):
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from mergebench.engine.mergekit_config import load_mergekit_yaml

    cfg = tmp_path / "merge.yaml"
    cfg.write_text(textwrap.dedent(text).format(**{k: p for k, p in pool.paths.items()}))
    out = tmp_path / "mergekit_out"
    run_merge(
        MergeConfiguration.model_validate(yaml.safe_load(cfg.read_text())),
        str(out),
        MergeOptions(cuda=False, lazy_unpickle=False, copy_tokenizer=False, quiet=True, write_model_card=False),
    )
    theirs = load_file(str(out / "model.safetensors"))
    request = load_mergekit_yaml(cfg)
    return request, merge(request, None, progress=False).state_dict, theirs


YAMLS = {
    "ties": """
        merge_method: ties
        base_model: {base}
        models:
          - model: {base}
          - model: {e0}
            parameters: {{weight: 1.0, density: 0.4}}
          - model: {e1}
            parameters: {{weight: 0.6, density: 0.8}}
          - model: {e2}
            parameters: {{weight: 0.3}}
        parameters: {{density: 0.6, normalize: true, lambda: 0.9, int8_mask: true}}
        dtype: float32
        """,
    "model_stock (mean_cosine)": """
        merge_method: model_stock
        base_model: {base}
        models: [{{model: {e0}}}, {{model: {e1}}}, {{model: {e2}}}]
        parameters: {{theta: mean_cosine}}
        """,
    "multislerp": """
        merge_method: multislerp
        base_model: {base}
        models:
          - model: {e0}
            parameters: {{weight: 1.0}}
          - model: {e1}
            parameters: {{weight: 0.2}}
        """,
    "breadcrumbs_ties": """
        merge_method: breadcrumbs_ties
        base_model: {base}
        models:
          - model: {e0}
            parameters: {{weight: 1.0, density: 0.5, gamma: 0.02}}
          - model: {e1}
            parameters: {{weight: 0.5, density: 0.7, gamma: 0.05}}
        """,
}


@pytest.mark.parametrize("name", list(YAMLS))
def test_same_yaml_same_result(pool, tmp_path, name):
    """One YAML file: mergekit's run_merge vs load_mergekit_yaml + mergebench's engine."""
    _, ours, theirs = _run_yaml(pool, tmp_path, YAMLS[name])
    assert record(f"YAML pipeline: {name}", max_err(ours, theirs)) <= 1e-6


def test_same_yaml_karcher_documented_difference(pool, tmp_path):
    request, ours, theirs = _run_yaml(
        pool,
        tmp_path,
        """
        merge_method: karcher
        base_model: {base}
        models:
          - model: {e0}
            parameters: {{weight: 3.0}}
          - model: {e1}
            parameters: {{weight: 0.5}}
        """,
    )
    assert request.weights == [3.0, 0.5] and len(request.experts) == 2  # mergebench honours the weights
    assert record("YAML pipeline: karcher, weighted (documented difference)", max_err(ours, theirs)) > 1e-3
    like_mergekit = run_mb(pool, "karcher", ["base", "e0", "e1"])  # what mergekit computed
    assert record("YAML pipeline: karcher vs equal-weight base+experts", max_err(like_mergekit, theirs)) <= 1e-5
