"""Seed 004 Tables 3-5 over stored runs (`mergebench stats`): ANOVA of merging loss by task vs
method, Pearson of pairwise diagnostics and of MDS against merging loss. Synthetic data with
planted effects (checked against float64 formulas written here), then a real tiny-pool run."""

import json

import numpy as np
import pandas as pd
import pytest

from mergebench.diagnostics.failure import failure_statistics, pair_table, task_table


def _f_oneway(values, groups):
    """Textbook one-way ANOVA F (between-group over within-group mean squares), float64."""
    v = np.asarray(values, float)
    g = np.asarray(groups)
    labels = sorted(set(g))
    grand = v.mean()
    ssb = sum((g == lab).sum() * (v[g == lab].mean() - grand) ** 2 for lab in labels)
    ssw = sum(((v[g == lab] - v[g == lab].mean()) ** 2).sum() for lab in labels)
    return (ssb / (len(labels) - 1)) / (ssw / (len(v) - len(labels)))


def _pearson_r(x, y):
    x = np.asarray(x, float) - np.mean(x)
    y = np.asarray(y, float) - np.mean(y)
    return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))


def _synthetic(seed=0):
    """Six experts (one task each), every pair and the merge of all six, three methods. The loss
    depends on the task (planted), not on the method; a pair's HiddenSim predicts its loss."""
    rng = np.random.default_rng(seed)
    experts = [f"e{i}" for i in range(6)]
    task_of = {e: f"t{i}" for i, e in enumerate(experts)}
    task_effect = {f"t{i}": -5.0 * i for i in range(6)}
    sim = {}
    rows, diag = [], []
    for i in range(6):
        for j in range(i + 1, 6):
            s = rng.uniform(0.1, 1.0)
            sim[(experts[i], experts[j])] = s
            diag.append({"metric": "hidden_sim", "model": experts[j], "model_b": experts[i], "value": s, "task": None})
            diag.append({"metric": "sign_change_ratio", "model": experts[i], "model_b": experts[j],
                         "value": rng.uniform(0.3, 0.5), "task": None})
    for m_i, method in enumerate(["linear", "ties", "karcher"]):
        for (a, b), s in sim.items():
            uid = f"{method}-{a}-{b}"
            for e in (a, b):
                loss = task_effect[task_of[e]] + 20 * s + rng.normal(0, 0.5)
                rows.append({"unit_id": uid, "method": method, "n": 2, "task": task_of[e], "expert": e,
                             "merging_loss_pct": loss})
        for e in experts:
            rows.append({"unit_id": f"{method}-all", "method": method, "n": 6, "task": task_of[e], "expert": e,
                         "merging_loss_pct": 2 * task_effect[task_of[e]] + m_i + rng.normal(0, 0.5)})
    for i, e in enumerate(experts):  # MDS grows with the task's planted difficulty
        diag.append({"metric": "mds", "model": e, "model_b": None, "value": 1.0 + 0.5 * i + rng.normal(0, 0.05),
                     "task": task_of[e]})
    return pd.DataFrame(rows), pd.DataFrame(diag)


def test_anova_finds_the_planted_task_effect_and_matches_the_textbook_f():
    losses, diag = _synthetic()
    st = failure_statistics(losses, diag)
    assert st.anova["task"].p < 1e-6 and st.anova["method"].p > 0.05
    for factor in ("task", "method"):
        assert st.anova[factor].f == pytest.approx(_f_oneway(losses["merging_loss_pct"], losses[factor]), rel=1e-10)
    assert st.anova["task"].n_groups == 6 and st.anova["method"].n == len(losses)


def test_pair_table_averages_the_pair_tasks_and_finds_diagnostics_in_either_order():
    losses, diag = _synthetic()
    pairs = pair_table(losses, diag)
    assert len(pairs) == 3 * 15  # every method x every pair; the all-six merges are left out
    row = pairs[(pairs.method == "ties") & (pairs.pair == "e1|e4")].iloc[0]
    own = losses[losses.unit_id == "ties-e1-e4"]["merging_loss_pct"]
    assert row.merging_loss_pct == pytest.approx(own.mean())
    stored = diag[(diag.metric == "hidden_sim") & (diag.model == "e4") & (diag.model_b == "e1")].value.item()
    assert row.hidden_sim == pytest.approx(stored)
    assert np.isnan(row.cosine)  # not diagnosed: NaN, not a made-up value


def test_pearson_per_method_and_pooled_against_the_formula():
    losses, diag = _synthetic()
    st = failure_statistics(losses, diag)
    assert set(st.pair_pearson) == {"linear", "ties", "karcher", "all methods"}
    pairs = st.pairs
    for scope, grp in [*pairs.groupby("method"), ("all methods", pairs)]:
        hs = st.pair_pearson[scope]["hidden_sim"]
        assert hs.n == len(grp)
        assert hs.r == pytest.approx(_pearson_r(grp.hidden_sim, grp.merging_loss_pct), rel=1e-10)
    assert st.pair_pearson["all methods"]["hidden_sim"].p < 1e-3  # planted
    assert st.pair_pearson["all methods"]["sign_change_ratio"].p > 0.01  # noise
    assert "cosine" not in st.pair_pearson["ties"]  # nothing stored for it


def test_mds_is_correlated_with_the_best_loss_of_the_largest_merge():
    losses, diag = _synthetic()
    tasks = task_table(losses, diag)
    assert list(tasks.n.unique()) == [6] and len(tasks) == 6
    top = losses[losses.n == 6]
    best = top.groupby("task")["merging_loss_pct"].max()
    assert tasks.set_index("task")["best_merging_loss_pct"].to_dict() == pytest.approx(best.to_dict())
    st = failure_statistics(losses, diag)
    assert st.mds_pearson.r == pytest.approx(_pearson_r(tasks.mds, tasks.best_merging_loss_pct))
    assert st.mds_pearson.r < -0.9  # higher MDS, worse (more negative) loss, as seed 004 claims


def test_missing_pairs_or_diagnostics_are_notes_not_numbers():
    losses, diag = _synthetic()
    st = failure_statistics(losses[losses.n == 6], diag)
    assert st.pair_pearson == {} and any("no pairwise merges" in n for n in st.notes)
    st = failure_statistics(losses, diag.iloc[0:0])
    assert any("mergebench diagnose" in n for n in st.notes) and st.mds_pearson is None


@pytest.fixture()
def tiny_glue(tiny_suites):
    """A glue-style suite on the tiny pool: pairs and the merge of all, scored on members' tasks."""
    suite = json.loads((tiny_suites / "tiny.yaml").read_text())
    prof = suite["profiles"]["embedded"]
    prof.update(eval_scope="members", report=["merging_loss", "per_task"],
                sampler={"mode": "uniform", "sizes": [2, "all"], "subsets_per_size": 3, "seed": 0})
    suite["name"] = "tinyglue"
    (tiny_suites / "tinyglue.yaml").write_text(json.dumps(suite))
    return tiny_suites


def test_stats_command_on_a_real_tiny_run(tiny_glue, tmp_path):
    from typer.testing import CliRunner

    from mergebench.results import store
    from mergebench.cli import app
    from mergebench.evaluation.runner import plan_eval, run_eval

    results = tmp_path / "results"
    cli = CliRunner()
    res = cli.invoke(app, ["stats", "--suite", "tinyglue", "--results", str(results)])
    assert res.exit_code != 0 and "mergebench eval" in res.output  # nothing to analyse yet
    for method in ("linear", "task_arithmetic"):
        run_eval(plan_eval(method, "tinyglue", log=lambda m: None), results, progress=False, log=lambda m: None)
    res = cli.invoke(app, ["stats", "--suite", "tinyglue", "--results", str(results), "--no-write"])
    assert res.exit_code == 0, res.output
    assert "mergebench diagnose --pool tiny --experts e0,e1,e2" in res.output  # no diagnostics yet
    res = cli.invoke(app, ["diagnose", "--pool", "tiny", "--kinds", "weights,representations", "--k", "2",
                           "--results", str(results)])
    assert res.exit_code == 0, res.output
    res = cli.invoke(app, ["stats", "--suite", "tinyglue", "--results", str(results)])
    assert res.exit_code == 0, res.output
    assert "ANOVA" in res.output and "statistics unit(s) written" in res.output

    # independent recomputation from the stored rows
    rows = store.sql("SELECT * FROM results WHERE suite = 'tinyglue'", results)
    sel = rows[rows.metric == "acc"]
    experts = sel[sel.role == "expert"].assign(expert=lambda d: d.subset.map(lambda s: s[0]))
    own = experts.set_index(["expert", "task"])["value"]
    merged = sel[sel.role == "merged"]
    task_expert = {"mb_capitals": "e0", "mb_sentiment": "e1", "mb_elements": "e2"}
    loss = []
    for r in merged.itertuples():
        e = task_expert[r.task]
        if e in r.subset:
            loss.append({"task": r.task, "method": r.method, "unit_id": r.unit_id,
                         "loss": (r.value / own[(e, r.task)] - 1) * 100})
    loss = pd.DataFrame(loss)
    assert len(loss) == 2 * (3 * 2 + 3)  # per method: 3 pairs x 2 tasks + the merge of all x 3 tasks
    diag = store.sql("SELECT * FROM diagnostics WHERE kind = 'stats'", results)
    by_task = diag[(diag.model == "by_task") & (diag.metric == "anova_f")].value.item()
    assert by_task == pytest.approx(_f_oneway(loss["loss"], loss["task"]), rel=1e-9)
    assert set(diag.method.dropna()) == {"linear", "task_arithmetic"}
    hs = store.sql("SELECT * FROM diagnostics WHERE metric = 'hidden_sim'", results)
    sim = {frozenset((a, b)): v for a, b, v in zip(hs.model, hs.model_b, hs.value)}
    pair_loss = loss[loss.unit_id.isin(merged[merged.n == 2].unit_id)].groupby(["method", "unit_id"])["loss"].mean()
    pair_members = merged.drop_duplicates("unit_id").set_index("unit_id")["subset"]
    x = [sim[frozenset(pair_members[u])] for _, u in pair_loss.index]
    r = diag[(diag.model == "hidden_sim") & (diag.metric == "pearson_r") & diag.method.isna()].value
    assert r.item() == pytest.approx(_pearson_r(x, pair_loss.to_numpy()), rel=1e-9)
    again = cli.invoke(app, ["stats", "--suite", "tinyglue", "--results", str(results)])
    assert "0 statistics unit(s) written" in again.output  # same inputs: same units, not rewritten
