"""A data-dependent and a per-task method through `mergebench eval` (run_eval) into the store:
the rows land, and the unit's provenance keeps the calibration record and the per-task map."""

from __future__ import annotations

import json

import mergebench.baselines.emr
import mergebench.baselines.fisher  # noqa: F401  (register before the entry points are reinstalled)
import pytest

from mergebench.evaluation.runner import plan_eval, run_eval
from mergebench.results import store


@pytest.mark.slow
def test_run_eval_stores_calibration_and_per_task_provenance(tiny_suites, tmp_path):
    results = tmp_path / "results"
    for method, params in (("fisher_merging", {"fisher_samples": 2}), ("emr_merging", {})):
        plan = plan_eval(method, "tiny", params=params, log=lambda m: None)
        plan.references = []  # the merges are what is under test
        plan.merges = plan.merges[:1]
        stats = run_eval(plan, results, progress=False, log=lambda m: None)
        assert stats["done"] == 1
        (wu,) = plan.merges
        records = store.read_unit_provenance(wu.unit, results)
        prov = json.loads(records[-1]["extra_json"])  # keys beyond the provenance schema's columns
        assert records[-1]["merge_wall_s"] > 0
        if method == "fisher_merging":
            assert prov["calibration"]["data"]["split"] == "validation"
            assert prov["calibration"]["documents"] == [2] * len(wu.members) and prov["calibration_s"] > 0
        else:
            assert set(prov["per_task"]) == {t.name for t in wu.tasks}
