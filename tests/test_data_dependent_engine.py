"""Data-dependent methods through the engine (merge with calibration texts) on tiny Llamas, and the
validation-split calibration sampler."""

from __future__ import annotations

# the four methods register on import, also before the package's entry points are reinstalled
import mergebench.baselines.adamerging
import mergebench.baselines.emr
import mergebench.baselines.fisher
import mergebench.baselines.regmean  # noqa: F401
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mergebench.engine import merge
from mergebench.engine.calibration import CalibrationData, CalibrationError, calibrate
from mergebench.engine.request import MergeRequest
from mergebench.methods import ParameterError, get_method
from mergebench.toy import make_tiny_pool

PROMPTS = [["Question: capital of Peru?\nAnswer:", "Question: 7 times 6?\nAnswer:", "Q: red or blue?\nA:"],
           ["Word: hot. Opposite:", "Word: tall. Opposite:"]]


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    base, experts = make_tiny_pool(tmp_path_factory.mktemp("pool"), n_experts=2, delta_scale=0.05)
    return str(base), [str(e) for e in experts]


def _merge(pool, method, params=None, data=None, dtype="float32", experts=None):
    base, exp = pool
    req = MergeRequest(method=method, base=base, experts=experts or exp, params=params or {}, dtype=dtype,
                       out_dtype=dtype)
    return merge(req, None, progress=False, calibration=data)


def test_data_dependent_needs_texts_and_data_free_refuses_them(tmp_path):
    missing = str(tmp_path / "nowhere")
    req = MergeRequest(method="regmean", base=missing, experts=[missing])
    with pytest.raises(ParameterError, match="data-dependent"):
        merge(req, None, progress=False)  # before any file is opened: the paths do not exist
    req = MergeRequest(method="linear", experts=[missing])
    with pytest.raises(ParameterError, match="data-free"):
        merge(req, None, progress=False, calibration=CalibrationData.from_texts([["x"]]))


def test_adamerging_with_frozen_coefficients_is_task_arithmetic(pool):
    data = CalibrationData.from_texts(PROMPTS)
    ada = _merge(pool, "adamerging", {"epochs": 0}, data, dtype="float64")
    ta = _merge(pool, "task_arithmetic", {"lambda": 0.3}, dtype="float64")
    assert ada.state_dict.keys() == ta.state_dict.keys()
    for name, t in ta.state_dict.items():
        torch.testing.assert_close(ada.state_dict[name], t, rtol=1e-12, atol=1e-12)
    step = ada.calibration["model_step"]
    assert step["lambda"] == [0.3, 0.3] and step["epochs"] == 0
    prov = ada.provenance()["calibration"]
    assert prov["documents"] == [3, 2] and "seconds" not in prov and "calibration_s" in ada.timings


def _entropy_loss(pool, lam, groups):
    """Reference: sum over groups of the mean entropy (float64 numpy) of the next-token
    distribution at each prompt's last token, for theta_0 + sum_i lam_i tau_i, one prompt at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, experts = pool
    sd0 = load_file(f"{base}/model.safetensors")
    sds = [load_file(f"{e}/model.safetensors") for e in experts]
    state = {n: t.double() + sum(l * (s[n].double() - t.double()) for l, s in zip(lam, sds)) for n, t in sd0.items()}
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64)
    model.load_state_dict(state)
    tok = AutoTokenizer.from_pretrained(base)
    total = 0.0
    with torch.no_grad():
        for g in groups:
            hs = []
            for text in g:
                logits = model(input_ids=torch.tensor([tok(text)["input_ids"]])).logits[0, -1].numpy()
                p = np.exp(logits - logits.max())
                p /= p.sum()
                hs.append(-(p * np.log(p)).sum())
            total += float(np.mean(hs))
    return total


def test_adamerging_first_step_follows_the_entropy_gradient(pool):
    """One Adam step moves each coefficient by lr against the sign of dLoss/dlambda (Adam's first
    update is lr * g / |g|); the gradient's sign comes from central differences of a float64 reference."""
    data = CalibrationData.from_texts(PROMPTS)
    lr, h = 1e-2, 1e-3
    out = _merge(pool, "adamerging", {"epochs": 1, "lr": lr, "samples_per_epoch": 16}, data)
    lam = out.calibration["model_step"]["lambda"]
    for i in range(2):
        up, down = [0.3, 0.3], [0.3, 0.3]
        up[i] += h
        down[i] -= h
        grad = (_entropy_loss(pool, up, PROMPTS) - _entropy_loss(pool, down, PROMPTS)) / (2 * h)
        assert abs(grad) > 1e-4  # the check below means something
        assert lam[i] == pytest.approx(0.3 - lr * np.sign(grad), abs=1e-5)
    first = out.calibration["model_step"]["loss_first"]
    assert first == pytest.approx(_entropy_loss(pool, [0.3, 0.3], PROMPTS), rel=1e-4)


def test_fisher_merging_of_identical_experts_is_that_expert(pool):
    _base, experts = pool
    data = CalibrationData.from_texts([[("Q: a?", " A")], [("Q: b?", " B"), ("Q: c?", " C")]])
    out = _merge(pool, "fisher_merging", {"fisher_floor": 0.0}, data, experts=[experts[0], experts[0]])
    ref = load_file(f"{experts[0]}/model.safetensors")
    for name, t in ref.items():
        torch.testing.assert_close(out.state_dict[name], t, rtol=1e-6, atol=1e-7)


def test_regmean_through_the_engine_uses_the_experts_grams(pool):
    base, experts = pool
    data = CalibrationData.from_texts([[("Q: a?", " A"), ("Q: bb?", " B")], [("Q: ccc?", " C")]])
    out = _merge(pool, "regmean", {"alpha": 0.5}, data, dtype="float64")
    cal = calibrate(get_method("regmean").calibration, {}, base=base, experts=experts, data=data, dtype=torch.float64)
    sds = [load_file(f"{e}/model.safetensors") for e in experts]
    name = "model.layers.1.self_attn.v_proj.weight"
    gs = [g.numpy() for g in cal.aux[name]["gram"]]
    gs = [0.5 * g + 0.5 * np.diag(np.diag(g)) for g in gs]
    ws = [s[name].double().numpy() for s in sds]
    ref = sum(w @ g for w, g in zip(ws, gs)) @ np.linalg.inv(sum(gs))
    np.testing.assert_allclose(out.state_dict[name].numpy(), ref, rtol=1e-6, atol=1e-9)
    mean = (sds[0]["model.norm.weight"].double() + sds[1]["model.norm.weight"].double()) / 2
    torch.testing.assert_close(out.state_dict["model.norm.weight"], mean)  # not a linear weight: the mean
    assert not torch.allclose(out.state_dict[name], torch.from_numpy((ws[0] + ws[1]) / 2))
    assert out.calibration["need"]["statistics"] == ["gram"]


def test_emr_task_models_through_the_engine(pool):
    _base, experts = pool
    outs = [_merge(pool, "emr_merging", {"task": k}) for k in range(2)]
    uni = _merge(pool, "emr_merging", {})
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(outs[0].state_dict[name], outs[1].state_dict[name])
    assert not torch.equal(outs[0].state_dict[name], uni.state_dict[name])
    single = _merge(pool, "emr_merging", {"task": 0}, experts=[experts[1]])
    ref = load_file(f"{experts[1]}/model.safetensors")
    for n, t in ref.items():
        torch.testing.assert_close(single.state_dict[n], t, rtol=1e-6, atol=1e-7)
    with pytest.raises(ParameterError, match="'task' is 2"):
        _merge(pool, "emr_merging", {"task": 2})


# -- the validation-split sampler -------------------------------------------------------------


def test_validation_docs_are_seeded_budgeted_and_from_validation():
    from mergebench.evaluation.calibration_data import validation_docs
    from mergebench.methods.calibration import CalibrationBudget
    from mergebench.zoo.tasks import load_split

    budget = CalibrationBudget(documents=10, seed=3, source="test")
    docs, rec = validation_docs("mb_capitals", budget)
    again, rec2 = validation_docs("mb_capitals", budget)
    assert docs == again and rec == rec2 and rec["split"] == "validation" and rec["n"] == 10
    val = {(r["query"], " " + r["choices"][r["gold"]]) for r in load_split("mb_capitals", "validation")}
    assert all((d.prompt, d.answer) in val for d in docs)
    other, _ = validation_docs("mb_capitals", CalibrationBudget(documents=10, seed=4, source="test"))
    assert other != docs
    every, rec3 = validation_docs("mb_capitals", CalibrationBudget(documents=10_000, source="test"))
    assert rec3["n"] == rec3["of"] == len(val) == len(every)
    with pytest.raises(CalibrationError, match="embedded tasks"):
        validation_docs("glue_rte", budget)


def test_calibration_for_members_groups_by_the_experts_own_task():
    from mergebench.config.pools import load_pool
    from mergebench.config.suites import load_suite
    from mergebench.evaluation.calibration_data import calibration_for_members

    prof = load_suite("glue").profile("embedded")
    pool_ = load_pool("smol")
    need = get_method("regmean").calibration
    data = calibration_for_members(prof, pool_, ["capitals", "antonyms", pool_.base.name], need, {"regmean_samples": 5})
    groups = data.source["groups"]
    assert [g["model"] for g in groups] == ["capitals", "antonyms", pool_.base.name]
    assert [t["task"] for t in groups[0]["tasks"]] == ["mb_capitals"]
    assert [t["task"] for t in groups[1]["tasks"]] == ["mb_antonyms"]
    assert len(groups[2]["tasks"]) == len(prof.tasks)  # the base: every task of the profile
    assert [len(g) for g in data.groups] == [5, 5, 5 * len(prof.tasks)]
    assert data.source["split"] == "validation" and data.source["budget"]["documents"] == 5


# -- the runner: calibration from validation splits, per-task scoring ---------------------------


def test_runner_scores_each_task_with_its_task_model(tiny_suites):
    from mergebench.evaluation.runner import plan_eval, run_unit

    plan = plan_eval("emr_merging", "tiny", log=lambda m: None)
    wu = next(u for u in plan.merges if len(u.members) == 2)
    assert wu.unit.extra["outputs"] == "per_task"
    with torch.inference_mode():  # as run_eval calls it
        rows, prov, outcomes = run_unit(plan, wu, device="cpu", batch_size=8, quiet=True)
    own = {"e0": "mb_capitals", "e1": "mb_sentiment", "e2": "mb_elements"}  # the tiny pool's task tags
    want = {t.name: next((m for m in wu.members if own[m] == t.name), None) for t in wu.tasks}
    assert prov["per_task"] == want and None in want.values()
    by_task = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r)
    assert set(by_task) == {t.name for t in wu.tasks}
    assert prov["merge_wall_s"] > 0 and prov["eval_docs"] == plan.n_docs(wu.tasks)
    assert {o["task"] for o in outcomes} == set(want)  # per-document outcomes of every task, from its own model
    assert len(prov["task_vector_norms"]) == len(set(want.values())) and prov["task_vector_norm"] > 0


def test_runner_calibrates_on_validation_and_records_it(tiny_suites):
    from mergebench.evaluation.runner import plan_eval, run_unit

    linear = plan_eval("linear", "tiny", log=lambda m: None)
    assert all("calibration" not in u.unit.extra for u in linear.merges)  # data-free unit ids unchanged
    assert plan_eval("regmean", "tiny", log=lambda m: None).merges[0].unit.extra["calibration"]["statistics"] == ["gram"]
    plan = plan_eval("fisher_merging", "tiny", params={"fisher_samples": 4}, log=lambda m: None)
    wu = plan.merges[0]
    key = wu.unit.extra["calibration"]
    assert key["split"] == "validation" and key["budget"]["documents"] == 4
    with torch.inference_mode():  # as run_eval calls it: the Fisher / a model step must still get gradients
        rows, prov, _outcomes = run_unit(plan, wu, device="cpu", batch_size=8, quiet=True)
    cal = prov["calibration"]
    assert cal["documents"] == [4] * len(wu.members) and cal["data"]["split"] == "validation"
    assert [g["model"] for g in cal["data"]["groups"]] == list(wu.members)
    assert prov["calibration_s"] > 0 and rows


def test_calibration_works_under_inference_mode(pool):
    """run_eval merges under torch.inference_mode(); a Fisher and a model step need gradients."""
    data = CalibrationData.from_texts(PROMPTS)
    with torch.inference_mode():
        fisher = _merge(pool, "fisher_merging", {}, CalibrationData.from_texts([[("Q: a?", " A")], [("Q: b?", " B")]]))
        ada = _merge(pool, "adamerging", {"epochs": 2, "lr": 0.05}, data)
    assert fisher.calibration["statistics_s"] > 0
    assert ada.calibration["model_step"]["lambda"] != [0.3, 0.3]


def test_adamerging_layer_wise_learns_one_coefficient_per_tensor(pool):
    base, experts = pool
    need = get_method("adamerging").calibration
    params = get_method("adamerging").validate_params({"granularity": "layer", "epochs": 1, "lr": 0.01}, n_experts=2)
    cal = calibrate(need, params, base=base, experts=experts, data=CalibrationData.from_texts(PROMPTS))
    lam = {name: [float(v) for v in entry["coefficients"]] for name, entry in cal.aux.items()}
    assert len(lam) == len(load_file(f"{base}/model.safetensors"))
    moved = [abs(v - 0.3) for vs in lam.values() for v in vs]
    assert max(moved) == pytest.approx(0.01, abs=1e-4)  # Adam's first step: lr * sign(gradient)
    assert len({tuple(vs) for vs in lam.values()}) > 1  # different tensors, different coefficients


def test_plan_shows_the_calibration_cost(tiny_suites, tmp_path):
    from typer.testing import CliRunner

    from mergebench.cli import app
    from mergebench.evaluation.runner import plan_eval

    r = CliRunner().invoke(app, ["plan", "--suite", "tiny", "--method", "fisher_merging", "--set", "fisher_samples=3",
                                 "--results", str(tmp_path / "results")], env={"COLUMNS": "300"})
    assert r.exit_code == 0, r.output
    merges = plan_eval("fisher_merging", "tiny", log=lambda m: None).merges
    docs = sum(3 * len(u.members) for u in merges)  # 3 validation documents of each member's own task
    line = next(x for x in r.output.splitlines() if x.startswith("calibration (fisher)"))
    assert f"{len(merges)} merge(s), {docs} validation documents" in line
    assert f"{docs} forward and {docs} backward" in line
    # nothing has timed fisher_merging on this store: the estimate adds its calibration at the assumed rate
    from mergebench.evaluation.pace import ASSUMED_CALIBRATION_SECONDS, Pace, Rates, format_duration
    from mergebench.evaluation.runner import untimed_calibration_seconds

    plan = plan_eval("fisher_merging", "tiny", params={"fisher_samples": 3}, log=lambda m: None)
    units = [u for u in plan.units if u.role == "merged"]
    untimed = Pace(Rates(0.1, 1.0, "test"))
    assert untimed_calibration_seconds(plan, units, untimed) == pytest.approx(docs * ASSUMED_CALIBRATION_SECONDS["fisher"])
    assert f"~{format_duration(docs * ASSUMED_CALIBRATION_SECONDS['fisher'])} of it at assumed rates" in r.output
    timed = Pace(Rates(0.1, 1.0, "test", merge_per_expert={"fisher_merging": 4.0}))
    assert untimed_calibration_seconds(plan, units, timed) == 0.0  # a stored unit's merge time includes it
    untimed.observe(10, 1.0, 3.0, merge_seconds=1.5, method="fisher_merging", n=2)
    assert untimed_calibration_seconds(plan, units, untimed) == 0.0  # so does this run's first unit


def test_engine_fisher_feeds_karcher_preconditioning_like_fisher_checkpoints(pool, tmp_path):
    """The statistic "fisher" reaches a kernel under the same ctx.aux key as a Fisher checkpoint
    given with --aux: Karcher declared with a calibration need gives the same merge as Karcher fed
    the engine's Fisher written to safetensors files."""
    from safetensors.torch import save_file

    from mergebench.methods import MethodSpec, register, registry
    from mergebench.methods.calibration import CalibrationBudget, CalibrationNeed

    base, experts = pool
    karcher = get_method("karcher")
    need = CalibrationNeed(statistics=("fisher",), budget=CalibrationBudget(documents=4, source="test"))
    spec = register(MethodSpec(name="karcher_calibrated", kernel=karcher.kernel, citation=karcher.citation,
                               params=karcher.params, contract=karcher.contract, granularity="tensor", calibration=need))
    data = CalibrationData.from_texts([[("Q: a?", " A"), ("Q: b?", " B")], [("Q: c?", " C")]])
    try:
        got = _merge(pool, spec.name, {}, data)
    finally:
        registry._REGISTRY.pop(spec.name, None)  # leave the registry as found (as tests/test_engine.py does)
    cal = calibrate(need, {}, base=base, experts=experts, data=data)
    paths = []
    for i in range(2):
        path = tmp_path / f"fisher_{i}.safetensors"
        save_file({n: entry["fisher"][i].contiguous() for n, entry in cal.aux.items() if "fisher" in entry}, str(path))
        paths.append(str(path))
    want = merge(MergeRequest(method="karcher", base=base, experts=experts, aux={"fisher": paths}), None, progress=False)
    plain = _merge(pool, "karcher")
    name = "model.layers.0.mlp.up_proj.weight"
    for n, t in want.state_dict.items():
        torch.testing.assert_close(got.state_dict[n], t, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(got.state_dict[name], plain.state_dict[name], rtol=1e-7, atol=1e-9)
