"""`mergebench eval` end to end on tiny random checkpoints and real embedded task data:
planning, paired subsets, content-keyed caching, resume without loss or duplicates, summary."""


import pytest

from mergebench import store
from mergebench.runner import plan_eval, run_eval, summarize


def _rows(results):
    with store.connect(results) as con:
        return con.execute("SELECT * FROM results").df()


def test_plan_is_paired_across_methods_and_references_are_shared(tiny_suites):
    a = plan_eval("linear", "tiny", log=lambda m: None)
    b = plan_eval("ties", "tiny", log=lambda m: None)
    assert [u.members for u in a.merges] == [u.members for u in b.merges]  # same subsets
    assert [u.unit.unit_id for u in a.references] == [u.unit.unit_id for u in b.references]
    assert {u.unit.n for u in a.merges} == {2, 3}
    assert len(a.merges) == 2 + 1  # two of size 2, the single full set of size 3
    assert b.params["density"] == 0.5 and b.params["lambda"] == 0.5  # the suite's paper settings
    assert plan_eval("ties", "tiny", params={"lambda": "0.7"}, log=lambda m: None).params["lambda"] == "0.7"
    assert a.samples["mb_capitals"] == sorted(a.samples["mb_capitals"]) and len(a.samples["mb_capitals"]) == 5


def test_bad_parameters_fail_before_any_work(tiny_suites, tmp_path):
    from mergebench.methods import ParameterError

    with pytest.raises(ParameterError, match="'density' must be in"):
        plan_eval("ties", "tiny", params={"density": 3}, log=lambda m: None)


def test_run_resume_and_summary(tiny_suites, tmp_path, monkeypatch):
    from mergebench import runner

    results = tmp_path / "results"
    plan = plan_eval("linear", "tiny", log=lambda m: None)
    real = runner._run_unit
    calls = []

    def crash_after_three(*args, **kw):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(runner, "_run_unit", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        run_eval(plan, results, progress=False, log=lambda m: None)
    assert len(store.completed_units(results)) == 3
    monkeypatch.setattr(runner, "_run_unit", real)
    stats = run_eval(plan, results, progress=False, log=lambda m: None)
    assert stats["cached"] == 3 and stats["done"] == len(plan.units) - 3
    rows = _rows(results)
    assert set(rows["unit_id"]) == {u.unit.unit_id for u in plan.units}
    assert not rows.duplicated(["unit_id", "task", "metric"]).any()
    assert set(rows.loc[rows.metric == "acc", "n_docs"]) == {5}
    # a second method reuses every reference: only its merges run
    stats = run_eval(plan_eval("task_arithmetic", "tiny", log=lambda m: None), results, progress=False, log=lambda m: None)
    assert stats["done"] == 3 and stats["cached"] == 4
    table, loss = summarize(plan, results)
    assert list(table["n"]) == [2, 3] and list(table["n_units"]) == [2, 1]
    assert table["p_gt_base"].between(0, 1).all() and loss.empty
    # the summary's mean equals the mean of the stored per-task accuracies
    merged = rows[(rows.role == "merged") & (rows.metric == "acc") & (rows.method == "linear")]
    per_unit = merged.groupby("unit_id")["value"].mean()
    n2 = merged.drop_duplicates("unit_id").set_index("unit_id")["n"]
    assert table.loc[table.n == 2, "mean"].item() == pytest.approx(per_unit[n2 == 2].mean())
