"""Fisher merging, RegMean, AdaMerging and EMR-Merging kernels: float64 references written from
the papers' formulas (numpy), the properties the issue asks for, and the conformance kit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mergebench.baselines.adamerging import adamerging, prediction_entropy
from mergebench.baselines.emr import emr_merging, emr_rescalers
from mergebench.baselines.fisher import fisher_merging
from mergebench.baselines.regmean import regmean

from mergebench.methods import ModuleKind, ParameterError, TensorContext, get_method
from mergebench.testing import check_method, method_checks, run_kernel

CTX = TensorContext(name="model.layers.0.mlp.down_proj.weight", layer=0, num_layers=2, kind=ModuleKind.MLP)
VEC = TensorContext(name="model.layers.0.input_layernorm.weight", layer=0, num_layers=2, kind=ModuleKind.NORM)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _ctx(ctx, **aux):
    return TensorContext(name=ctx.name, layer=ctx.layer, num_layers=ctx.num_layers, kind=ctx.kind, aux=aux)


def _linear_mean(experts, w):
    spec = get_method("linear")
    return spec.kernel(None, experts, torch.tensor(w, dtype=torch.float64), {"normalize": True}, CTX)


# -- conformance ---------------------------------------------------------------------------

SPECS = [fisher_merging, regmean, adamerging, emr_merging]


@pytest.mark.parametrize("check", [c for s in SPECS for c in method_checks(s)], ids=lambda c: c.name)
def test_conformance(check):
    check()


def test_declarations():
    assert fisher_merging.calibration.statistics == ("fisher",) and fisher_merging.calibration.labels
    assert regmean.calibration.statistics == ("gram",)
    assert adamerging.calibration.model_step is not None and not adamerging.calibration.labels
    assert emr_merging.calibration is None and emr_merging.outputs == "per_task"
    for spec in SPECS:
        d = spec.describe()
        assert d["data_dependent"] is (spec.calibration is not None)
        assert get_method(spec.name) is spec
    p = adamerging.defaults()
    assert (p["epochs"], p["lr"], p["samples_per_epoch"], p["granularity"]) == (500, 1e-3, 16, "task")


def test_kit_flags_a_bad_per_task_method():
    from mergebench.methods import InputContract, MethodSpec, Param

    with pytest.raises(ParameterError, match="no nullable int parameter 'task'"):
        MethodSpec(name="bad", kernel=lambda *a: None, outputs="per_task")
    # a per-task method whose task-0 model of one expert is not that expert fails the kit
    spec = MethodSpec(name="halfway", kernel=lambda b, e, w, p, c: (b + e[0]) / 2, citation="x",
                      params=(Param("task", "int", None, nullable=True, ge=0),), outputs="per_task",
                      contract=InputContract(base="required"))
    check = next(c for c in method_checks(spec) if c.name.endswith("per_task_outputs"))
    with pytest.raises(AssertionError):
        check()


def test_kit_flags_an_unsourced_calibration_budget():
    from mergebench.methods import InputContract, MethodSpec
    from mergebench.methods.calibration import CalibrationBudget, CalibrationNeed

    spec = MethodSpec(name="nosource", kernel=lambda b, e, w, p, c: e[0].clone(), citation="x",
                      contract=InputContract(base="unused"),
                      calibration=CalibrationNeed(statistics=("fisher",), budget=CalibrationBudget(documents=4)))
    check = next(c for c in method_checks(spec) if c.name.endswith("calibration_declaration"))
    with pytest.raises(AssertionError, match="source is empty"):
        check()
    with pytest.raises(ParameterError, match="not an int parameter"):
        MethodSpec(name="bad", kernel=lambda *a: None,
                   calibration=CalibrationNeed(statistics=("gram",), budget_params={"documents": "nope"}))


# -- Fisher merging ------------------------------------------------------------------------


def test_fisher_matches_float64_reference():
    experts = [_rand(6, 5, seed=i) for i in range(3)]
    fisher = [_rand(6, 5, seed=10 + i).abs() for i in range(3)]
    w = [0.5, 1.0, 2.0]
    out = fisher_merging.kernel(None, experts, torch.tensor(w), {"fisher_floor": 1e-6}, _ctx(CTX, fisher=fisher))
    E, F = np.stack([e.numpy() for e in experts]), np.stack([f.numpy() for f in fisher]) + 1e-6
    c = np.array(w)[:, None, None]
    np.testing.assert_allclose(out.numpy(), (c * F * E).sum(0) / (c * F).sum(0), rtol=1e-12)


def test_fisher_with_equal_fisher_is_the_linear_mean():
    experts = [_rand(6, 5, seed=i) for i in range(3)]
    f = _rand(6, 5, seed=9).abs()
    w = [0.2, 0.3, 1.5]
    for floor in (0.0, 1e-6):
        out = fisher_merging.kernel(None, experts, torch.tensor(w, dtype=torch.float64), {"fisher_floor": floor}, _ctx(CTX, fisher=[f] * 3))
        torch.testing.assert_close(out, _linear_mean(experts, w), rtol=1e-12, atol=1e-12)


def test_fisher_without_any_fisher_weight_falls_back_to_the_mean_entrywise():
    experts = [_rand(4, 3, seed=i) for i in range(2)]
    f = [torch.zeros(4, 3, dtype=torch.float64), torch.zeros(4, 3, dtype=torch.float64)]
    f[1][0, 0] = 1.0  # only expert 1 has a Fisher weight at (0, 0)
    out = fisher_merging.kernel(None, experts, torch.ones(2), {"fisher_floor": 0.0}, _ctx(CTX, fisher=f))
    assert out[0, 0] == experts[1][0, 0]
    mean = (experts[0] + experts[1]) / 2
    torch.testing.assert_close(out.flatten()[1:], mean.flatten()[1:])


def test_fisher_shape_mismatch_names_the_tensor():
    experts = [_rand(4, 3, seed=i) for i in range(2)]
    with pytest.raises(ValueError, match="down_proj.*Fisher of expert 1"):
        fisher_merging.kernel(None, experts, torch.ones(2), {"fisher_floor": 0.0},
                              _ctx(CTX, fisher=[torch.ones(4, 3), torch.ones(3, 4)]))


# -- RegMean -------------------------------------------------------------------------------


def _regmean_ref(ws, xs, c, alpha):
    """numpy: W = (sum c_i W_i G~_i)(sum c_i G~_i)^-1, G~ = alpha G + (1 - alpha) diag(G)."""
    gs = [x.T @ x for x in xs]
    gs = [alpha * g + (1 - alpha) * np.diag(np.diag(g)) for g in gs]
    a = sum(ci * g for ci, g in zip(c, gs))
    b = sum(ci * w @ g for ci, w, g in zip(c, ws, gs))
    return b @ np.linalg.inv(a)


@pytest.mark.parametrize("alpha", [1.0, 0.9, 0.1, 0.0])
def test_regmean_matches_float64_reference(alpha):
    ws = [_rand(7, 5, seed=i).numpy() for i in range(3)]
    xs = [_rand(20, 5, seed=20 + i).numpy() for i in range(3)]
    c = [1.0, 0.5, 2.0]
    grams = [torch.from_numpy(x.T @ x) for x in xs]
    out = regmean.kernel(None, [torch.from_numpy(w) for w in ws], torch.tensor(c), {"alpha": alpha},
                         _ctx(CTX, gram=grams))
    np.testing.assert_allclose(out.numpy(), _regmean_ref(ws, xs, c, alpha), rtol=1e-9, atol=1e-12)


def test_regmean_alpha_one_solves_the_least_squares_problem():
    """At alpha = 1 RegMean is the minimiser of sum_i c_i ||X_i W^T - X_i W_i^T||^2 (lstsq on stacked rows)."""
    ws = [_rand(4, 6, seed=i).numpy() for i in range(2)]
    xs = [_rand(15, 6, seed=30 + i).numpy() for i in range(2)]
    c = [1.0, 3.0]
    lhs = np.concatenate([np.sqrt(ci) * x for ci, x in zip(c, xs)])
    rhs = np.concatenate([np.sqrt(ci) * x @ w.T for ci, x, w in zip(c, xs, ws)])
    ref = np.linalg.lstsq(lhs, rhs, rcond=None)[0].T
    out = regmean.kernel(None, [torch.from_numpy(w) for w in ws], torch.tensor(c), {"alpha": 1.0},
                         _ctx(CTX, gram=[torch.from_numpy(x.T @ x) for x in xs]))
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-9, atol=1e-12)


def test_regmean_with_identity_grams_is_the_linear_mean():
    experts = [_rand(7, 5, seed=i) for i in range(3)]
    w = [0.2, 1.0, 0.7]
    eye = torch.eye(5, dtype=torch.float64)
    for alpha in (1.0, 0.3):
        out = regmean.kernel(None, experts, torch.tensor(w, dtype=torch.float64), {"alpha": alpha}, _ctx(CTX, gram=[eye] * 3))
        torch.testing.assert_close(out, _linear_mean(experts, w), rtol=1e-12, atol=1e-12)


def test_regmean_non_linear_tensors_and_unseen_inputs_take_the_mean():
    vecs = [_rand(5, seed=i) for i in range(2)]
    out = regmean.kernel(None, vecs, torch.ones(2), {"alpha": 0.5}, _ctx(VEC, gram=[torch.eye(5)] * 2))
    torch.testing.assert_close(out, (vecs[0] + vecs[1]) / 2)
    ws = [_rand(3, 4, seed=i) for i in range(2)]
    xs = [_rand(10, 4, seed=40 + i) for i in range(2)]
    for x in xs:
        x[:, 2] = 0.0  # input feature 2 is never active: its weight column is unconstrained
    out = regmean.kernel(None, ws, torch.ones(2), {"alpha": 1.0}, _ctx(CTX, gram=[x.T @ x for x in xs]))
    torch.testing.assert_close(out[:, 2], (ws[0][:, 2] + ws[1][:, 2]) / 2)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="Gram matrix of expert 0 has shape"):
        regmean.kernel(None, ws, torch.ones(2), {"alpha": 1.0}, _ctx(CTX, gram=[torch.eye(3)] * 2))


# -- AdaMerging ----------------------------------------------------------------------------


def test_adamerging_kernel_applies_the_coefficients():
    base = _rand(6, 4, seed=0)
    experts = [_rand(6, 4, seed=i + 1) for i in range(2)]
    lam = [torch.tensor(0.25, dtype=torch.float64), torch.tensor(0.6, dtype=torch.float64)]
    p = adamerging.defaults()
    out = adamerging.kernel(base, experts, torch.ones(2), p, _ctx(CTX, coefficients=lam))
    ref = base.numpy() + 0.25 * (experts[0] - base).numpy() + 0.6 * (experts[1] - base).numpy()
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-12)


def test_adamerging_without_learned_coefficients_is_task_arithmetic_at_init():
    base = _rand(6, 4, seed=0)
    experts = [_rand(6, 4, seed=i + 1) for i in range(3)]
    p = adamerging.defaults()
    ta = get_method("task_arithmetic")
    want = ta.kernel(base, experts, torch.ones(3, dtype=torch.float64),
                     {"lambda": p["init_lambda"], "normalize": False}, CTX)
    torch.testing.assert_close(run_kernel(adamerging, base, experts, p, CTX), want, rtol=1e-12, atol=1e-12)


def test_prediction_entropy_reference():
    logits = _rand(2, 3, 5, seed=3).float()
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    p = torch.softmax(logits.double(), -1).numpy()
    h = -(p * np.log(p)).sum(-1)
    assert float(prediction_entropy(logits, mask, "last")) == pytest.approx((h[0, 1] + h[1, 2]) / 2, rel=1e-5)
    assert float(prediction_entropy(logits, mask, "all")) == pytest.approx((h[0, :2].sum() + h[1].sum()) / 5, rel=1e-5)


# -- EMR-Merging ---------------------------------------------------------------------------


def _emr_ref(base_model, expert_models, task):
    """numpy, from the EMR paper: elect sign(sum tau), max |tau| among agreeing; masks; one
    rescaler per task over the whole model: sum|tau_t| / sum|M_t tau_uni|."""
    taus = {n: np.stack([e[n] - base_model[n] for e in expert_models]) for n in base_model}
    uni, masks = {}, {}
    for n, t in taus.items():
        flag = np.sign(t.sum(0))
        masks[n] = (t * flag) > 0
        uni[n] = np.where(masks[n], np.abs(t), 0).max(0) * flag
    num = sum(np.abs(taus[n][task]).sum() for n in taus)
    den = sum(np.abs(masks[n][task] * uni[n]).sum() for n in taus)
    return {n: base_model[n] + num / den * masks[n][task] * uni[n] for n in base_model}


def test_emr_matches_float64_reference_over_a_whole_model():
    names = {"model.layers.0.mlp.down_proj.weight": (6, 4), "model.layers.0.input_layernorm.weight": (4,)}
    base = {n: _rand(*s, seed=k) for k, (n, s) in enumerate(names.items())}
    experts = [{n: base[n] + 0.1 * _rand(*s, seed=10 * i + k) for k, (n, s) in enumerate(names.items())}
               for i in range(1, 4)]
    stats = {}
    for n in names:
        ctx = TensorContext(name=n)
        stats[n] = emr_merging.prepass(base[n], [e[n] for e in experts], emr_merging.defaults(), ctx)
    for task in range(3):
        ref = _emr_ref({n: t.numpy() for n, t in base.items()}, [{n: t.numpy() for n, t in e.items()} for e in experts], task)
        params = emr_merging.validate_params({"task": task}, n_experts=3)
        for n in names:
            ctx = TensorContext(name=n, model_stats=stats)
            out = emr_merging.kernel(base[n], [e[n] for e in experts], torch.ones(3), params, ctx)
            np.testing.assert_allclose(out.numpy(), ref[n], rtol=1e-12, atol=1e-14)


def test_emr_with_one_expert_reproduces_it():
    base, expert = _rand(6, 4, seed=0), _rand(6, 4, seed=1)
    expert[0, 0] = base[0, 0]  # a zero task-vector entry stays zero
    for rescaler in ("sum", "tensor_mean"):
        params = emr_merging.validate_params({"task": 0, "rescaler": rescaler}, n_experts=1)
        torch.testing.assert_close(run_kernel(emr_merging, base, [expert], params, CTX), expert, rtol=0, atol=1e-15)


def test_emr_task_out_of_range_is_rejected_before_tensors():
    with pytest.raises(ParameterError, match="'task' is 2, but there are 2 experts"):
        emr_merging.validate_params({"task": 2}, n_experts=2)


def test_emr_rescalers_modes():
    stats = {"a": {"numel": 2.0, "abs_tau_0": 4.0, "abs_uni_0": 2.0}, "b": {"numel": 8.0, "abs_tau_0": 8.0, "abs_uni_0": 8.0}}
    assert emr_rescalers(stats, 1, "sum") == (12.0 / 10.0,)
    assert emr_rescalers(dict(stats), 1, "tensor_mean") == pytest.approx(((2.0 + 1.0) / (1.0 + 1.0),))
    assert emr_rescalers({"a": {"numel": 1.0, "abs_tau_0": 0.0, "abs_uni_0": 0.0}}, 1) == (1.0,)


def test_check_method_passes():
    for spec in SPECS:
        assert check_method(spec, quiet=True).passed


def test_the_plugin_example_in_the_docs_passes_the_kit():
    import re
    from pathlib import Path

    from mergebench.methods import registry

    doc = (Path(__file__).parents[1] / "docs" / "data-dependent.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", doc, re.S) if "def fisher_median" in b)
    scope: dict = {}
    exec(compile(block, "docs/data-dependent.md", "exec"), scope)
    try:
        report = check_method(scope["spec"], quiet=True)
        assert "fisher_median:calibration_declaration" in report.passed
    finally:
        registry._REGISTRY.pop("fisher_median", None)  # as tests/test_engine.py does: leave the registry as found
