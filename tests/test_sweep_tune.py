"""`mergebench sweep --tune`: trials on the validation split only, the best setting per method on
test, the tuning record in provenance, and the leaderboard's `tuned` marker."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from mergebench.evaluation import battery as evaluate, runner
from mergebench.results import store
from mergebench.methods import ParameterError
from mergebench.config.sampling import doc_sample
from mergebench.sweep.grid import trial_points
from mergebench.sweep.tune import TUNING_DIR, plan_tuning, tune, tuned_variants
from mergebench.zoo.tasks import task_info

QUIET = dict(log=lambda m: None)


def write_small_suite(root, name="tiny_tune", split="test"):
    suite = {
        "name": name, "version": 1, "default_profile": "embedded",
        "profiles": {"embedded": {
            "pools": ["tiny"], "tasks": [{"name": t, "metric": "acc"} for t in ("mb_capitals", "mb_sentiment")],
            "sampler": {"mode": "uniform", "sizes": [2], "subsets_per_size": 2, "seed": 0},
            "docs": {"budget": 3, "seed": 0, "split": split}, "eval": {"dtype": "float32", "batch_size": 8},
            "references": {"base": True, "experts": False},
        }},
    }
    (root / f"{name}.yaml").write_text(json.dumps(suite))
    return name


GRID = [{"lambda": v} for v in ("0.25", "0.5", "0.75", "1.0")]


def test_tuning_reads_only_validation_documents_then_tests_only_the_best(tiny_suites, tmp_path, monkeypatch):
    name = write_small_suite(tiny_suites)
    calls: list[dict] = []  # every evaluation, in order: the split lm-eval actually reads, documents, settings
    real_score, real_unit = evaluate.Battery.score, runner.run_unit
    current: dict = {}

    def run_unit(plan, wu, **kw):
        current.update(params=dict(wu.unit.params), role=wu.role, unit_id=wu.unit.unit_id)
        return real_unit(plan, wu, **kw)

    def score(self, model, tok, **kw):  # every model a battery scores: its tasks' split and documents
        for t in self.tasks:
            data = self.task_manager.task_index[t].cfg["dataset_kwargs"]["data_files"]
            calls.append({"task": t, "split": {Path(f).stem for f in data.values()}, "docs": list(self.samples[t]),
                          **current})
        return real_score(self, model, tok, **kw)

    monkeypatch.setattr(runner, "run_unit", run_unit)
    monkeypatch.setattr(evaluate.Battery, "score", score)
    results = tmp_path / "results"
    out = tune(name, {"task_arithmetic": GRID, "linear": [{}]}, trials=3, results_dir=results, progress=False,
               **QUIET)

    # 1. tuning read validation documents only, and every one of them came before any test document
    splits = [next(iter(c["split"])) for c in calls]
    assert all(len(c["split"]) == 1 for c in calls)
    n_val = splits.index("test")
    assert set(splits[:n_val]) == {"validation"} and set(splits[n_val:]) == {"test"}
    assert n_val == 3 * 2 * 2  # 3 trials of task_arithmetic x 2 subsets x 2 tasks; linear has nothing to tune
    for c in calls[:n_val]:  # exactly the seeded validation sample of each task
        n = task_info()[c["task"]]["counts"]["validation"]
        assert c["docs"] == list(doc_sample(c["task"], n, 3, 0, "validation").indices)
    # 2. the trials are the seeded subset of the grid, and the winner is the best on validation
    tried = trial_points(GRID, 3, method="task_arithmetic", seed=0)
    ta = out.results["task_arithmetic"]
    assert ta.trials == tried and ta.grid_size == 4 and "linear" not in out.results
    val = store.sql("SELECT unit_id, params_json, avg(value) AS s FROM results WHERE metric = 'acc' "
                    "AND method = 'task_arithmetic' GROUP BY ALL", results / TUNING_DIR)
    per_lambda = val.groupby(val["params_json"].map(lambda p: json.loads(p)["lambda"]))["s"].mean()
    assert len(per_lambda) == 3 and ta.best_score == pytest.approx(per_lambda.max())
    assert float(ta.best["lambda"]) == per_lambda[per_lambda == per_lambda.max()].index.min()  # earliest on ties
    # 3. on test: only the chosen setting (plus the base reference), nothing from the tuning phase
    test_calls = pd.DataFrame(calls[n_val:])
    merged = test_calls[test_calls["role"] == "merged"]
    assert {p["lambda"] for p in merged["params"] if "lambda" in p} == {float(ta.best["lambda"])}
    assert set(test_calls["role"]) == {"base", "merged"} and merged["unit_id"].nunique() == 4  # TA + linear
    main = store.sql("SELECT * FROM results", results)
    tuning = store.sql("SELECT * FROM results", results / TUNING_DIR)
    assert set(main["unit_id"]).isdisjoint(tuning["unit_id"]) and set(tuning["role"]) == {"merged"}
    # 4. the tuned rows carry the decision and its budget; the reference is not marked
    prov = store.sql("SELECT unit_id, method, extra_json FROM provenance", results)
    rec = {r.unit_id: json.loads(r.extra_json) for r in prov.itertuples()}
    marked = {u for u, e in rec.items() if "tuning" in e}
    assert marked == set(main.loc[main.method == "task_arithmetic", "unit_id"]) and len(marked) == 2
    t = next(e["tuning"] for e in rec.values() if e.get("tuning", {}).get("selected") == ta.best)
    assert (t["trials"], t["grid_size"], t["validation_units"], t["validation_docs"]) == (3, 4, 6, 3 * 2 * (3 + 3))
    assert t["split"] == "validation" and t["validation_docs_per_task"] == {"mb_capitals": 3, "mb_sentiment": 3}
    assert [c["point"] for c in t["candidates"]] == tried and all(e["sweep"]["split"] == "test" for e in rec.values())
    with store.connect(results) as con:
        marks = tuned_variants(con).set_index("method")["tuned"]
    assert marks["task_arithmetic"] == "tuned (3/4 trials, 36 val docs)" and marks["linear"] == "default"

    # 5. a second invocation recomputes nothing and records its (same) decision again
    calls.clear()
    again = tune(name, {"task_arithmetic": GRID, "linear": [{}]}, trials=3, results_dir=results, progress=False,
                 **QUIET)
    assert calls == [] and again.results["task_arithmetic"].best == ta.best
    assert again.validation_stats.cached == 6 and again.test_stats.cached == 5
    runs = store.sql("SELECT count(DISTINCT run_id) AS n FROM provenance WHERE extra_json LIKE '%\"tuning\"%'",
                     results)["n"].item()
    assert runs == 2


def test_tuning_needs_a_held_out_test_split(tiny_suites):
    name = write_small_suite(tiny_suites, "tiny_val", split="validation")
    with pytest.raises(ParameterError, match="already evaluates the validation split"):
        plan_tuning(name, {"task_arithmetic": GRID}, trials=2, **QUIET)
    ok = write_small_suite(tiny_suites, "tiny_ok")
    with pytest.raises(ParameterError, match="--trials must be >= 1"):
        plan_tuning(ok, {"task_arithmetic": GRID}, trials=0, **QUIET)
    with pytest.raises(ParameterError, match="--tune has nothing to choose"):
        plan_tuning(ok, {"task_arithmetic": GRID[:1], "linear": [{}]}, trials=2, **QUIET)
    tp = plan_tuning(ok, {"task_arithmetic": GRID, "linear": [{}]}, trials=2, **QUIET)
    assert tp.grid_sizes == {"task_arithmetic": 4, "linear": 1} and tp.untuned == {"linear": [{}]}
    assert tp.validation.split == "validation" and len(tp.validation.jobs) == 2 * 2  # 2 trials x 2 subsets


def test_leaderboard_ranking_shows_the_tuned_marker(tmp_path, monkeypatch):
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    results, run = tmp_path / "results", "20260102T000000Z-tuned0"
    common = dict(suite="tiny", suite_version="1", profile="embedded", pool="tiny", base_model="b", seed=0,
                  doc_index_hash="h")

    def rows(v):
        return [{"task": t, "metric": "acc", "value": v, "n_docs": 3} for t in ("mb_capitals", "mb_sentiment")]

    store.write_unit(store.Unit(role="base", subset=("b",), **common), rows(0.3), run_id=run, results_dir=results)
    record = {"tuned": True, "trials": 3, "grid_size": 4, "validation_docs": 36}
    for i, subset in enumerate([("e0", "e1"), ("e0", "e2"), ("e1", "e2")]):
        # ties' setting was chosen by tuning, task_arithmetic's was given
        for method, v, prov in (("ties", 0.5, {"tuning": record}), ("task_arithmetic", 0.4, {})):
            u = store.Unit(role="merged", subset=subset, method=method, method_version="1.0", params={"lambda": 1.0},
                           **common)
            store.write_unit(u, rows(v + 0.01 * i), run_id=run, results_dir=results, provenance=prov)
    monkeypatch.setenv("MERGEBENCH_RESULTS", str(results))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "leaderboard" / "app.py"), default_timeout=60)
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    ranked = at.dataframe[0].value
    cols = list(ranked.columns)
    assert "tuned" in cols and cols.index("tuned") > cols.index("score")  # a marker after the numbers
    marks = ranked.set_index("method")["tuned"]
    assert marks["ties"] == "tuned (3/4 trials, 36 val docs)" and marks["task_arithmetic"] == "default"
