"""Per-document outcomes (mergebench.evaluation.outcomes): the documents the battery scored, values
whose mean is lm-eval's reported score, and the gold choice's log-likelihood as stock HFLM gives it."""

from __future__ import annotations

import math

import pytest
import torch

from mergebench.evaluation.battery import Battery
from mergebench.zoo.tasks import task_manager

TASKS = ["mb_capitals", "mb_medical_defs", "mb_sentiment"]  # acc, acc_norm (uneven choice lengths), 2 choices


@pytest.fixture(scope="module")
def scored(tiny_pool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_pool[0], dtype=torch.float32).eval()
    model.config.max_position_embeddings = 512
    tok = AutoTokenizer.from_pretrained(tiny_pool[0])
    samples = {t: [7, 2, 11, 5] for t in TASKS}  # unsorted on purpose: ids must follow the list
    battery = Battery(TASKS, task_manager("test"), samples=samples)
    with torch.inference_mode():
        scores, _ = battery.score(model, tok, batch_size=4, quiet=True)
    return battery, scores, model, tok, samples


def test_outcomes_cover_exactly_the_sampled_documents(scored):
    battery, _, _, _, samples = scored
    for task in TASKS:
        for metric in ("acc", "acc_norm"):
            ids = [r["doc_id"] for r in battery.outcomes if r["task"] == task and r["metric"] == metric]
            assert sorted(ids) == sorted(samples[task]), (task, metric)


def test_mean_of_outcomes_is_the_reported_score(scored):
    battery, scores, *_ = scored
    for s in scores:
        vals = [r["value"] for r in battery.outcomes if r["task"] == s.task and r["metric"] == s.metric]
        assert len(vals) == s.n_docs
        assert sum(vals) / len(vals) == pytest.approx(s.value, abs=1e-12), (s.task, s.metric)


def test_gold_loglik_and_accuracy_agree_with_stock_hflm(scored):
    from lm_eval.models.huggingface import HFLM

    battery, _, model, tok, samples = scored
    stock = HFLM(pretrained=model, tokenizer=tok, batch_size=4)
    by_key = {(r["task"], r["doc_id"], r["metric"]): r for r in battery.outcomes}
    for task in battery._leaves:
        name = task.config.task
        docs: dict[int, list] = {}
        for inst in task.instances:
            docs.setdefault(inst.doc_id, []).append(inst)
        for pos, insts in docs.items():
            insts.sort(key=lambda i: i.idx)
            gold = task.doc_to_target(insts[0].doc)
            with torch.inference_mode():
                lls = [ll for ll, _ in stock.loglikelihood(insts, disable_tqdm=True)]
            doc_id = samples[name][pos]
            row = by_key[(name, doc_id, "acc")]
            assert row["gold_loglik"] == pytest.approx(lls[gold], abs=1e-4)
            assert row["value"] == float(max(range(len(lls)), key=lls.__getitem__) == gold)
            assert not math.isnan(row["gold_loglik"])


def test_eval_stores_each_units_outcomes_beside_its_rows(tiny_suites, tmp_path):
    """Every unit of `mergebench eval` stores one outcome per document and metric; their mean per
    (unit, task, metric) is the stored value, and every method sees the same documents."""
    from mergebench.evaluation.runner import plan_eval, run_eval
    from mergebench.results import store

    results = tmp_path / "results"
    for method in ("linear", "task_arithmetic"):
        run_eval(plan_eval(method, "tiny", log=lambda m: None), results, progress=False, log=lambda m: None)
    with store.connect(results) as con:
        check = con.execute("""
            SELECT r.unit_id, r.task, r.metric, r.value, r.n_docs, avg(s.value) AS mean, count(*) AS docs
            FROM results r JOIN samples s USING (unit_id, run_id, task, metric)
            GROUP BY ALL""").df()
        units = con.execute("SELECT count(DISTINCT unit_id) FROM results").fetchone()[0]
        docs_per_method = con.execute("""
            SELECT r.method, list(DISTINCT s.task || ':' || s.doc_id ORDER BY s.task || ':' || s.doc_id) AS docs
            FROM samples s JOIN (SELECT DISTINCT unit_id, method FROM results WHERE role = 'merged') r USING (unit_id)
            GROUP BY r.method""").df()
    assert check.unit_id.nunique() == units and len(check) > 0
    assert (check.docs == check.n_docs).all()
    assert (check["mean"] - check["value"]).abs().max() < 1e-12
    a, b = docs_per_method.docs
    assert list(a) == list(b)
    assert store.check_store(results).problems == []

    from typer.testing import CliRunner

    from mergebench.cli import app
    from mergebench.results.compare import compare_methods

    table = compare_methods(results, "tiny", "linear", "task_arithmetic", n_boot=500)
    assert list(table.n) == [2, 3] and list(table.n_subsets) == [2, 1]
    assert (table.ci_low <= table.mean_diff).all() and (table.mean_diff <= table.ci_high).all()
    res = CliRunner().invoke(app, ["compare", "linear", "task_arithmetic", "--suite", "tiny", "--results", str(results)])
    assert res.exit_code == 0, res.output
    assert "subsets x docs" in res.output and f"{100 * table.mean_diff[0]:+.2f}" in res.output
    res = CliRunner().invoke(app, ["compare", "linear", "karcher", "--suite", "tiny", "--results", str(results)])
    assert res.exit_code == 2 and "no per-document outcomes of 'karcher'" in res.output
