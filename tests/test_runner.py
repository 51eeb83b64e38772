"""`mergebench eval` end to end on tiny random checkpoints and real embedded task data:
planning, paired subsets, content-keyed caching, resume without loss or duplicates, summary."""


import pytest

from mergebench.results import store
from mergebench.evaluation.runner import plan_eval, run_eval, summarize


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


def test_a_two_model_method_skips_the_larger_subsets_and_says_so(tiny_suites):
    said = []
    slerp = plan_eval("slerp", "tiny", log=said.append)
    linear = plan_eval("linear", "tiny", log=lambda m: None)
    assert [u.members for u in slerp.merges] == [u.members for u in linear.merges if u.unit.n == 2]
    assert [u.unit.unit_id for u in slerp.references] == [u.unit.unit_id for u in linear.references]
    assert any("slerp merges at most 2 experts" in m and "1 subset(s) of n = 3 are skipped" in m for m in said)


def test_bad_parameters_fail_before_any_work(tiny_suites, tmp_path):
    from mergebench.methods import ParameterError

    with pytest.raises(ParameterError, match="'density' must be in"):
        plan_eval("ties", "tiny", params={"density": 3}, log=lambda m: None)


def test_run_resume_and_summary(tiny_suites, tmp_path, monkeypatch):
    from mergebench.evaluation import runner

    results = tmp_path / "results"
    plan = plan_eval("linear", "tiny", log=lambda m: None)
    real = runner.run_unit
    calls = []

    def crash_after_three(*args, **kw):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(runner, "run_unit", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        run_eval(plan, results, progress=False, log=lambda m: None)
    assert len(store.completed_units(results)) == 3
    monkeypatch.setattr(runner, "run_unit", real)
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


def _weights(folder) -> dict:
    """float64 numpy copies of a checkpoint's floating-point tensors (independent of mergebench's readers)."""
    import numpy as np
    from safetensors.numpy import load_file

    return {k: v.astype(np.float64) for f in sorted(folder.glob("*.safetensors"))
            for k, v in load_file(str(f)).items() if v.dtype.kind == "f"}


def test_task_vector_norms_are_recorded_and_backfilled(tiny_suites, tiny_pool, tmp_path):
    """Every unit's provenance holds ||theta - theta_base||_2 (seed 001 Fig. 4), equal to a numpy
    float64 computation; a store written before the column existed reads as NULL and is backfilled."""
    import numpy as np
    import pyarrow.parquet as pq

    from mergebench import report
    from mergebench.evaluation import runner

    base_dir, expert_dirs = tiny_pool
    base = _weights(base_dir)
    experts = {f"e{i}": _weights(p) for i, p in enumerate(expert_dirs)}

    def norm(theta):
        return float(np.sqrt(sum(np.sum((theta[k] - base[k]) ** 2) for k in base)))

    results = tmp_path / "results"
    plan = plan_eval("linear", "tiny", log=lambda m: None)
    run_eval(plan, results, progress=False, log=lambda m: None)
    expected = {}
    for wu in plan.units:
        if wu.role == "merged":  # linear with default weights: the plain mean of the members
            theta = {k: np.mean([experts[m][k] for m in wu.members], axis=0) for k in base}
        else:
            theta = base if wu.role == "base" else experts[wu.members[0]]
        expected[wu.unit.unit_id] = norm(theta)
    stored = {r["unit_id"]: r["task_vector_norm"] for wu in plan.units
              for r in store.read_unit_provenance(wu.unit, results)}
    assert stored == pytest.approx(expected, rel=1e-5, abs=1e-9)
    assert stored[plan.references[0].unit.unit_id] == 0.0 and min(expected.values()) == 0.0
    with report.connect(results) as con:
        curve = report.task_vector_norms(con, report.Filters(suite="tiny"))
    merged = curve[curve.role == "merged"].set_index("n")
    by_n = {n: [expected[u.unit.unit_id] for u in plan.merges if u.unit.n == n] for n in (2, 3)}
    assert merged.loc[2, "mean"] == pytest.approx(np.mean(by_n[2]), rel=1e-5)
    assert merged.loc[2, "std"] == pytest.approx(np.std(by_n[2], ddof=1), rel=1e-4)
    assert list(merged["n_units"]) == [2, 1]

    # an older store: provenance files without the column
    files = sorted((results / "provenance").rglob("prov-*.parquet"))
    for f in files:
        pq.write_table(pq.read_table(f).drop_columns(["task_vector_norm"]), f)
    with store.connect(results) as con:
        assert con.execute("SELECT count(task_vector_norm) FROM provenance").fetchone()[0] == 0
    assert runner.backfill_task_vector_norms(plan, results, log=lambda m: None) == len(plan.units)
    again = {r["unit_id"]: r["task_vector_norm"] for wu in plan.units
             for r in store.read_unit_provenance(wu.unit, results)}
    assert again == pytest.approx(stored, rel=1e-6, abs=1e-12)
    assert pq.read_schema(files[0]).equals(store.PROVENANCE_SCHEMA, check_metadata=False)
    assert runner.backfill_task_vector_norms(plan, results, log=lambda m: None) == 0  # nothing left to do


def test_progress_bar_run_hides_lm_eval_bars(tiny_suites, tmp_path, capfd):
    """With mergebench's own progress bar, lm-eval's per-task and per-request tqdm bars and the
    datasets split bars are off (TQDM_DISABLE is read only at import, so it cannot do this), and
    lm-eval's module is left as it was."""
    import lm_eval.api.task
    from tqdm import tqdm

    plan = plan_eval("linear", "tiny", log=lambda m: None)
    plan.merges = plan.merges[:1]
    plan.references = plan.references[:1]
    run_eval(plan, tmp_path / "results", progress=True, log=lambda m: None)
    out, err = capfd.readouterr()
    for bar in ("Running loglikelihood requests", "Tokenizing inputs", "it/s]", "examples/s]"):
        assert bar not in out + err, bar
    assert lm_eval.api.task.tqdm is tqdm
    run_eval(plan_eval("ties", "tiny", log=lambda m: None), tmp_path / "quiet_off", progress=False,
             log=lambda m: None)
    assert "Running loglikelihood requests" in "".join(capfd.readouterr())  # the bars are lm-eval's own


def test_units_record_scoring_cost_and_log_progress_with_an_eta(tiny_suites, tmp_path):
    """Every unit's provenance says how it was scored and what it cost; each finished unit logs one
    line with the run's ETA (also when the output is a log file, not a terminal)."""
    results = tmp_path / "results"
    plan = plan_eval("linear", "tiny", log=lambda m: None)
    lines = []
    run_eval(plan, results, progress=False, log=lines.append, threads=1)
    with store.connect(results) as con:
        prov = con.execute("SELECT * FROM provenance WHERE unit_id IS NOT NULL").df()
    assert len(prov) == len(plan.units)
    by_unit = {u.unit.unit_id: u for u in plan.units}
    for r in prov.itertuples():
        wu = by_unit[r.unit_id]
        assert r.scorer == "shared" and r.threads == 1 and r.eval_docs == plan.n_docs(wu.tasks)
        assert r.eval_requests >= r.eval_docs and r.eval_tokens > 0
        assert r.eval_docs_per_s == pytest.approx(r.eval_docs / r.eval_wall_s)
        assert r.unit_wall_s >= r.eval_wall_s + (r.merge_wall_s if wu.role == "merged" else 0.0)
    assert lines[0].startswith(f"{len(plan.units)} unit(s) to run, 0 stored; expected ~")
    progress = [line for line in lines if line.startswith("[")]
    assert len(progress) == len(plan.units) and all(" ETA " in line for line in progress)
    assert progress[-1].endswith("ETA done") and "doc/s" in progress[0]


def test_a_reference_model_with_nan_weights_is_refused_naming_the_tensor(tiny_suites, tmp_path):
    """Scoring a NaN model would store chance-level scores without a word: the unit fails instead."""
    import torch
    from safetensors.torch import load_file, save_file

    from mergebench.engine import NonFiniteInputError

    plan = plan_eval("linear", "tiny", log=lambda m: None)
    ref = next(u for u in plan.references if u.role == "expert")
    folder = tmp_path / "nan-expert"
    import shutil

    shutil.copytree(plan.paths[ref.members[0]], folder)
    weights = next(folder.glob("*.safetensors"))
    state = load_file(weights)
    name = next(k for k, v in state.items() if v.is_floating_point() and "embed" not in k)
    state[name] = state[name].clone().index_fill_(0, torch.tensor([0]), float("nan"))
    save_file(state, weights, metadata={"format": "pt"})
    plan.paths[ref.members[0]] = str(folder)
    with pytest.raises(NonFiniteInputError, match=f"tensor {name!r} holds NaN/inf"):
        run_eval(plan, tmp_path / "results", progress=False, log=lambda m: None)
