"""Document budgets on lm-eval *groups*: each leaf task gets its own seeded sample, lm-eval scores
exactly those documents, the group's aggregate comes back as the suite task's row, and the cache
key covers every leaf. Offline: a group YAML over two embedded tasks, tiny random models."""

import json

import pytest

from mergebench.evaluation import runner
from mergebench.results import store
from mergebench.methods import ParameterError
from mergebench.config.sampling import doc_sample
from mergebench.zoo.tasks import task_info

LEAVES = ("mb_capitals", "mb_elements")


def _group_yaml(name: str, weight_by_size: bool | None = True) -> str:
    agg = "" if weight_by_size is None else (
        f"aggregate_metric_list:\n  - metric: acc\n    aggregation: mean\n    weight_by_size: {str(weight_by_size).lower()}\n"
    )
    return f"group: {name}\ntask:\n" + "".join(f"  - {t}\n" for t in LEAVES) + agg


@pytest.fixture()
def group_tm(tmp_path, monkeypatch, tiny_suites):
    """A TaskManager holding the embedded tasks plus groups over two of them, used by the runner."""
    from lm_eval.tasks import TaskManager

    from mergebench.zoo.tasks import yaml_dir

    folder = tmp_path / "groups"
    folder.mkdir()
    (folder / "weighted.yaml").write_text(_group_yaml("tinygroup", True))
    (folder / "unweighted.yaml").write_text(_group_yaml("tinygroup_mean", False))
    (folder / "noagg.yaml").write_text(_group_yaml("tinygroup_noagg", None))
    tm = TaskManager(include_path=[str(yaml_dir("test")), str(folder)], include_defaults=False)
    monkeypatch.setattr(runner, "task_manager_for", lambda profile: tm)
    return tm


def _suite(root, name: str, tasks: list[dict], budget: int | None = 4) -> str:
    suite = {
        "name": name, "version": 1, "default_profile": "p",
        "profiles": {"p": {
            "pools": ["tiny"],
            "tasks": tasks,
            "sampler": {"mode": "uniform", "sizes": [3], "subsets_per_size": 1, "seed": 0},
            "docs": {"budget": budget, "seed": 0, "split": "test"},
            "eval": {"dtype": "float32", "batch_size": 8},
            "references": {"base": True, "experts": False},
        }},
    }
    (root / f"{name}.yaml").write_text(json.dumps(suite))
    return name


def _plan(suite: str, **kw):
    return runner.plan_eval("linear", suite, log=lambda m: None, **kw)


def _counts() -> dict[str, int]:
    return {t: i["counts"]["test"] for t, i in task_info().items()}


def test_each_leaf_gets_its_own_seeded_sample(tiny_suites, group_tm):
    suite = _suite(tiny_suites, "grp", [{"name": "tinygroup", "metric": "acc"}, {"name": "mb_sentiment"}])
    plan = _plan(suite)
    n = _counts()
    assert set(plan.samples) == {*LEAVES, "mb_sentiment"}  # keyed by leaf, never by the group
    for leaf in (*LEAVES, "mb_sentiment"):
        assert plan.samples[leaf] == list(doc_sample(leaf, n[leaf], 4, seed=0, split="test").indices)
    assert plan.samples["mb_capitals"] != plan.samples["mb_elements"]
    assert plan.doc_hash == store.doc_index_hash(plan.samples)
    group, sentiment = plan.profile.tasks
    assert plan.n_docs([group]) == 4 * len(LEAVES) and plan.n_docs([group, sentiment]) == 4 * (len(LEAVES) + 1)
    # without a budget every document of every leaf is scored
    full = _plan(_suite(tiny_suites, "grpfull", [{"name": "tinygroup"}], budget=None))
    assert full.samples == {leaf: list(range(n[leaf])) for leaf in LEAVES}


def test_group_run_scores_the_sampled_documents_and_returns_the_aggregate(tiny_suites, group_tm, tmp_path, monkeypatch):
    import lm_eval

    suite = _suite(tiny_suites, "grp", [{"name": "tinygroup", "metric": "acc"}, {"name": "mb_sentiment"}])
    plan = _plan(suite)
    real, calls = lm_eval.simple_evaluate, []

    def spy(**kw):
        out = real(**{**kw, "log_samples": True})  # to read back which documents were scored
        calls.append((kw["samples"], out))
        return out

    monkeypatch.setattr(lm_eval, "simple_evaluate", spy)
    docs = {leaf: task.eval_docs for leaf, task in group_tm.load([*LEAVES, "mb_sentiment"])["tasks"].items()}
    results = tmp_path / "results"
    stats = runner.run_eval(plan, results, progress=False, log=lambda m: None)
    assert stats["done"] == len(plan.units) == 2 and len(calls) == 2
    with store.connect(results) as con:
        rows = con.execute("SELECT * FROM results WHERE metric = 'acc'").df()
    for unit, (asked, out) in zip(plan.units, calls):  # run in plan order
        assert asked == plan.samples
        for leaf, idx in asked.items():
            # the logged documents themselves (lm-eval's logged doc_id is read off our own list)
            assert [s["doc"] for s in out["samples"][leaf]] == [docs[leaf][i] for i in idx]
            assert out["n-samples"][leaf] == {"original": _counts()[leaf], "effective": 4}
        leaf_acc = [out["results"][leaf]["acc,none"] for leaf in LEAVES]
        group = out["results"]["tinygroup"]["acc,none"]
        # equal budgets: lm-eval's size weighting (by documents scored) reduces to the plain mean
        assert group == pytest.approx(sum(leaf_acc) / 2)
        stored = rows[(rows.unit_id == unit.unit.unit_id) & (rows.task == "tinygroup")]
        assert stored.value.item() == pytest.approx(group) and stored.n_docs.item() == 8
    assert set(rows.task) == {"tinygroup", "mb_sentiment"}  # leaves are not suite rows
    assert len(rows) == 2 * len(plan.units)


@pytest.mark.parametrize("group, weighted", [("tinygroup", True), ("tinygroup_mean", False)])
def test_group_aggregate_weights_leaves_as_lm_eval_says(group_tm, tiny_pool, group, weighted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergebench.evaluation.battery import evaluate_model

    base, _ = tiny_pool
    model, tok = AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base)
    samples = {"mb_capitals": [0, 3, 9], "mb_elements": [1, 2, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14]}
    acc = {}
    for name in (*LEAVES, group):
        scores = evaluate_model(model, tok, [name], group_tm, samples=samples, batch_size=8)
        acc[name] = next(s for s in scores if s.metric == "acc")
    sizes = {leaf: len(samples[leaf]) for leaf in LEAVES}
    assert {leaf: acc[leaf].n_docs for leaf in LEAVES} == sizes and acc[group].n_docs == sum(sizes.values())
    a, b = (acc[leaf].value for leaf in LEAVES)
    assert a != b  # otherwise the weighting could not be told apart
    expected = (a * 3 + b * 12) / 15 if weighted else (a + b) / 2
    assert acc[group].value == pytest.approx(expected)


def test_cache_key_follows_every_leaf(tiny_suites, group_tm):
    a = _plan(_suite(tiny_suites, "g4", [{"name": "tinygroup", "docs": 4}, {"name": "mb_sentiment"}]))
    b = _plan(_suite(tiny_suites, "g4", [{"name": "tinygroup", "docs": 5}, {"name": "mb_sentiment"}]))
    assert a.samples["mb_sentiment"] == b.samples["mb_sentiment"]
    assert all(a.samples[leaf] != b.samples[leaf] for leaf in LEAVES)
    assert a.doc_hash != b.doc_hash
    assert not {u.unit.unit_id for u in a.units} & {u.unit.unit_id for u in b.units}
    # one leaf alone moving is enough
    moved = {**a.samples, "mb_elements": b.samples["mb_elements"]}
    assert store.doc_index_hash(moved) not in {a.doc_hash, b.doc_hash}


def test_what_cannot_work_is_refused_by_name(tiny_suites, group_tm, tiny_pool):
    with pytest.raises(ParameterError, match="'tinygroup_noagg' has no aggregate_metric_list"):
        _plan(_suite(tiny_suites, "bad", [{"name": "tinygroup_noagg"}]))
    with pytest.raises(ParameterError, match="'mergebench_general' is a tag of mb_analogies, "):
        _plan(_suite(tiny_suites, "bad", [{"name": "mergebench_general"}]))
    with pytest.raises(ParameterError, match="'mb_capitals' is scored by both 'tinygroup' and 'mb_capitals'"):
        _plan(_suite(tiny_suites, "bad", [{"name": "tinygroup"}, {"name": "mb_capitals", "docs": 7}]))
    from mergebench.evaluation.battery import evaluate_model

    with pytest.raises(ValueError, match="samples for group\\(s\\) tinygroup"):
        evaluate_model(None, None, ["tinygroup"], group_tm, samples={"tinygroup": [0]})
