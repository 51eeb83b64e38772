"""The main job on the real embedded pool (slow: materializes SmolLM2-135M and 13 experts).

Runs `mergebench eval --method karcher --suite inthewild --quick` as a user would, reusing the
reference results committed in results/ (keyed by content), and re-checks one committed
reference by evaluating it again from scratch.
"""

import shutil
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from mergebench.results import store
from mergebench.cli import app
from mergebench.evaluation.runner import plan_eval, run_eval

pytestmark = pytest.mark.slow
REPO_RESULTS = Path(__file__).parents[1] / "results"


def _quiet(_msg):
    pass


def test_quick_eval_end_to_end_reuses_committed_references(tmp_path):
    results = tmp_path / "results"
    if (REPO_RESULTS / "runs").is_dir():
        shutil.copytree(REPO_RESULTS / "runs", results / "runs")
    res = CliRunner().invoke(
        app, ["eval", "--method", "karcher", "--suite", "inthewild", "--quick", "--results", str(results), "--no-progress"]
    )
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "Embedded offline profile" in text or "CI-sized embedded profile" in text  # deviations are printed
    assert "P(> base)" in text
    plan = plan_eval("karcher", "inthewild", quick=True, materialize=False, log=_quiet)
    assert "0 unit(s) evaluated" not in text
    assert f"{len(plan.references)} reused" in text, "the committed references were not reused"
    with store.connect(results) as con:
        # (results/ also holds karcher's embedded-profile units: only this profile's merges are new here)
        rows = con.execute("SELECT * FROM results WHERE method = 'karcher' AND profile = ?", [plan.profile.name]).df()
    assert set(rows["unit_id"]) == {u.unit.unit_id for u in plan.merges}
    assert (rows["value"].between(0, 1)).all()


def test_a_committed_reference_reproduces(tmp_path):
    plan = plan_eval("karcher", "inthewild", quick=True, log=_quiet)
    base = plan.references[0]
    assert base.role == "base"
    committed = store.sql(f"SELECT task, metric, value FROM results WHERE unit_id = '{base.unit.unit_id}'", REPO_RESULTS)
    assert len(committed), "no committed reference for the quick profile's base model"
    plan.references, plan.merges = [base], []
    run_eval(plan, tmp_path / "fresh", progress=False, log=_quiet)
    fresh = store.sql("SELECT task, metric, value FROM results", tmp_path / "fresh")
    both = committed.merge(fresh, on=["task", "metric"], suffixes=("_committed", "_fresh"))
    assert len(both) == len(committed)
    pd.testing.assert_series_equal(both["value_committed"], both["value_fresh"], check_names=False, atol=1e-9, rtol=0)
