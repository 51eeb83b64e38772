"""Thread counts (flag, environment, cores) and the ETA/estimate rates of mergebench.evaluation.pace."""

from __future__ import annotations

import pytest
import torch

from mergebench.results import store
from mergebench.evaluation.pace import ASSUMED_SECONDS_PER_DOC, ASSUMED_SECONDS_PER_MERGE, Pace, Rates, measured_rates
from mergebench.threads import ENV, ThreadsError, apply_threads, available_cores, resolve_threads


def test_threads_come_from_the_flag_then_the_environment_then_the_cores(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert resolve_threads(None) == available_cores() >= 1
    assert resolve_threads(None, workers=available_cores() * 4) == 1  # never below one
    monkeypatch.setenv(ENV, "3")
    assert resolve_threads(None) == 3 and resolve_threads(5) == 5
    for bad in ("0", "-2", "two", "1.5"):
        monkeypatch.setenv(ENV, bad)
        with pytest.raises(ThreadsError, match=f"\\${ENV} must be a positive whole number"):
            resolve_threads(None)
    with pytest.raises(ThreadsError, match="--threads must be a positive whole number, got 0"):
        resolve_threads(0)
    before = torch.get_num_threads()
    try:
        assert apply_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def _unit(i, role="merged", method="linear"):
    return store.Unit(suite="s", role=role, subset=(f"e{i}", "x"), method=method if role == "merged" else None,
                      method_version="1" if role == "merged" else None, profile="p", pool="tiny")


def _write(results, i, *, docs, eval_s, merge_s=1.0, unit_s=None, scorer="shared", threads=None, cpu=None,
           method="linear", calibration_s=None):
    env = store.collect_environment("cpu")
    prov = {**env, "merge_wall_s": merge_s, "eval_wall_s": eval_s, "unit_wall_s": unit_s or eval_s + merge_s + 2.0,
            "scorer": scorer, "threads": threads or torch.get_num_threads(), "eval_docs": docs}
    if cpu:
        prov["cpu_model"] = cpu
    if calibration_s is not None:
        prov["calibration_s"] = calibration_s
    rows = [{"task": "t", "metric": "acc", "value": 0.5, "n_docs": docs}]
    store.write_unit(_unit(i, method=method), rows, run_id=f"r{i}", results_dir=results, provenance=prov)


def test_rates_prefer_this_cpu_and_scorer_and_include_the_per_unit_overhead(tmp_path):
    results = tmp_path / "results"
    assert measured_rates([results], "tiny").seconds_per_doc == ASSUMED_SECONDS_PER_DOC  # nothing stored yet
    _write(results, 0, docs=100, eval_s=10.0, merge_s=2.0, unit_s=15.0)  # this CPU: 0.1 s/doc, 3 s overhead
    _write(results, 1, docs=100, eval_s=50.0, cpu="another CPU")  # slower machine: ignored while ours exist
    _write(results, 2, docs=100, eval_s=90.0, scorer="hflm")  # other scorer: never mixed in
    r = measured_rates([results], "tiny")
    assert r.seconds_per_doc == pytest.approx(0.1) and r.seconds_per_merge == pytest.approx(2.0)
    assert r.merge_seconds("linear", 2) == pytest.approx(2.0)
    assert r.seconds_per_unit == pytest.approx(3.0) and "on this CPU" in r.basis and r.units_measured == 1
    assert measured_rates([results], "tiny", scorer="hflm").seconds_per_doc == pytest.approx(0.9)
    other_threads = measured_rates([results], "tiny", threads=torch.get_num_threads() + 7)
    assert other_threads.seconds_per_doc == pytest.approx(0.3)  # any CPU of the kind: (10 + 50) / 200
    assert measured_rates([results], "another-pool").basis.startswith("assumed")


def test_pace_switches_to_the_runs_own_rates_after_one_unit():
    pace = Pace(Rates(0.5, 10.0, "assumed", seconds_per_unit=1.0))
    assert pace.unit_seconds(100, merged=True) == pytest.approx(50 + 10 + 1)
    pace.observe(docs=200, eval_seconds=20.0, unit_seconds=26.0, merge_seconds=4.0, method="ties", n=2)
    assert pace.seconds_per_doc == pytest.approx(0.1)
    assert pace.merge_seconds("ties", 8) == pytest.approx(16.0)  # 2 s per merged expert, times 8
    assert pace.merge_seconds("linear", 4) == pytest.approx(8.0)  # no linear yet: the run's other merges
    assert pace.unit_seconds(100, merged=False) == pytest.approx(10 + 2)  # overhead 26 - 20 - 4


def test_stored_merge_rates_are_per_expert_and_per_method(tmp_path):
    results = tmp_path / "results"
    _write(results, 0, docs=10, eval_s=1.0, merge_s=2.0)  # linear, n = 2: 1 s per expert
    r = measured_rates([results], "tiny")
    assert r.merge_seconds("linear", 8) == pytest.approx(8.0) and r.merge_seconds("ties", 4) == pytest.approx(4.0)
    assert Rates(0.1, 7.0, "assumed").merge_seconds("ties", 4) == 7.0  # nothing measured: the assumed merge


def test_a_data_dependent_merge_never_sets_the_rate_of_data_free_methods(tmp_path):
    results = tmp_path / "results"
    _write(results, 0, docs=10, eval_s=1.0, merge_s=300.0, method="regmean", calibration_s=290.0)
    r = measured_rates([results], "tiny")
    assert r.merge_seconds("regmean", 2) == pytest.approx(300.0) and r.timed("regmean")
    assert not r.timed("linear") and r.merge_seconds("linear", 2) == ASSUMED_SECONDS_PER_MERGE
    _write(results, 1, docs=10, eval_s=1.0, merge_s=2.0)  # linear, n = 2
    r = measured_rates([results], "tiny")
    assert r.merge_seconds("ties", 4) == pytest.approx(4.0) and r.seconds_per_merge == pytest.approx(2.0)
