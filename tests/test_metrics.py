"""mergebench.results.metrics against hand-computed cases, float64 references and the seeds' own numbers."""

from __future__ import annotations

import math
import sys
from itertools import product
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mergebench.results import metrics, store
from mergebench.results.store import Unit

PAPER = Path(__file__).resolve().parents[1] / "results" / "paper"


# --------------------------------------------------------------------------- normalization


def test_normalize_hand_cases():
    # The leaderboard documentation's GPQA example: raw 0.6, lower bound 0.25 -> 46.67 / 100.
    assert metrics.normalize(0.6, 0.25) == pytest.approx(0.35 / 0.75)
    assert float(metrics.normalize(0.6, 0.25)) * 100 == pytest.approx(46.67, abs=0.005)
    assert metrics.normalize(0.2, 0.25) == 0.0  # below chance clips to 0
    assert metrics.normalize(1.0, 0.1) == 1.0 and metrics.normalize(0.1, 0.1) == 0.0
    assert metrics.normalize(0.55, 0.1) == pytest.approx(0.5)  # MMLU-Pro
    np.testing.assert_allclose(metrics.normalize([0.5, 0.75, 1.0], [0.5, 0.5, 0.5]), [0.0, 0.5, 1.0])
    with pytest.raises(ValueError):
        metrics.normalize(0.5, 1.0)


def test_lower_bounds_follow_the_leaderboard_rules():
    assert metrics.leaderboard_lower_bound("leaderboard_gpqa_diamond") == 0.25
    assert metrics.leaderboard_lower_bound("leaderboard_mmlu_pro") == pytest.approx(0.1)
    assert metrics.leaderboard_lower_bound("leaderboard_musr_murder_mysteries") == 0.5
    assert metrics.leaderboard_lower_bound("leaderboard_musr_object_placements") == pytest.approx(0.2)
    assert metrics.leaderboard_lower_bound("leaderboard_musr_team_allocation") == pytest.approx(1 / 3)
    assert metrics.leaderboard_lower_bound("leaderboard_bbh_navigate") == 0.5
    assert sum(t.startswith("leaderboard_bbh_") for t in metrics.LEADERBOARD_NUM_CHOICES) == 24
    with pytest.raises(KeyError, match="hellaswag"):
        metrics.leaderboard_lower_bound("hellaswag")


def test_num_choices_match_the_installed_lm_eval_configs():
    yaml = pytest.importorskip("yaml")
    lm_eval = pytest.importorskip("lm_eval")
    root = Path(lm_eval.__file__).parent / "tasks" / "leaderboard"
    seen = 0
    for f in sorted((root / "bbh_mc").glob("*.yaml")) + [root / "gpqa" / "_template_yaml"]:
        cfg = yaml.safe_load(f.read_text().replace("!function", ""))
        if "doc_to_choice" not in cfg:
            continue
        names = [cfg["task"]] if "task" in cfg else ["leaderboard_gpqa_diamond", "leaderboard_gpqa_main",
                                                      "leaderboard_gpqa_extended"]
        for name in names:
            assert metrics.LEADERBOARD_NUM_CHOICES[name] == len(cfg["doc_to_choice"]), name
            seen += 1
    assert seen == 27


def _unit_rows(unit_id: str, values: dict) -> list[dict]:
    return [{"unit_id": unit_id, "task": t, "metric": m, "value": v} for (t, m), v in values.items()]


def test_leaderboard_scores_bbh_and_musr_are_unweighted_subtask_means():
    rows = pd.DataFrame(
        _unit_rows("u1", {
            ("leaderboard_bbh_navigate", "acc_norm"): 0.75,  # lb 1/2 -> 0.5
            ("leaderboard_bbh_navigate", "acc"): 0.99,  # ignored: BBH reads acc_norm
            ("leaderboard_bbh_geometric_shapes", "acc_norm"): 0.45,  # lb 1/11 -> (0.45 - 1/11) / (10/11)
            ("leaderboard_bbh_object_counting", "acc_norm"): 0.01,  # below 1/19 -> 0
            ("leaderboard_musr_murder_mysteries", "acc_norm"): 0.7,  # the docs' example: 0.4
            ("leaderboard_musr_object_placements", "acc_norm"): 0.4,  # 0.25
            ("leaderboard_musr_team_allocation", "acc_norm"): 0.6,  # 0.4
            ("leaderboard_mmlu_pro", "acc"): 0.37,  # 0.3
            ("leaderboard_mmlu_pro", "acc_norm"): 0.9,  # ignored: MMLU-Pro reads acc
            ("leaderboard_gpqa_diamond", "acc_norm"): 0.4,  # 0.2
            ("hellaswag", "acc_norm"): 0.8,  # not a leaderboard task: dropped
        })
    )
    got = metrics.leaderboard_scores(rows).set_index("task")
    bbh = (0.5 + (0.45 - 1 / 11) / (10 / 11) + 0.0) / 3
    assert got.loc["leaderboard_bbh", "value"] == pytest.approx(bbh, rel=1e-12)
    assert got.loc["leaderboard_bbh", "n_subtasks"] == 3
    assert got.loc["leaderboard_musr", "value"] == pytest.approx((0.4 + 0.25 + 0.4) / 3, rel=1e-12)
    assert got.loc["leaderboard_mmlu_pro", "value"] == pytest.approx(0.3, rel=1e-12)
    assert got.loc["leaderboard_gpqa_diamond", "value"] == pytest.approx(0.2, rel=1e-12)
    assert set(got.index) == {"leaderboard_bbh", "leaderboard_musr", "leaderboard_mmlu_pro", "leaderboard_gpqa_diamond"}
    assert set(got["metric"]) == {"leaderboard_normalized"}


def test_normalize_leaderboard_rowwise_and_add_normalized():
    df = pd.DataFrame({"task": ["leaderboard_gpqa_main", "hellaswag", "hellaswag"], "value": [0.55, 0.7, 0.1],
                       "normalized_value": [np.nan, np.nan, 0.123]})
    n = metrics.normalize_leaderboard(df)
    assert n.iloc[0] == pytest.approx(0.4) and np.isnan(n.iloc[1])
    n2 = metrics.normalize_leaderboard(df, num_choices={"hellaswag": 4})
    assert n2.iloc[1] == pytest.approx(0.6)
    out = metrics.add_normalized(df, num_choices={"hellaswag": 4})
    assert out["normalized_value"].tolist() == pytest.approx([0.4, 0.6, 0.123])  # an existing value is kept
    assert np.isnan(df["normalized_value"].iloc[0])  # input untouched


# ----------------------------------------------------------------------- a small store


TASKS = ("t1", "t2")


def _write_pool(results_dir: Path) -> dict[str, float]:
    """Base, three experts, three pair merges and a triple by two methods; returns the expected
    per-unit average scores keyed by a readable name."""
    common = dict(suite="s", suite_version="1", profile="p", pool="pool", base_model="b", seed=0)
    expect = {}

    def put(name, unit, t1, t2):
        rows = [{"task": "t1", "metric": "acc", "value": t1}, {"task": "t2", "metric": "acc", "value": t2},
                {"task": "t2", "metric": "acc_norm", "value": 0.0}]
        store.write_unit(unit, rows, run_id="r", results_dir=results_dir)
        expect[name] = (t1 + t2) / 2

    put("base", Unit(role="base", subset=("b",), **common), 0.50, 0.50)
    for e, (a, b_) in {"e1": (0.40, 0.56), "e2": (0.60, 0.46), "e3": (0.52, 0.50)}.items():
        put(e, Unit(role="expert", subset=(e,), **common), a, b_)
    merges = {("ta", ("e1", "e2")): (0.54, 0.50), ("ta", ("e1", "e3")): (0.48, 0.50),
              ("ta", ("e2", "e3")): (0.60, 0.52), ("ta", ("e1", "e2", "e3")): (0.56, 0.56),
              ("ties", ("e1", "e2")): (0.50, 0.50), ("ties", ("e1", "e3")): (0.46, 0.50),
              ("ties", ("e2", "e3")): (0.58, 0.52), ("ties", ("e1", "e2", "e3")): (0.50, 0.52)}
    for (m, sub), (a, b_) in merges.items():
        put(f"{m}:{'+'.join(sub)}", Unit(role="merged", subset=sub, method=m, method_version="1", **common), a, b_)
    return expect


@pytest.fixture(scope="module")
def pool_store(tmp_path_factory):
    d = tmp_path_factory.mktemp("pool_store")
    expect = _write_pool(d)
    return d, expect


def _name(row) -> str:
    if row["role"] == "merged":
        return row["method"] + ":" + "+".join(row["subset"])
    return row["subset"][0] if row["role"] == "expert" else "base"


def test_unit_scores_pandas_and_duckdb_agree_with_hand_means(pool_store):
    d, expect = pool_store
    rows = store.read_results(d)
    with pytest.raises(ValueError, match="several metrics"):
        metrics.unit_scores(rows)
    a = metrics.unit_scores(rows, metric="acc")
    b = metrics.unit_scores(store.connect(d), metric="acc")
    assert len(a) == len(b) == len(expect)
    for s in (a, b):
        got = {_name(r): r["score"] for _, r in s.iterrows()}
        assert got == pytest.approx(expect, rel=1e-12)
        assert set(s["n_tasks"]) == {2}
    pd.testing.assert_series_equal(a["unit_id"], b["unit_id"])
    # {task: metric} selection, and `tasks=` dropping units that lack a task
    c = metrics.unit_scores(rows, metric={"t1": "acc", "t2": "acc_norm"})
    assert c["score"].tolist() == pytest.approx(list(rows[rows.task == "t1"].groupby("unit_id")["value"].first() / 2))
    only = rows[~((rows.task == "t2") & (rows.role == "base"))]
    assert len(metrics.unit_scores(only, metric="acc", tasks=TASKS)) == len(expect) - 1
    con = store.connect(d)
    assert len(metrics.unit_scores(con, metric="acc", tasks=TASKS, where="role <> 'base'")) == len(expect) - 1


def test_compare_to_references_and_summary_by_n_hand_case(pool_store):
    d, _ = pool_store
    scores = metrics.unit_scores(store.read_results(d), metric="acc")
    cmp_ = metrics.compare_to_references(scores)
    by = {_name(r): r for _, r in cmp_.iterrows()}
    # base 0.50; experts e1 0.48, e2 0.53, e3 0.51 -> best expert e2 (0.53)
    assert by["ta:e1+e2"]["base_score"] == pytest.approx(0.50)
    assert set(cmp_["best_expert"]) == {"e2"}
    hand = {"ta:e1+e2": 0.52, "ta:e1+e3": 0.49, "ta:e2+e3": 0.56, "ta:e1+e2+e3": 0.56,
            "ties:e1+e2": 0.50, "ties:e1+e3": 0.48, "ties:e2+e3": 0.55, "ties:e1+e2+e3": 0.51}
    for name, s in hand.items():
        assert by[name]["gain_vs_base_pp"] == pytest.approx(100 * (s - 0.50), abs=1e-9)
        assert by[name]["gain_vs_best_expert_pp"] == pytest.approx(100 * (s - 0.53), abs=1e-9)
        assert bool(by[name]["beats_base"]) == (s > 0.50 + 1e-12)
    assert by["e1"]["gain_vs_base_pp"] == pytest.approx(-2.0)  # experts appear too (the n = 1 column)

    summ = metrics.summary_by_n(cmp_).set_index(["method", "n"])
    ta2 = summ.loc[("ta", 2)]
    assert ta2["n_units"] == 3
    assert ta2["mean"] == pytest.approx((0.52 + 0.49 + 0.56) / 3)
    assert ta2["std"] == pytest.approx(np.std([0.52, 0.49, 0.56], ddof=1))
    assert ta2["p_gt_base"] == pytest.approx(2 / 3)
    assert ta2["gain_vs_base_pp"] == pytest.approx((2 - 1 + 6) / 3)
    assert ta2["p_gt_best_expert"] == pytest.approx(1 / 3)
    assert ta2["gain_vs_best_expert_pp"] == pytest.approx((-1 - 4 + 3) / 3)
    ties2 = summ.loc[("ties", 2)]
    assert ties2["p_gt_base"] == pytest.approx(1 / 3)  # 0.50 is not > 0.50: strictly better only
    experts = metrics.summary_by_n(cmp_)
    experts = experts[experts["role"] == "expert"].iloc[0]
    assert experts["n"] == 1 and experts["n_units"] == 3 and experts["p_gt_base"] == pytest.approx(2 / 3)

    sub = metrics.compare_to_references(scores, best_expert="subset")
    sub = {_name(r): r for _, r in sub.iterrows()}
    assert sub["ta:e1+e3"]["best_expert"] == "e3"
    assert sub["ta:e1+e3"]["gain_vs_best_expert_pp"] == pytest.approx(100 * (0.49 - 0.51))
    assert sub["ta:e2+e3"]["best_expert"] == "e2"


def test_gains_reproduce_seed001_table2_from_table1():
    """Seed 001: with Table 1's gain vs base and the printed base / best-FT accuracies, the
    function's point difference gives Table 2's gain vs the best expert (within rounding)."""
    p = store.paper_rows(PAPER)
    t1, t2 = p[p.table == "seed001_table1"], p[p.table == "seed001_table2"]
    checked = 0
    for model in t1.base_model.dropna().unique():
        base = t1[(t1.base_model == model) & (t1.role == "base")].value.iloc[0] / 100
        best = t2[(t2.base_model == model) & (t2.metric == "avg_acc_pct")].value.iloc[0] / 100
        rows = t1[(t1.base_model == model) & (t1.method == "task_arithmetic") & (t1.metric == "gain_vs_base_pp")]
        scores = pd.DataFrame({
            "unit_id": [f"m{n}" for n in rows.n] + ["base", "best"],
            "role": ["merged"] * len(rows) + ["base", "expert"],
            "subset": [["x"]] * len(rows) + [["b"], ["best"]],
            "method": ["ta"] * len(rows) + [None, None], "n": list(rows.n) + [0, 1],
            "score": list(base + rows.value.to_numpy() / 100) + [base, best]})
        cmp_ = metrics.compare_to_references(scores, group_keys=())
        for _, r in cmp_[cmp_.role == "merged"].iterrows():
            sel = (t2.base_model == model) & (t2.n == r["n"]) & (t2.metric == "gain_vs_best_expert_pp")
            printed = t2[sel].value.iloc[0]
            assert r["gain_vs_best_expert_pp"] == pytest.approx(printed, abs=0.005 + 0.005 + 0.05 + 0.05)
            checked += 1
    assert checked == 4 * 6


# --------------------------------------------------------------------------- merging loss


def test_merging_loss_hand_case():
    merged = pd.DataFrame({"unit_id": ["m"] * 3, "subset": [["e_cola", "e_mnli"]] * 3, "method": "ta", "n": 2,
                           "task": ["cola", "mnli", "rte"], "value": [0.6, 0.8, 0.5]})
    experts = pd.DataFrame({"unit_id": ["x", "y", "z"], "subset": [["e_cola"], ["e_mnli"], ["e_rte"]],
                            "task": ["cola", "mnli", "rte"], "value": [0.8, 0.8, 0.9]})
    loss = metrics.merging_loss(merged, experts, {"cola": "e_cola", "mnli": "e_mnli", "rte": "e_rte"})
    assert loss["task"].tolist() == ["cola", "mnli"]  # rte's expert is not in the merge
    assert loss["merging_loss_pct"].tolist() == pytest.approx([-25.0, 0.0])
    avg = metrics.average_merging_loss(loss).iloc[0]
    assert avg["merging_loss_pct"] == pytest.approx(-12.5) and avg["merging_loss_std"] == pytest.approx(12.5)
    assert avg["n_tasks"] == 2
    # an expert's score on another task never serves as a reference
    experts2 = pd.concat([experts, pd.DataFrame({"unit_id": ["x"], "subset": [["e_cola"]], "task": ["mnli"],
                                                 "value": [0.1]})])
    loss2 = metrics.merging_loss(merged, experts2, {"cola": "e_cola", "mnli": "e_mnli", "rte": "e_rte"})
    assert loss2["merging_loss_pct"].tolist() == pytest.approx([-25.0, 0.0])


@pytest.mark.parametrize("table, model", [("seed004_table13", "Llama3.2-3B"), ("seed004_table14", "Llama3.1-8B"),
                                          ("seed004_table15", "T5-Base"), ("seed004_table16", "T5-Large"),
                                          ("seed004_table17", "T5-XL")])
def test_merging_loss_reproduces_seed004_table1_from_the_appendix(table, model):
    """Eq. 1 on the printed accuracies, averaged (mean, population std) per method, gives
    Table 1's mean +- std within its one-decimal rounding (plus the accuracies' rounding)."""
    p = store.paper_rows(PAPER)
    t = p[p.table == table]
    tasks = sorted(t.task.unique())
    ex = t[(t.role == "expert") & (t.metric == "acc_pct")].assign(subset=lambda x: x.task.map(lambda k: [f"ft_{k}"]))
    mg = t[(t.role == "merged") & (t.metric == "acc_pct")].copy()
    mg["unit_id"] = mg["method"]
    mg["subset"] = [[f"ft_{k}" for k in tasks]] * len(mg)
    loss = metrics.merging_loss(mg, ex, {k: f"ft_{k}" for k in tasks})
    avg = metrics.average_merging_loss(loss).set_index("unit_id")
    t1 = p[(p.table == "seed004_table1") & (p.base_model == model)]
    for method in avg.index:
        mean = t1[(t1.method == method) & (t1.metric == "reported_average")].value.iloc[0]
        std = t1[(t1.method == method) & (t1.metric == "reported_std")].value.iloc[0]
        assert avg.loc[method, "merging_loss_pct"] == pytest.approx(mean, abs=0.05 + 0.03)
        assert avg.loc[method, "merging_loss_std"] == pytest.approx(std, abs=0.05 + 0.03)
        assert avg.loc[method, "n_tasks"] == 8


# ------------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_properties():
    rng = np.random.default_rng(1)
    x = rng.normal(0.5, 0.1, size=400)
    mean, lo, hi = metrics.bootstrap_ci(x, n_boot=20_000, seed=3)
    assert mean == pytest.approx(x.mean(), rel=1e-15)
    assert lo < mean < hi
    # the bootstrap distribution of the mean has sd = population sd / sqrt(k): the 95% interval is
    # +-1.96 of that around the mean (normal approximation holds at k = 400)
    se = x.std(ddof=0) / math.sqrt(x.size)
    assert (hi - lo) / 2 == pytest.approx(1.959964 * se, rel=0.04)
    assert (mean - lo) == pytest.approx(hi - mean, rel=0.1)
    assert metrics.bootstrap_ci(x, n_boot=2000, seed=3) == metrics.bootstrap_ci(x, n_boot=2000, seed=3)
    assert metrics.bootstrap_ci(x, n_boot=2000, seed=3) != metrics.bootstrap_ci(x, n_boot=2000, seed=4)
    assert metrics.bootstrap_ci([0.3] * 7, n_boot=500) == (0.3, 0.3, 0.3)
    assert all(math.isnan(v) for v in metrics.bootstrap_ci([], n_boot=10))
    # chunking the index draws (memory bound) does not change the statistics
    small = metrics.bootstrap_ci(x, n_boot=20_000, seed=3)
    old = metrics._MAX_BOOT_CELLS
    try:
        metrics._MAX_BOOT_CELLS = 1000
        chunked = metrics.bootstrap_ci(x, n_boot=20_000, seed=3)
    finally:
        metrics._MAX_BOOT_CELLS = old
    assert chunked == pytest.approx(small, abs=0.2 * se)


def test_bootstrap_ci_by_groups():
    df = pd.DataFrame({"method": ["a"] * 50 + ["b"] * 30, "score": np.r_[np.full(50, 0.2), np.linspace(0, 1, 30)]})
    out = metrics.bootstrap_ci_by(df, n_boot=1000).set_index("method")
    assert out.loc["a", ["mean", "ci_low", "ci_high"]].tolist() == pytest.approx([0.2, 0.2, 0.2])
    assert out.loc["b", "n_units"] == 30 and out.loc["b", "ci_low"] < 0.5 < out.loc["b", "ci_high"]


def _paired_scores(effects: dict[str, float], k: int = 40, subset_sd: float = 0.2, noise: float = 0.01, seed: int = 0):
    """Scores on k shared subsets: a large per-subset effect shared by all methods + small noise."""
    rng = np.random.default_rng(seed)
    subset_effect = rng.normal(0, subset_sd, size=k)
    rows = []
    for m, eff in effects.items():
        for i in range(k):
            rows.append({"method": m, "subset": [f"e{i}", f"e{i + 1}"], "n": 2, "suite": "s",
                         "score": 0.5 + subset_effect[i] + eff + rng.normal(0, noise)})
    return pd.DataFrame(rows)


def test_rank_intervals_separate_clear_winners_and_use_pairing():
    df = _paired_scores({"a": 0.03, "b": 0.0, "c": -0.03})
    r = metrics.rank_intervals(df, n_boot=1000, seed=0).set_index("method")
    assert r["paired"].all()
    assert r["rank"].tolist() == [1, 2, 3]
    assert r[["rank_low", "rank_high"]].values.tolist() == [[1, 1], [2, 2], [3, 3]]
    assert r.loc["a", "p_best"] == 1.0
    # The same scores without the pairing (subsets not shared) cannot separate the methods:
    # the subset-to-subset spread (0.2) dwarfs the 0.03 differences.
    unpaired = df.assign(subset=[[m, str(i)] for i, m in enumerate(df["method"])])
    u = metrics.rank_intervals(unpaired, n_boot=1000, seed=0).set_index("method")
    assert not u["paired"].any()
    assert (u["rank_high"] - u["rank_low"]).min() >= 1
    # lower-is-better flips the order
    lo = metrics.rank_intervals(df, n_boot=200, seed=0, higher_is_better=False)
    assert lo["method"].tolist() == ["c", "b", "a"]


def test_rank_ties_share_the_better_rank():
    df = pd.DataFrame({"method": ["a", "b", "c"], "subset": [["x"]] * 3, "n": 1, "score": [0.5, 0.5, 0.4]})
    r = metrics.rank_intervals(df, n_boot=50).set_index("method")
    assert r["rank"].to_dict() == {"a": 1, "b": 1, "c": 3}


def test_paired_comparison_hand_case():
    d = [0.1, 0.2, -0.05, 0.0, 0.3]
    rows = []
    for i, di in enumerate(d):
        rows += [{"method": "A", "subset": [f"s{i}"], "n": 1, "score": 0.5 + di},
                 {"method": "B", "subset": [f"s{i}"], "n": 1, "score": 0.5}]
    rows.append({"method": "A", "subset": ["only_a"], "n": 1, "score": 0.9})  # unpaired: ignored
    out = metrics.paired_comparison(pd.DataFrame(rows), "A", "B", n_boot=5000, seed=0)
    assert out["n_pairs"] == 5 and (out["wins"], out["losses"], out["ties"]) == (3, 1, 1)
    assert out["mean_diff"] == pytest.approx(0.11)
    assert out["ci_low"] <= 0.11 <= out["ci_high"]
    assert out["ci_low"] >= -0.05 - 1e-12 and out["ci_high"] <= 0.3 + 1e-12
    # sign test: 3 of 4 non-tied, two-sided exact: (C(4,3)+C(4,4)+C(4,0)+C(4,1)) / 16
    assert out["sign_test_p"] == pytest.approx(10 / 16)
    # Wilcoxon on |d| ranks 2, 3, 1(neg), 4: W- = 1; exact two-sided P = 2 * #{subsets with sum <= 1} / 16
    pytest.importorskip("scipy")
    assert out["wilcoxon_p"] == pytest.approx(4 / 16)
    rev = metrics.paired_comparison(pd.DataFrame(rows), "B", "A", n_boot=5000, seed=0)
    assert rev["mean_diff"] == pytest.approx(-0.11) and rev["sign_test_p"] == out["sign_test_p"]
    with pytest.raises(KeyError, match="'C'"):
        metrics.paired_comparison(pd.DataFrame(rows), "A", "C")


def test_sign_test_without_scipy(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.stats", None)
    for pos, neg in product(range(7), range(7)):
        if pos + neg == 0:
            continue
        n, k = pos + neg, min(pos, neg)
        hand = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)
        assert metrics._sign_test_p(pos, neg) == pytest.approx(hand)
    assert math.isnan(metrics._wilcoxon_p(np.array([0.1, -0.2])))


def test_sign_test_with_scipy_matches_the_exact_binomial():
    pytest.importorskip("scipy")
    for pos, neg in [(3, 1), (10, 2), (0, 5), (6, 6)]:
        n, k = pos + neg, min(pos, neg)
        exact = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)
        assert metrics._sign_test_p(pos, neg) == pytest.approx(exact)


def test_bootstrap_ci_is_pcg64_over_sorted_values_whatever_the_row_order():
    rng = np.random.default_rng(5)
    x = rng.normal(0.6, 0.05, size=9)
    got = metrics.bootstrap_ci(x, n_boot=1000, seed=11)
    # float64 reference: Generator(PCG64(seed)) draws the index matrix over the sorted values
    xs = np.sort(x)
    idx = np.random.Generator(np.random.PCG64(11)).integers(0, xs.size, size=(1000, xs.size))
    lo, hi = np.quantile(xs[idx].mean(axis=1), [0.025, 0.975])
    assert got[0] == pytest.approx(x.mean(), rel=1e-15) and got[1:] == (lo, hi)
    for perm in (x[::-1], rng.permutation(x), np.r_[x[4:], x[:4]]):
        assert metrics.bootstrap_ci(perm, n_boot=1000, seed=11)[1:] == (lo, hi)  # bit for bit


@pytest.mark.parametrize("kw, msg", [
    ({"seed": None}, "seed must be a non-negative integer, got None"),
    ({"seed": -1}, "seed must be a non-negative integer, got -1"),
    ({"seed": True}, "seed must be a non-negative integer, got True"),
    ({"seed": 0, "n_boot": 0}, r"resamples \(n_boot\) must be a positive integer, got 0"),
])
def test_every_bootstrap_refuses_an_implicit_seed(kw, msg):
    df = _paired_scores({"a": 0.01, "b": 0.0}, k=5)
    for call in (lambda: metrics.bootstrap_ci([0.1, 0.2], **kw),
                 lambda: metrics.bootstrap_ci_by(df, **kw),
                 lambda: metrics.rank_intervals(df, **kw),
                 lambda: metrics.paired_comparisons(df, **kw)):
        with pytest.raises(metrics.BootstrapError, match=msg) as exc:
            call()
        assert isinstance(exc.value, ValueError) and "\n" not in str(exc.value)


def test_p_best_splits_ties_evenly_and_sums_to_one():
    df = _paired_scores({"a": 0.0, "b": 0.0, "c": -0.2}, k=12, noise=0.0)  # a and b identical on every subset
    r = metrics.rank_intervals(df, n_boot=400, seed=0).set_index("method")
    assert r["rank"].to_dict() == {"a": 1, "b": 1, "c": 3} and r["tied"].to_dict() == {"a": True, "b": True,
                                                                                        "c": False}
    assert r.loc["a", "p_best"] == r.loc["b", "p_best"] == 0.5 and r.loc["c", "p_best"] == 0.0
    # noisy, partly tied data, paired and unpaired: always a probability distribution over methods
    noisy = _paired_scores({"a": 0.0, "b": 0.001, "c": 0.0, "d": -0.001}, k=8, noise=0.002, seed=3)
    noisy["score"] = noisy["score"].round(3)  # coarse values: ties inside resamples
    for frame in (noisy, noisy[~((noisy["method"] == "d") & (noisy.index % 3 == 0))]):
        out = metrics.rank_intervals(frame, n_boot=500, seed=2)
        assert out["p_best"].sum() == pytest.approx(1.0, abs=1e-12)
    # means that differ in the last bits only (summation order) still tie
    eps = pd.DataFrame({"method": ["a", "b"], "subset": [["x"], ["x"]], "n": 1, "score": [0.1 + 0.2, 0.3]})
    assert metrics.rank_intervals(eps, n_boot=10)["tied"].all()


def test_rank_intervals_do_not_depend_on_row_order():
    df = _paired_scores({"a": 0.01, "b": 0.0, "c": -0.01}, k=15, noise=0.02)
    unpaired = df.drop(index=[3, 17, 40])
    for frame in (df, unpaired):
        a = metrics.rank_intervals(frame, n_boot=300, seed=4)
        b = metrics.rank_intervals(frame.sample(frac=1.0, random_state=1), n_boot=300, seed=4)
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    p1 = metrics.paired_comparisons(df, n_boot=300, seed=4)
    p2 = metrics.paired_comparisons(df.iloc[::-1], n_boot=300, seed=4)
    pd.testing.assert_frame_equal(p1, p2, check_exact=True)


def test_paired_comparisons_all_pairs():
    df = _paired_scores({"a": 0.03, "b": 0.0, "c": -0.03}, k=20)
    out = metrics.paired_comparisons(df, n_boot=500)
    assert [(r.method_a, r.method_b) for r in out.itertuples()] == [("a", "b"), ("a", "c"), ("b", "c")]
    assert (out["n_pairs"] == 20).all() and (out["mean_diff"] > 0).all() and (out["ci_low"] > 0).all()
    assert (out["sign_test_p"] < 0.01).all()


def test_metrics_do_not_mutate_inputs(pool_store):
    d, _ = pool_store
    rows = store.read_results(d)
    before = rows.copy(deep=True)
    scores = metrics.unit_scores(rows, metric="acc")
    s_before = scores.copy(deep=True)
    metrics.summary_by_n(metrics.compare_to_references(scores))
    metrics.rank_intervals(scores[scores.role == "merged"], n_boot=50)
    metrics.add_normalized(rows)
    pd.testing.assert_frame_equal(rows, before)
    pd.testing.assert_frame_equal(scores, s_before)
