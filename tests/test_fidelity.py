"""Fidelity checks (mergebench.fidelity): verdicts on data whose answer is known, both outcomes
of every check, Kendall's tau against scipy, the shipped findings file, and the table on a real store."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from mergebench import report
from mergebench import fidelity as fid
from mergebench.fidelity import NOT_REPRODUCED, NOT_TESTABLE, REPRODUCED, FindingSpec, RankingSpec, SuiteData

KW = {"n_boot": 400, "seed": 0, "alpha": 0.05}


def _data(units=None, losses=None, diagnostics=None, paper=None, configs=None, suite="s") -> SuiteData:
    units = pd.DataFrame(units or [], columns=None) if not isinstance(units, pd.DataFrame) else units
    return SuiteData(suite, "embedded", "pool", units,
                     losses if losses is not None else pd.DataFrame(columns=["unit_id", "method", "n", "task",
                                                                              "merging_loss_pct"]),
                     diagnostics if diagnostics is not None else pd.DataFrame(), paper if paper is not None
                     else pd.DataFrame(), configs or {})


def _merged(method, sizes, value, *, per_size=6, params="{}", rng=None, col="score"):
    """Merged units of `method`: `per_size` subsets of each size, `col` = value(n, i)."""
    out = []
    for n in sizes:
        for i in range(per_size):
            out.append({"unit_id": f"{method}-{n}-{i}", "role": "merged", "method": method, "params_json": params,
                        "n": n, "subset": [f"e{(i + j) % 12}" for j in range(n)], col: value(n, i)})
    return out


def _finding(**kw) -> FindingSpec:
    return FindingSpec(**{"id": "x", "paper": "inthewild", "where": "§1", "claim": "c", "suite": "s", **kw})


# ------------------------------------------------------------------------------ Kendall's tau


@pytest.mark.parametrize("seed", range(6))
def test_kendall_tau_b_matches_scipy_with_and_without_ties(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(3, 12))
    x = rng.normal(size=k)
    y = rng.integers(0, 4, size=k).astype(float) if seed % 2 else rng.normal(size=k)  # ties in y on odd seeds
    assert fid.kendall_tau(x, y) == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)
    xs = rng.normal(size=(5, k))
    rows = fid._tau_rows(xs, y)
    assert rows == pytest.approx([stats.kendalltau(r, y).statistic for r in xs], abs=1e-12)


def test_kendall_tau_is_nan_for_a_constant_ranking():
    assert np.isnan(fid.kendall_tau([1, 1, 1], [1, 2, 3]))


# ------------------------------------------------------------------------------ statistics


def test_trend_slope_is_the_ols_slope_and_seeded():
    rng = np.random.default_rng(1)
    n = np.repeat([2, 4, 8], 7)
    y = 0.3 * n + rng.normal(0, 0.5, n.size)
    slope, lo, hi = fid.trend_slope(n, y, n_boot=500, seed=3)
    assert slope == pytest.approx(np.polyfit(n.astype(float), y, 1)[0], rel=1e-12)
    assert lo < slope < hi
    perm = rng.permutation(n.size)  # row order must not matter
    assert fid.trend_slope(n[perm], y[perm], n_boot=500, seed=3) == (slope, lo, hi)
    assert fid.trend_slope(n, y, n_boot=500, seed=4) != (slope, lo, hi)


def test_eta_squared_against_a_float64_loop():
    rng = np.random.default_rng(2)
    labels = rng.choice(list("abcd"), size=40)
    y = rng.normal(size=40) + (labels == "a") * 2.0
    grand = y.mean()
    between = sum((labels == g).sum() * (y[labels == g].mean() - grand) ** 2 for g in set(labels))
    assert fid.eta_squared(y, labels) == pytest.approx(between / ((y - grand) ** 2).sum(), rel=1e-12)


# ------------------------------------------------------------------------------ verdicts


def test_trend_reproduced_when_the_quantity_rises_and_not_when_it_is_flat():
    rng = np.random.default_rng(0)
    rising = _data(_merged("ta", (2, 4, 8), lambda n, i: 0.05 * n + rng.normal(0, 0.02)))
    f_up = _finding(check="trend", method="ta", quantity="score", direction="increasing")
    f_down = _finding(check="trend", method="ta", quantity="score", direction="decreasing")
    up = fid.check_trend(rising, f_up, **KW)
    assert up.verdict == REPRODUCED and up.ci_low > 0 and up.estimate == pytest.approx(0.05, abs=0.01)
    down = fid.check_trend(rising, f_down, **KW)
    assert down.verdict == NOT_REPRODUCED and "opposite" in down.reason
    flat = _data(_merged("ta", (2, 4, 8), lambda n, i: 1.0, col="beats_base"))
    res = fid.check_trend(flat, _finding(check="trend", method="ta", quantity="beats_base", direction="increasing"),
                          **KW)
    assert res.verdict == NOT_REPRODUCED and "every n" in res.reason


def test_trend_not_testable_without_rows_or_with_one_size():
    f = _finding(check="trend", method="ta", quantity="score", direction="increasing")
    assert fid.check_trend(_data(_merged("other", (2, 4), lambda n, i: 0.0)), f, **KW).verdict == NOT_TESTABLE
    one = fid.check_trend(_data(_merged("ta", (4,), lambda n, i: float(i))), f, **KW)
    assert one.verdict == NOT_TESTABLE and "one merge size" in one.reason


def test_a_method_counts_only_in_the_papers_configuration():
    rows = _merged("ta", (2, 4), lambda n, i: 0.1 * n + 0.01 * i, params=json.dumps({"lambda": 1.0, "normalize": False}))
    f = _finding(check="trend", method="ta", quantity="score", direction="increasing")
    other = fid.check_trend(_data(rows, configs={"ta": {"lambda": 1.0, "normalize": True}}), f, **KW)
    assert other.verdict == NOT_TESTABLE and '"normalize":true' in other.reason and '"normalize":false' in other.reason
    same = fid.check_trend(_data(rows, configs={"ta": {"lambda": 1.0, "normalize": False}}), f, **KW)
    assert same.verdict == REPRODUCED


def _experts(k, beating):
    return [{"unit_id": f"x{i}", "role": "expert", "method": None, "params_json": None, "n": 1, "subset": [f"e{i}"],
             "beats_base": i < beating} for i in range(k)]


def test_share_of_experts_beating_the_base_both_ways():
    f = _finding(check="share", role="expert", quantity="beats_base", below=0.5)
    few = fid.check_share(_data(_experts(20, 2)), f, **KW)
    assert few.verdict == REPRODUCED and few.estimate == pytest.approx(0.1) and few.ci_high < 0.5
    many = fid.check_share(_data(_experts(13, 11)), f, **KW)
    assert many.verdict == NOT_REPRODUCED and "11 of 13" in many.observed


def test_method_gap_paired_on_shared_subsets():
    rng = np.random.default_rng(5)
    noise = {(n, i): rng.normal(0, 0.05) for n in (2, 4) for i in range(8)}
    a = _merged("a", (2, 4), lambda n, i: noise[(n, i)] + 0.03, per_size=8)
    b = _merged("b", (2, 4), lambda n, i: noise[(n, i)], per_size=8)
    f = _finding(check="method_gap", method="a", versus="b", quantity="score")
    ahead = fid.check_method_gap(_data(a + b), f, **KW)  # the shared noise cancels in the paired differences
    assert ahead.verdict == REPRODUCED and ahead.estimate == pytest.approx(0.03) and "n = 4" in ahead.observed
    behind = fid.check_method_gap(_data(a + b), _finding(check="method_gap", method="b", versus="a",
                                                        quantity="score"), **KW)
    assert behind.verdict == NOT_REPRODUCED and "ahead" in behind.reason


def _losses(methods, tasks, value, n=8):
    return pd.DataFrame([{"unit_id": f"{m}-{n}", "method": m, "n": n, "task": t, "merging_loss_pct": value(m, t)}
                         for m in methods for t in tasks])


def test_collapse_both_ways():
    tasks = [f"t{i}" for i in range(8)]
    f = _finding(check="collapse")
    lossy = fid.check_collapse(_data(losses=_losses("abc", tasks, lambda m, t: -10.0 - int(t[1:]))), f, **KW)
    assert lossy.verdict == REPRODUCED and lossy.estimate == pytest.approx(-13.5)
    fine = fid.check_collapse(_data(losses=_losses("abc", tasks, lambda m, t: 2.0 if m == "a" else -10.0)), f, **KW)
    assert fine.verdict == NOT_REPRODUCED and "(a)" in fine.reason


def test_anova_task_effect_against_method_effect():
    rng = np.random.default_rng(7)
    tasks = [f"t{i}" for i in range(6)]
    shift = {t: -5.0 * i for i, t in enumerate(tasks)}
    by_task = pd.concat([_losses("abc", tasks, lambda m, t: shift[t] + rng.normal(0, 0.5), n=k)
                         .assign(unit_id=lambda d, k=k: d["method"] + f"-{k}") for k in (2, 3, 4)], ignore_index=True)
    f = _finding(check="anova")
    res = fid.check_anova(_data(losses=by_task), f, **KW)
    p_task = stats.f_oneway(*[g for _, g in by_task.groupby("task")["merging_loss_pct"]]).pvalue
    assert res.verdict == REPRODUCED and f"{p_task:.2g}" in res.observed
    mshift = {"a": 0.0, "b": -8.0, "c": -16.0}
    by_method = pd.concat([_losses("abc", tasks, lambda m, t: mshift[m] + rng.normal(0, 0.5), n=k)
                           .assign(unit_id=lambda d, k=k: d["method"] + f"-{k}") for k in (2, 3, 4)],
                          ignore_index=True)
    res = fid.check_anova(_data(losses=by_method), f, **KW)
    assert res.verdict == NOT_REPRODUCED and "method effect is significant" in res.reason


def test_mds_correlation_both_ways():
    tasks = [f"t{i}" for i in range(10)]
    mds = {t: 1.0 + 0.2 * i for i, t in enumerate(tasks)}
    diag = pd.DataFrame([{"kind": "representations", "metric": "mds", "method": None, "model": t, "model_b": None,
                          "layer": "hidden.3", "task": t, "value": v} for t, v in mds.items()])
    f = _finding(check="correlation", metric="mds", sign="negative")
    rng = np.random.default_rng(3)
    tied = _losses("ab", tasks, lambda m, t: -10 * mds[t] + rng.normal(0, 0.3))
    res = fid.check_correlation(_data(losses=tied, diagnostics=diag), f, **KW)
    best = tied.groupby("task")["merging_loss_pct"].max()
    assert res.verdict == REPRODUCED
    assert res.estimate == pytest.approx(stats.pearsonr([mds[t] for t in best.index], best).statistic)
    unrelated = _losses("ab", tasks, lambda m, t: rng.normal(0, 1))
    res = fid.check_correlation(_data(losses=unrelated, diagnostics=diag), f, **KW)
    assert res.verdict == NOT_REPRODUCED or res.estimate < 0 and res.ci_high < 0  # random: almost surely not


def test_no_correlation_claim_for_parameter_metrics():
    experts = [f"e{i}" for i in range(8)]
    pairs = list(itertools.combinations(experts, 2))[:12]
    units = [{"unit_id": f"u{i}", "role": "merged", "method": "a", "params_json": "{}", "n": 2, "subset": list(p)}
             for i, p in enumerate(pairs)]
    rng = np.random.default_rng(11)
    loss = {f"u{i}": rng.normal(-5, 2) for i in range(len(pairs))}
    losses = pd.DataFrame([{"unit_id": u, "method": "a", "n": 2, "task": t, "merging_loss_pct": v}
                           for u, v in loss.items() for t in ("ta", "tb")])
    related = pd.DataFrame([{"kind": "weights", "metric": "cosine", "method": None, "model": p[0], "model_b": p[1],
                             "layer": None, "task": None, "value": loss[f"u{i}"] / 10} for i, p in enumerate(pairs)])
    noise = related.assign(metric="sign_change_ratio", value=rng.normal(size=len(pairs)))
    diag = pd.concat([related, noise], ignore_index=True)
    none = _finding(check="correlation", metrics=["sign_change_ratio"], sign="none")
    assert fid.check_correlation(_data(units, losses, diag), none, **KW).verdict == REPRODUCED
    some = _finding(check="correlation", metrics=["sign_change_ratio", "cosine"], sign="none")
    res = fid.check_correlation(_data(units, losses, diag), some, **KW)
    assert res.verdict == NOT_REPRODUCED and "cosine" in res.reason
    pos = fid.check_correlation(_data(units, losses, diag), _finding(check="correlation", metric="cosine",
                                                                     sign="positive"), **KW)
    assert pos.verdict == REPRODUCED and pos.estimate == pytest.approx(1.0)


def _activations(levels):
    return pd.DataFrame([{"kind": "activations", "metric": "effective_rank", "method": m, "model": None,
                          "model_b": None, "layer": f"hidden.{i}", "task": None, "value": v * (1 + 0.1 * i)}
                         for m, v in levels.items() for i in range(8)])


def test_activation_gap_both_ways():
    f = _finding(check="activation", method="k", versus=["l", "t"], metric="effective_rank", min_gap=0.01)
    wide = fid.check_activation(_data(diagnostics=_activations({"k": 1.2, "l": 1.0, "t": 0.9})), f, **KW)
    assert wide.verdict == REPRODUCED and wide.estimate == pytest.approx(0.2) and "layers 4, 5, 6, 7" in wide.observed
    alike = fid.check_activation(_data(diagnostics=_activations({"k": 1.0001, "l": 1.0, "t": 0.9})), f, **KW)
    assert alike.verdict == NOT_REPRODUCED
    missing = fid.check_activation(_data(diagnostics=_activations({"k": 1.0, "l": 1.0})), f, **KW)
    assert missing.verdict == NOT_TESTABLE and "t" in missing.reason


def _published(order, n=(2, 4)):
    return pd.DataFrame([{"table": "T1", "method": m, "n": k, "pool": p, "gain_vs_base_pp": float(len(order) - i)}
                         for i, m in enumerate(order) for k in n for p in ("p1", "p2")])


def test_rank_agreement_both_ways_and_not_testable():
    spec = RankingSpec(id="r", paper="inthewild", where="T1", suite="s", tables=["T1"], quantity="gain_vs_base_pp")
    units = [u for m, lv in {"a": 3.0, "b": 2.0, "c": 1.0, "d": 0.0}.items()
             for u in _merged(m, (2, 4), lambda n, i, lv=lv: lv + 0.01 * i, col="gain_vs_base_pp")]
    same = fid.rank_agreement(_data(units, paper=_published("abcd")), spec, n_boot=300, seed=0)
    assert same.verdict == REPRODUCED and same.estimate == pytest.approx(1.0) and same.n_obs == 4
    rev = fid.rank_agreement(_data(units, paper=_published("dcba")), spec, n_boot=300, seed=0)
    assert rev.verdict == NOT_REPRODUCED and rev.estimate == pytest.approx(-1.0)
    x = [3.0, 2.0, 1.0, 0.0]
    mixed = fid.rank_agreement(_data(units, paper=_published("abdc")), spec, n_boot=300, seed=0)
    assert mixed.estimate == pytest.approx(stats.kendalltau(x, [4, 3, 1, 2]).statistic)
    two = fid.rank_agreement(_data(units, paper=_published("abz")), spec, n_boot=300, seed=0)
    assert two.verdict == NOT_TESTABLE and "no merged rows here of z" in two.reason


def test_findings_file_problems_are_one_line(tmp_path):
    bad = tmp_path / "f.yaml"
    bad.write_text("findings:\n  - {id: a, paper: inthewild, where: x, claim: y, suite: s, check: trend}\n")
    with pytest.raises(fid.FidelityError) as e:
        fid.load_findings(bad)
    assert str(bad) in str(e.value) and "method" in str(e.value)
    bad.write_text("findings:\n  - {id: a, paper: nopaper, where: x, claim: y, suite: s, check: anova}\n")
    with pytest.raises(fid.FidelityError, match="nopaper"):
        fid.load_findings(bad)


def test_the_shipped_findings_name_real_papers_suites_and_tables():
    spec = fid.load_findings()
    assert len(spec.findings) >= 12 and {r.suite for r in spec.rankings} >= {"inthewild", "glue"}
    from mergebench.config.suites import load_suite
    from mergebench.results import store

    for s in {x.suite for x in [*spec.findings, *spec.rankings]}:
        assert "embedded" in load_suite(s).profiles
    tables = set(store.paper_rows()["table"])
    assert {t for r in spec.rankings for t in r.tables} <= tables


# ------------------------------------------------------------------------------ on a store


@pytest.fixture(scope="module")
def synthetic_table(tmp_path_factory):
    from mergebench.leaderboard import synthetic

    d = tmp_path_factory.mktemp("fid") / "results"
    synthetic.small_store(d, suite="inthewild", sizes=(2, 3, 4))
    con = report.connect(d)
    try:
        yield fid.fidelity_table(con, "inthewild", n_boot=300), fid.fidelity_table(con, "inthewild", n_boot=300)
    finally:
        con.close()


def test_fidelity_table_on_a_synthetic_store(synthetic_table):
    t, again = synthetic_table
    pd.testing.assert_frame_equal(t, again)  # seeded: identical digits on every call
    v = t.set_index("id")["verdict"]
    # small_store: TA and TIES are stored with {"lambda": 1.0}, not the in-the-wild study's
    # configuration (normalized TA), so neither TA's trends nor its norm vs n are tested; TSV-M has
    # no rows (the trend check itself is tested on constructed units above)
    assert v["mean_task_vector_shrinks_with_n"] == NOT_TESTABLE
    assert "not in the paper's configuration" in t.set_index("id").loc["mean_task_vector_shrinks_with_n", "reason"]
    assert v["ta_p_gt_base_rises_with_n"] == NOT_TESTABLE
    assert "not in the paper's configuration" in t.set_index("id").loc["ta_p_gt_base_rises_with_n", "reason"]
    assert v["tsv_merge_declines_with_n"] == NOT_TESTABLE
    assert set(t["verdict"]) <= set(fid.VERDICTS) and (t["seed"] == 0).all() and (t["n_boot"] == 300).all()


def test_readme_block_is_replaced_in_place(synthetic_table):
    t, _ = synthetic_table
    text = fid.with_table("# Suites\n\nintro\n", t)
    assert fid.MARKERS[0] in text and text.count("| inthewild |") == len(t)
    again = fid.with_table(text + "\nafter\n", t.iloc[:1])
    assert again.count(fid.MARKERS[0]) == 1 and again.count("| inthewild |") == 1 and again.endswith("after\n")


def test_cli_stores_the_rows_for_sql_and_writes_the_readme_block(tmp_path):
    from mergebench.leaderboard import synthetic
    from typer.testing import CliRunner

    from mergebench.cli import app
    from mergebench.results import store

    d = tmp_path / "results"
    synthetic.small_store(d, suite="inthewild", sizes=(2, 3))
    readme = tmp_path / "README.md"
    readme.write_text("# suites\n")
    runner = CliRunner()
    res = runner.invoke(app, ["fidelity", "--suite", "inthewild", "--results", str(d), "--n-boot", "200",
                              "--readme", str(readme)])
    assert res.exit_code == 0, res.output
    assert "mean_task_vector_shrinks_with_n" in res.output and "not testable here" in res.output
    rows = store.sql("SELECT id, verdict, seed, n_boot, inputs_hash FROM fidelity ORDER BY id", d)
    assert len(rows) >= 10 and set(rows["n_boot"]) == {200} and rows["inputs_hash"].nunique() == 1
    assert fid.MARKERS[0] in readme.read_text() and "mean_task_vector_shrinks_with_n" in readme.read_text()
    with report.connect(d) as con:
        assert not fid.is_stale(con)
    again = runner.invoke(app, ["fidelity", "--suite", "nosuch", "--results", str(d), "--no-write"])
    assert again.exit_code != 0 and "nosuch" in again.output and "error" in again.output
