"""Model Stock (the in-the-wild merging study, eq. 4) and Arcee Fusion: formulas, hand-computed cases, edge cases.

References are written in float64 from the formulas (and, for Arcee Fusion, from the
blog's three-step description), not by calling the kernels under test.
"""

import math

import pytest
import torch

import mergebench.baselines.arcee_fusion as arcee_module
import mergebench.baselines.model_stock as ms_module
from mergebench.methods import ModuleKind, TensorContext, get_method
from mergebench.testing import method_checks, run_kernel

torch.set_num_threads(1)

MS = get_method("model_stock")
AF = get_method("arcee_fusion")
CTX = TensorContext(name="model.layers.0.mlp.down_proj.weight", layer=0, num_layers=2, kind=ModuleKind.MLP)
NOW = {"filter_wise": False}
FW = {"filter_wise": True}

MC = {"filter_wise": False, "theta": "mean_cosine"}  # mergekit's rule

CHECKS = [
    c
    for spec, p in [(MS, None), (MS, FW), (MS, MC), (AF, None), (AF, {"tukey_k": 0.0})]
    for c in method_checks(spec, p)
]


@pytest.mark.parametrize("check", CHECKS, ids=[f"{i}-{c.name}" for i, c in enumerate(CHECKS)])
def test_conformance(check):
    check()


def rand(shape, seed, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def close(a, b, atol=1e-12, rtol=1e-10):
    assert a.shape == b.shape
    err = (a.double() - b.double()).abs().max().item()
    assert torch.allclose(a.double(), b.double(), atol=atol, rtol=rtol), f"max abs err {err:.3g}"


# ------------------------------------------------------------------ Model Stock


def ref_model_stock(base, experts, filter_wise=False, theta="mean_angle"):
    """Eq. 4 of the in-the-wild study: t = N cos(theta) / (1 + (N-1) cos(theta)),
    W = t W_avg + (1 - t) W_0, theta the mean pairwise angle of the task vectors
    (``mean_cosine``: cos(theta) replaced by the mean pairwise cosine, as mergekit does)."""
    n = len(experts)
    b = base.double()
    rows = b.reshape(-1, b.shape[-1]) if filter_wise else b.reshape(1, -1)
    ex = [e.double().reshape(rows.shape) for e in experts]
    out = torch.empty_like(rows)
    for r in range(rows.shape[0]):
        deltas = [e[r] - rows[r] for e in ex]
        cos = [
            (deltas[i] @ deltas[j] / (deltas[i].norm() * deltas[j].norm())).item()
            for i in range(n) for j in range(i + 1, n)
        ]
        if theta == "mean_angle":
            c = math.cos(sum(math.acos(max(-1.0, min(1.0, x))) for x in cos) / len(cos))
        else:
            c = sum(cos) / len(cos)
        t = n * c / (1 + (n - 1) * c)
        avg = sum(e[r] for e in ex) / n
        out[r] = t * avg + (1 - t) * rows[r]
    return out.reshape(base.shape)


def test_model_stock_hand_computed_t():
    """Task vectors e1, e2 and (e1 + e2)/sqrt2: pairwise angles 90, 45 and 45 degrees.

    Paper (mean angle 60 degrees): cos(theta) = 1/2, t = 3/2 / (1 + 1) = 3/4.
    mergekit (mean cosine (0 + 2/sqrt2) / 3 = sqrt2/3): t = 3 sqrt2 / (3 + 2 sqrt2) ~= 0.727922."""
    base = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    f64 = dict(dtype=torch.float64)
    deltas = [torch.tensor(v, **f64) for v in ([1.0, 0, 0], [0, 1.0, 0], [1 / math.sqrt(2), 1 / math.sqrt(2), 0])]
    experts = [base + d for d in deltas]
    t_cos = 3 * math.sqrt(2) / (3 + 2 * math.sqrt(2))
    assert t_cos == pytest.approx(0.7279220613578554)
    avg_delta = sum(deltas) / 3
    for fw in (False, True):  # a 1-D tensor is one row either way
        close(run_kernel(MS, base, experts, {"filter_wise": fw, "theta": "mean_angle"}, CTX), base + 0.75 * avg_delta)
        close(run_kernel(MS, base, experts, {"filter_wise": fw, "theta": "mean_cosine"}, CTX), base + t_cos * avg_delta)
    assert MS.validate_params()["theta"] == "mean_angle"  # the paper's rule is the default
    assert ms_module.model_stock_t(torch.tensor(math.sqrt(2) / 3, dtype=torch.float64), 3).item() == pytest.approx(t_cos)


def test_model_stock_two_experts_both_rules_agree():
    base = rand((7, 5), 16)
    experts = [base + rand((7, 5), 17 + i) + 0.5 * rand((7, 5), 30) for i in range(2)]
    close(run_kernel(MS, base, experts, NOW, CTX), run_kernel(MS, base, experts, MC, CTX))


@pytest.mark.parametrize("n", [2, 3, 5])
def test_model_stock_identical_task_vectors_give_t_one(n):
    base, delta = rand((6, 4), 1), rand((6, 4), 2)
    experts = [base + delta for _ in range(n)]
    for p in (NOW, FW):
        close(run_kernel(MS, base, experts, p, CTX), base + delta, atol=1e-12)
    # scaled copies point the same way: cos = 1 and t = 1, so W = W_avg
    experts = [base + s * delta for s in (0.5, 1.0, 2.0)[: max(n, 2)]]
    close(run_kernel(MS, base, experts, NOW, CTX), sum(experts) / len(experts), atol=1e-12)


def test_model_stock_orthogonal_task_vectors_keep_base():
    base = rand((3, 4), 3)
    d1, d2 = torch.zeros(3, 4, dtype=torch.float64), torch.zeros(3, 4, dtype=torch.float64)
    d1[0, 0], d2[1, 1] = 1.0, 2.0
    close(run_kernel(MS, base, [base + d1, base + d2], NOW, CTX), base)


@pytest.mark.parametrize("theta", ["mean_angle", "mean_cosine"])
@pytest.mark.parametrize("p", [NOW, FW], ids=["layerwise", "filterwise"])
@pytest.mark.parametrize("shape", [(12, 9), (9,), (2, 3, 5)])
def test_model_stock_matches_reference(p, shape, theta):
    base = rand(shape, 4)
    common = 0.3 * rand(shape, 5)  # shared component: positive cosines, 0 < t < 1
    experts = [base + common + 0.2 * rand(shape, 6 + i) for i in range(4)]
    ref = ref_model_stock(base, experts, p["filter_wise"], theta)
    params = {**p, "theta": theta}
    close(run_kernel(MS, base, experts, params, CTX), ref)
    out32 = run_kernel(MS, base.float(), [e.float() for e in experts], params, CTX)
    assert out32.dtype == torch.float32
    close(out32, ref, atol=1e-5, rtol=1e-5)
    other = ref_model_stock(base, experts, p["filter_wise"], ({"mean_angle", "mean_cosine"} - {theta}).pop())
    assert (other - ref).abs().max().item() > 1e-4  # N = 4: the two rules really differ here


def test_model_stock_filter_wise_differs_per_row():
    base = rand((2, 8), 7)
    d = rand((2, 8), 8)
    other = rand((2, 8), 9)
    # row 0: identical task vectors (t = 1); row 1: unrelated ones (t < 1)
    e1 = base + d
    e2 = base.clone()
    e2[0] += d[0]
    e2[1] += other[1]
    out = run_kernel(MS, base, [e1, e2], FW, CTX)
    close(out[0], base[0] + d[0])
    close(out, ref_model_stock(base, [e1, e2], True))


def test_model_stock_streams_in_blocks(monkeypatch):
    """Small block sizes exercise the streamed Gram sums and the row-block loop."""
    monkeypatch.setattr(ms_module, "_CHUNK", 7)
    base = rand((5, 6), 10)
    experts = [base + 0.1 * rand((5, 6), 11) + 0.2 * rand((5, 6), 12 + i) for i in range(3)]
    for p in (NOW, FW, MC):
        ref = ref_model_stock(base, experts, p["filter_wise"], p.get("theta", "mean_angle"))
        close(run_kernel(MS, base, experts, p, CTX), ref)


def test_model_stock_degenerate_cases():
    base, d = rand((4, 4), 13), rand((4, 4), 14)
    # antipodal pair: 1 + (N-1) cos = 0, no finite t -> keep the base
    close(run_kernel(MS, base, [base + d, base - d], NOW, CTX), base)
    # all-zero task vectors: cosines 0, t = 0
    close(run_kernel(MS, base, [base.clone(), base.clone(), base.clone()], NOW, CTX), base)
    # a single expert (kernel called directly; the contract asks for two): t = 1
    close(MS.kernel(base, [base + d], torch.ones(1), NOW, CTX), base + d)
    # negative mean cosine within (-1/(N-1), 0): t < 0, exactly as the formula says
    e = [base + d, base - 0.5 * d + 0.5 * rand((4, 4), 15)]
    out = run_kernel(MS, base, e, NOW, CTX)
    assert torch.isfinite(out).all()
    close(out, ref_model_stock(base, e))


def test_model_stock_contract():
    assert MS.contract.base == "required" and MS.contract.min_experts == 2
    assert not MS.contract.per_expert_weights


# ------------------------------------------------------------------ Arcee Fusion


def ref_fusion(base, expert, k=1.5):
    """The blog's three steps in float64: (1) importance = |delta| * KL(softmax(expert) ||
    softmax(base)) per row; (2) threshold = median + k * IQR with quantiles taken as the
    floor(q (n-1))-th sorted value; (3) take the expert where importance >= threshold."""
    b, e = base.double(), expert.double()
    cols = b.shape[-1]
    b2, e2 = b.reshape(-1, cols), e.reshape(-1, cols)
    p = torch.softmax(e2, -1)
    q = torch.softmax(b2, -1)
    kl = (p * (p.log() - q.log())).sum(-1, keepdim=True)
    imp = ((e2 - b2).abs() * kl).reshape(-1)
    s = torch.sort(imp).values
    n = s.numel()

    def quant(x):
        return s[int(math.floor(x * (n - 1)))]

    thr = quant(0.5) + k * (quant(0.75) - quant(0.25))
    mask = (imp >= thr).reshape(base.shape)
    return torch.where(mask, expert, base), mask


@pytest.mark.parametrize("shape", [(16, 24), (33,), (3, 4, 10)])
@pytest.mark.parametrize("k", [1.5, 0.5, 0.0])
def test_arcee_fusion_matches_reference(shape, k):
    base = rand(shape, 20)
    # rows differ in how far the expert moved, so the KL factor matters
    scale = torch.linspace(0.01, 1.0, base.reshape(-1, shape[-1]).shape[0], dtype=torch.float64).unsqueeze(-1)
    expert = base + (rand(shape, 21).reshape(-1, shape[-1]) * scale).reshape(shape)
    ref, mask = ref_fusion(base, expert, k)
    out = run_kernel(AF, base, [expert], {"tukey_k": k}, CTX)
    assert torch.equal(out, ref)
    out32 = run_kernel(AF, base.float(), [expert.float()], {"tukey_k": k}, CTX)
    assert out32.dtype == torch.float32
    agree = ((out32 != base.float()) == mask).double().mean().item()
    assert agree > 0.99  # float32 importances may swap elements that sit on the threshold
    if k == 0.0:  # threshold is the median: about half the elements are taken
        assert 0.45 < mask.double().mean().item() <= 0.6
    if k == 1.5:  # Tukey's outer fence keeps only a minority
        assert mask.double().mean().item() < 0.3


def test_arcee_fusion_selects_expert_values_exactly():
    base, expert = rand((8, 8), 30, torch.float32), rand((8, 8), 31, torch.float32)
    out = run_kernel(AF, base, [expert], AF.validate_params(), CTX)
    taken = out != base
    assert torch.equal(out[taken], expert[taken])
    assert 0 < taken.sum() < 64


def _ulp_noise(x, seed):
    """``x`` with about half its elements moved by one ulp (up or down): what a different
    vector unit or summation order does to a float computation."""
    g = torch.Generator().manual_seed(seed)
    step = torch.randint(-1, 2, x.shape, generator=g)
    up, down = torch.nextafter(x, torch.full_like(x, math.inf)), torch.nextafter(x, torch.full_like(x, -math.inf))
    return torch.where(step > 0, up, torch.where(step < 0, down, x))


@pytest.mark.parametrize("perturb", [False, True], ids=["exact", "1ulp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_arcee_fusion_degenerate_cases(dtype, perturb):
    base = rand((4, 6), 32, dtype)
    close(run_kernel(AF, base, [base.clone()], AF.validate_params(), CTX), base)
    # a constant shift per row is invisible to softmax: KL = 0, importance 0, threshold 0,
    # every element is taken (mergekit's >= rule). In float32 that KL comes out ~1e-8 rather
    # than 0 on some CPUs; the rule must not depend on it, nor on 1-ulp noise in the inputs.
    shifted = base + torch.arange(4, dtype=dtype).unsqueeze(-1)
    if perturb:
        shifted = _ulp_noise(shifted, 33)
        assert not torch.equal(shifted - base, (shifted - base)[:, :1].expand_as(base))  # no longer constant
    assert torch.equal(run_kernel(AF, base, [shifted], AF.validate_params(), CTX), shifted)
    assert torch.equal(arcee_module.row_kl(shifted, base), torch.zeros(4, 1, dtype=torch.float64))


def test_arcee_fusion_kl_tolerance_keeps_real_changes():
    """The zero tolerance is rounding noise only: a change of relative size 1e-4 (KL ~5e-9)
    stays nonzero, in float32 inputs too, and its float64 value matches a direct formula."""
    base = rand((8, 64), 34)
    expert = base + 1e-4 * rand((8, 64), 35)
    p, q = torch.softmax(expert, -1), torch.softmax(base, -1)
    ref = (p * (p.log() - q.log())).sum(-1, keepdim=True)
    assert ref.min().item() > 1e-10
    close(arcee_module.row_kl(expert, base), ref, atol=1e-18, rtol=1e-6)
    kl32 = arcee_module.row_kl(expert.float(), base.float())
    assert (kl32 > 0).all() and kl32.dtype == torch.float64


@pytest.mark.parametrize("where", ["expert", "base"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_arcee_fusion_nonfinite_input_reaches_the_output(bad, where):
    base, expert = rand((6, 8), 36), rand((6, 8), 37)
    (expert if where == "expert" else base)[2, 3] = bad
    out = run_kernel(AF, base, [expert], AF.validate_params(), CTX)
    assert not torch.isfinite(out[2, 3])
    assert torch.isfinite(out[torch.arange(6) != 2]).all()  # other rows are merged as usual


def test_arcee_fusion_contract():
    c = AF.contract
    assert c.base == "required" and c.min_experts == 1 and c.max_experts == 1 and not c.per_expert_weights


# ------------------------------------------------------------------ mergekit differential


@pytest.mark.mergekit
def test_against_mergekit():
    api = pytest.importorskip("mergekit.merge_methods.api")
    base = rand((20, 16), 40, torch.float32)
    experts = [base + 0.05 * rand((20, 16), 41 + i, torch.float32) + 0.02 * i * base for i in range(3)]
    for fw in (False, True):
        mk = api.merge_tensors([base, *experts], "model_stock", base_index=0, parameters={"filter_wise": fw})
        close(run_kernel(MS, base, experts, {"filter_wise": fw, "theta": "mean_cosine"}, CTX), mk, atol=1e-6, rtol=1e-5)
        paper = run_kernel(MS, base, experts, {"filter_wise": fw, "theta": "mean_angle"}, CTX)
        assert (paper - mk).abs().max().item() > 1e-6  # N = 3: mean angle != mean cosine
    mk = api.merge_tensors([base, experts[0]], "arcee_fusion", base_index=0)
    assert torch.equal(run_kernel(AF, base, [experts[0]], AF.validate_params(), CTX), mk)
