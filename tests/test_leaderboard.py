"""The Streamlit leaderboard (AppTest) and the static reports, on committed and synthetic stores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("streamlit")
from mergebench.leaderboard import synthetic
from streamlit.testing.v1 import AppTest

from mergebench import report
from mergebench.results import store

APP = str(ROOT / "leaderboard" / "app.py")
PAGES = ["ranking", "scaling", "tasks", "diagnostics", "methods", "pareto"]
METHODS = {"linear": 0.0, "ties": 0.05, "karcher": 0.08, "slerp": -0.03}


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    d = tmp_path_factory.mktemp("lb") / "results"
    synthetic.small_store(d, methods=METHODS, sizes=(2, 3))
    return d


def app(results_dir, monkeypatch) -> AppTest:
    monkeypatch.setenv("MERGEBENCH_RESULTS", str(results_dir))
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def goto(at: AppTest, page: str) -> AppTest:
    at.radio(key="page").set_value(page)
    at.run()
    assert not at.exception, (page, [e.message for e in at.exception])
    return at


def direct_scores(results_dir) -> pd.DataFrame:
    """Independent DuckDB computation: mean over units of the unit's mean 'acc' (the headline metric
    of every mb_* task in the synthetic store), per method."""
    return store.sql("""
        SELECT method, avg(s) AS score, count(*) AS units FROM (
            SELECT unit_id, any_value(method) AS method, avg(value) AS s FROM results
            WHERE role = 'merged' AND metric = 'acc' GROUP BY unit_id)
        GROUP BY method ORDER BY score DESC""", results_dir)


# ----------------------------------------------------------------------------- app pages


@pytest.mark.parametrize("which", ["committed", "synthetic"])
def test_every_page_renders(which, syn, monkeypatch):
    at = app(ROOT / "results" if which == "committed" else syn, monkeypatch)
    for page in PAGES:
        goto(at, page)
        assert at.title[0].value == "mergebench leaderboard"
        if which == "synthetic" and page != "diagnostics":
            assert len(at.dataframe) >= 1, page  # every page shows real data here
            assert not at.info or page == "methods", (page, [i.value for i in at.info])
            if page in ("ranking", "scaling", "tasks", "pareto"):
                assert len(at.get("vega_lite_chart")) >= 1, page
        if which == "committed" and page in ("ranking", "scaling", "tasks"):
            assert len(at.dataframe) >= 1, page  # the published numbers show before any run


def test_committed_store_shows_published_rows(monkeypatch):
    at = app(ROOT / "results", monkeypatch)
    goto(at, "ranking")
    at.selectbox(key="suite").set_value("openllm").run()
    assert len(at.dataframe) == 1  # openllm has no reproduced rows: the published table only
    pap = at.dataframe[0].value
    assert len(pap) > 0 and "source" not in pap
    # the value printed in the Fisher-Rao paper's Table 1 for Karcher at m = 2, read straight from the CSV
    csv = pd.read_csv(ROOT / "results" / "paper" / "seed000_table1.csv")
    want = csv[(csv.method == "karcher") & (csv.n == 2) & (csv.metric == "reported_average")]["value"].iloc[0]
    got = pap[(pap["method"] == "karcher") & (pap["n"] == 2) & (pap["table"] == "Fisher–Rao merging paper, Table 1")]
    assert got["score"].iloc[0] == pytest.approx(want)


def test_ranking_order_equals_duckdb(syn, monkeypatch):
    at = goto(app(syn, monkeypatch), "ranking")
    run, tasks, pub = (d.value for d in at.dataframe)
    assert "source" not in run and "source" not in pub  # the sections say which is which
    want = direct_scores(syn)
    assert run["method"].tolist() == want["method"].tolist()
    np.testing.assert_allclose(run["score"].to_numpy(float), want["score"].to_numpy(float), rtol=1e-12)
    assert run["n_units"].tolist() == want["units"].tolist()
    assert run["rank_label"].tolist() == [str(i) for i in range(1, len(want) + 1)]  # no ties here
    ci = run["ci"].str.split(" – ", expand=True).astype(float)
    assert (ci[0] <= run["score"].round(4)).all() and (run["score"].round(4) <= ci[1]).all() and (ci[0] < ci[1]).all()
    ranks = run["ranks"].str.split(" – ")  # "2 – 3", or "1" when every resample agrees
    rank = np.arange(1, len(run) + 1)
    assert (ranks.str[0].astype(int) <= rank).all() and (rank <= ranks.str[-1].astype(int)).all()
    assert "rank" not in pub and "rank_label" not in pub  # published rows are never ranked
    # the per-task tab: one column per task, its average equals the ranked score (every unit has every task)
    assert tasks["method"].tolist() == run["method"].tolist()
    assert set(synthetic.TASKS) <= set(tasks.columns)
    np.testing.assert_allclose(tasks["average"].to_numpy(float), want["score"].to_numpy(float), rtol=1e-12)
    per_task = store.sql("""SELECT method, task, avg(value) AS v FROM results WHERE role = 'merged' AND metric = 'acc'
                            GROUP BY ALL""", syn).pivot(index="method", columns="task", values="v")
    np.testing.assert_allclose(tasks.set_index("method")[list(synthetic.TASKS)].to_numpy(float),
                               per_task.loc[tasks["method"], list(synthetic.TASKS)].to_numpy(float), rtol=1e-12)


def test_filters_restrict_rows(syn, monkeypatch):
    at = goto(app(syn, monkeypatch), "ranking")
    at.selectbox(key="n").set_value(3).run()
    run = at.dataframe[0].value
    assert set(run["n_units"]) == {20}  # C(6, 3) subsets per method
    at.checkbox(key="data_free").check().run()  # karcher needs Fisher statistics: not data-free
    run = at.dataframe[0].value
    assert "karcher" not in set(run["method"]) and "ties" in set(run["method"])
    at.checkbox(key="data_free").uncheck().run()
    at.multiselect(key="families").set_value(["spherical"]).run()
    assert set(at.dataframe[0].value["method"]) <= {"karcher", "slerp", "multislerp", "layer_adaptive_slerp"}


def test_method_page_shows_configs_and_command(syn, monkeypatch):
    at = goto(app(syn, monkeypatch), "methods")
    at.selectbox(key="method").set_value("ties").run()
    assert not at.exception
    cmds = [c.value for c in at.code if c.value.startswith("mergebench eval")]
    assert cmds == ["mergebench eval --method ties --suite inthewild --profile embedded --pool smol "
                    "--set lambda=1.0 --seed 0"]
    cfg = at.dataframe[1].value  # [0] = parameter table
    assert cfg["params_json"].tolist() == ['{"lambda":1.0}'] and cfg["units"].tolist() == [35]


# ------------------------------------------------------------------------- computations


def test_gains_and_probabilities_match_sql(syn):
    con = report.connect(syn)
    r = report.run_ranking(con, report.Filters(suite="inthewild"))
    d = store.sql("""
        WITH u AS (SELECT unit_id, any_value(method) AS method, any_value(role) AS role, any_value(subset) AS subset,
                          avg(value) AS s FROM results WHERE metric = 'acc' GROUP BY unit_id),
             b AS (SELECT avg(s) AS base FROM u WHERE role = 'base'),
             e AS (SELECT max(s) AS best FROM u WHERE role = 'expert')
        SELECT method, 100 * avg(s - base) AS g, avg((s > base)::DOUBLE) AS p,
               100 * avg(s - best) AS gb, avg((s > best)::DOUBLE) AS pb
        FROM u, b, e WHERE role = 'merged' GROUP BY method""", syn).set_index("method")
    r = r.set_index("method")
    np.testing.assert_allclose(r["gain_vs_base_pp"], d.loc[r.index, "g"], rtol=1e-9)
    np.testing.assert_allclose(r["p_gt_base"], d.loc[r.index, "p"])
    np.testing.assert_allclose(r["gain_vs_best_expert_pp"], d.loc[r.index, "gb"], rtol=1e-9)
    np.testing.assert_allclose(r["p_gt_best_expert"], d.loc[r.index, "pb"])
    cost = store.sql("""SELECT r.method, avg(p.merge_wall_s) AS w FROM provenance p
                        JOIN (SELECT DISTINCT unit_id, method FROM results WHERE role = 'merged') r USING (unit_id)
                        GROUP BY r.method""", syn).set_index("method")
    np.testing.assert_allclose(r["merge_wall_s"], cost.loc[r.index, "w"])


def test_unknown_suite_falls_back_to_acc(tmp_path):
    u = store.Unit(suite="custom", role="merged", subset=("a", "b"), method="linear", method_version="1", profile="x")
    store.write_unit(u, [{"task": "t1", "metric": "acc", "value": 0.2}, {"task": "t1", "metric": "f1", "value": 0.9},
                         {"task": "t2", "metric": "mcc", "value": 0.4}], run_id="r1", results_dir=tmp_path)
    s = report.df(report.connect(tmp_path), "SELECT score, n_tasks FROM unit_scores")
    # t1 -> acc (0.2), t2 has no acc -> its only metric (0.4)
    assert s["score"].iloc[0] == pytest.approx(0.3) and s["n_tasks"].iloc[0] == 2


@pytest.mark.parametrize("cost", ["merge_wall_s", "eval_wall_s", "unit_cost_s"])
def test_pareto_front_is_the_non_dominated_set(cost):
    rng = np.random.default_rng(3)
    d = pd.DataFrame({"source": "run", "method": [f"m{i}" for i in range(30)], "score": rng.random(30),
                      "merge_wall_s": rng.random(30) * 10, "eval_wall_s": rng.random(30) * 60, "merge_peak_gib": 1.0})
    d.loc[0, "score"] = np.nan  # a NaN score is never optimal (nor shown)
    got = report.pareto(d, cost).set_index("method")["pareto"]
    d = d.dropna(subset=["score"])
    c = d[cost] if cost in d else d["merge_wall_s"] + d["eval_wall_s"]
    assert "m0" not in got.index and len(got) == len(d)
    for i, row in d.iterrows():
        others = d.drop(index=i)
        oc = c.drop(index=i)
        dom = ((others.score >= row.score) & (oc <= c[i]) & ((others.score > row.score) | (oc < c[i]))).any()
        assert got[row.method] == (not dom)
    with pytest.raises(ValueError, match="cost must be one of"):
        report.pareto(d, "wall")


def test_group_choices_put_the_last_profile_and_the_default_pool_first():
    groups = pd.DataFrame({"suite": ["inthewild", "inthewild", "inthewild", "glue"],
                           "profile": ["quick", "embedded", "embedded", "embedded"],
                           "pool": ["smol", "smol", "wild", "smol"]})  # as run_groups orders them: last written first
    assert report.default_pool("inthewild", "embedded") == "wild"
    assert report.group_choices(groups, "inthewild") == (["quick", "embedded"], ["smol"])
    # the profile's default pool (wild) comes before smol although smol was written later
    assert report.group_choices(groups, "inthewild", "embedded") == (["quick", "embedded"], ["wild", "smol"])
    assert report.group_choices(groups, "openllm") == ([], [])


def test_reproduce_command_quotes_values():
    cmd = report.reproduce_command("ties", "glue", "paper", "my pool", json.dumps({"lambda": 0.2, "w": [1, 2]}), 3)
    assert cmd == "mergebench eval --method ties --suite glue --profile paper --pool 'my pool' " \
                  "--set lambda=0.2 --set 'w=[1, 2]' --seed 3"


def test_results_dir_from_args_and_env(monkeypatch):
    from mergebench.leaderboard import queries

    monkeypatch.setenv("MERGEBENCH_RESULTS", "/x/env")
    assert queries.results_dir(["--results", "/x/arg"]) == Path("/x/arg")
    assert queries.results_dir([]) == Path("/x/env")
    monkeypatch.delenv("MERGEBENCH_RESULTS")
    assert queries.results_dir([]) == Path("results")


# ------------------------------------------------------------------------------ reports


def test_report_formats_carry_the_same_ranking(syn, tmp_path):
    con = report.connect(syn)
    want = report.run_ranking(con, report.Filters(suite="inthewild", profile="embedded", pool="smol"))
    csv = report.write_report(syn, suite="inthewild", fmt="csv", out=tmp_path / "r.csv")
    t = pd.read_csv(tmp_path / "r.csv")
    assert (tmp_path / "r.csv").read_text() == csv
    run = t[t["source"] == "run"]
    assert run["method"].tolist() == want["method"].tolist()
    np.testing.assert_allclose(run["score"], want["score"])
    assert (t["source"] == "paper").any() and set(t["suite"]) == {"inthewild"}
    md = report.write_report(syn, suite="inthewild", fmt="md")
    order = [md.index(f"| {m} |") for m in want["method"]]
    assert order == sorted(order) and "inthewild: published numbers" in md
    html = report.write_report(syn, fmt="html")
    assert html.startswith("<!doctype html>") and "<table" in html and "karcher" in html
    with pytest.raises(ValueError, match="fmt"):
        report.write_report(syn, fmt="xlsx")


def test_report_plots(syn, tmp_path):
    pytest.importorskip("matplotlib")
    report.write_report(syn, fmt="md", plots_dir=tmp_path / "plots")
    pngs = sorted((tmp_path / "plots").glob("*.png"))
    assert [p.name for p in pngs] == ["scaling_inthewild_embedded_smol.png", "tvnorm_inthewild_embedded_smol.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_report_on_committed_paper_rows():
    md = report.write_report(ROOT / "results", suite="glue", fmt="md")
    assert "glue: published numbers" in md and "| merging loss % |" in md and "merging_loss_pct" not in md


def test_diagnostics_page_reads_the_diagnostics_view(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    diag_mod = pytest.importorskip("mergebench.diagnostics.store")
    synthetic.small_store(tmp_path, methods={"linear": 0.0}, sizes=(2,))
    at = goto(app(tmp_path, monkeypatch), "diagnostics")
    assert "No diagnostics" in at.info[0].value  # empty store: the placeholder
    rows = [{"run_id": "r", "unit_id": "u1", "created_at": pd.Timestamp("2026-01-01", tz="UTC"), "pool": "smol",
             "kind": "weights", "metric": "cosine", "model": a, "model_b": b, "layer": f"layers.{i}",
             "scope": "block", "value": 0.1 * i + (a == b)} for a in ("e1", "e2") for b in ("e1", "e2") for i in range(3)]
    rows += [{"run_id": "r", "unit_id": "u2", "created_at": pd.Timestamp("2026-01-01", tz="UTC"), "pool": "smol",
              "kind": "activations", "metric": "variance", "model": "e1", "layer": f"hidden.{i}", "scope": "layer",
              "value": float(i)} for i in range(4)]
    schema = diag_mod.DIAGNOSTICS_SCHEMA
    for kind in ("weights", "activations"):
        g = [r for r in rows if r["kind"] == kind]
        d = tmp_path / "diagnostics" / "pool=smol" / f"kind={kind}"
        d.mkdir(parents=True)
        cols = {f.name: pa.array([r.get(f.name) for r in g], f.type) for f in schema}
        pq.write_table(pa.table(cols, schema=schema), d / "diag-r-x.parquet")
    at = goto(app(tmp_path, monkeypatch), "diagnostics")
    overview = at.dataframe[0].value
    assert set(zip(overview["kind"], overview["metric"])) == {("weights", "cosine"), ("activations", "variance")}
    assert overview.set_index("metric").loc["cosine", "rows"] == 12
    assert len(at.get("vega_lite_chart")) == 1 and at.selectbox(key="diag_kind").value == "activations"
    at.selectbox(key="diag_kind").set_value("weights").run()  # pairwise metric: a model x model heatmap
    assert not at.exception and at.selectbox(key="diag_metric").value == "cosine"
    assert len(at.get("vega_lite_chart")) == 1


def test_diagnostics_page_shows_the_failure_statistics(tmp_path, monkeypatch):
    from mergebench.diagnostics import anova_by_factor, pearson, stats_rows
    from mergebench.diagnostics.store import DiagUnit, write_diagnostics

    synthetic.small_store(tmp_path, methods={"linear": 0.0}, sizes=(2,))
    data = {"merging_loss": [-1.0, -2.0, -30.0, -35.0, -1.5, -28.0], "task": list("aabbab"), "method": list("xyxyyx")}
    anova = anova_by_factor(data, factors=("task", "method"))
    r = pearson([0.9, 0.8, 0.2, 0.1], [-1.0, -2.0, -30.0, -35.0], metric="hidden_sim")
    write_diagnostics(DiagUnit("stats", pool="smol", subset=("e1", "e2")), stats_rows(anova, {"hidden_sim": r}),
                      run_id="20260101T000000Z-abcdef", results_dir=tmp_path)
    at = goto(app(tmp_path, monkeypatch), "diagnostics")
    assert not at.exception
    stats = at.dataframe[1].value.set_index("test")
    assert stats.loc["by_task", "statistic"] == pytest.approx(anova["task"].f)
    assert stats.loc["by_method", "p"] == pytest.approx(anova["method"].p)
    assert stats.loc["hidden_sim", "statistic"] == pytest.approx(r.r) and stats.loc["hidden_sim", "n"] == 4
    assert set(stats["scope"]) == {"all methods"}


def test_glue_style_suites_are_ranked_by_merging_loss(tmp_path, monkeypatch):
    """Pairwise merges scored on their members' tasks: the ranking is by seed 004's merging loss,
    recomputed here from the written values."""
    common = dict(suite="glue", suite_version="1", profile="embedded", pool="smol", base_model="b", seed=0,
                  doc_index_hash="h")
    run = "20260101T000000Z-abcdef"
    own = {"ea": ("mb_capitals", 0.80), "eb": ("mb_elements", 0.60), "ec": ("mb_antonyms", 0.90)}
    store.write_unit(store.Unit(role="base", subset=("b",), **common),
                     [{"task": t, "metric": "acc", "value": 0.5} for t, _ in own.values()], run_id=run,
                     results_dir=tmp_path)
    for e, (t, v) in own.items():
        store.write_unit(store.Unit(role="expert", subset=(e,), **common), [{"task": t, "metric": "acc", "value": v}],
                         run_id=run, results_dir=tmp_path)
    kept = {"ties": 0.9, "linear": 0.7}  # share of each expert's score the merge keeps
    expected = {}
    for m, k in kept.items():
        losses = []
        for pair in (("ea", "eb"), ("ea", "ec"), ("eb", "ec")):
            vals = [{"task": own[e][0], "metric": "acc", "value": own[e][1] * (k + 0.01 * i)} for i, e in enumerate(pair)]
            store.write_unit(store.Unit(role="merged", subset=pair, method=m, method_version="1", **common), vals,
                             run_id=run, results_dir=tmp_path)
            losses += [((k + 0.01 * i) - 1) * 100 for i in range(2)]
        expected[m] = np.mean(losses)  # every unit has two tasks: the unit mean of means is the plain mean
    with report.connect(tmp_path) as con:
        rank = report.ranking(con, report.Filters(suite="glue", profile="embedded"))
    run_rows = rank[rank["source"] == "run"].set_index("method")
    assert list(run_rows.index) == ["ties", "linear"]
    for m, v in expected.items():
        assert run_rows.loc[m, "merging_loss_pct"] == pytest.approx(v)
        assert run_rows.loc[m, "ci_low"] - 1e-9 <= v <= run_rows.loc[m, "ci_high"] + 1e-9
    assert run_rows["score"].isna().all() and run_rows["p_gt_base"].isna().all()
    at = goto(app(tmp_path, monkeypatch), "ranking")
    assert any("merging loss" in m.value for m in at.markdown)


def test_url_preselects_page_and_filters(monkeypatch):
    """``?page=scaling&suite=glue`` opens that page on that suite (shareable links); the default
    suite is the one written last."""
    monkeypatch.setenv("MERGEBENCH_RESULTS", str(ROOT / "results"))
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["page"] = "scaling"
    at.query_params["suite"] = "inthewild"
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    assert at.radio(key="page").value == "scaling" and at.selectbox(key="suite").value == "inthewild"
    assert "suite **inthewild**" in at.caption[0].value
    latest = store.sql("SELECT suite FROM results ORDER BY created_at DESC LIMIT 1", ROOT / "results")["suite"][0]
    assert app(ROOT / "results", monkeypatch).selectbox(key="suite").value == latest


def test_disk_cache_returns_the_computed_tables(syn, tmp_path, monkeypatch):
    """A restarted server reads the ranking page's tables from disk: the same frames, digit for digit."""
    from mergebench.leaderboard import queries

    monkeypatch.setenv(queries.DISK_CACHE_ENV, str(tmp_path / "cache"))
    sig = queries.signature(str(syn))
    f = {"suite": "inthewild", "profile": "embedded", "pool": "smol", "n": None, "families": None,
         "data_free_only": False}
    with report.connect(syn) as con:
        want = report.ranking(con, report.Filters(**f))
    calls = []

    def compute():
        calls.append(1)
        return want

    first = queries._disk("ranking", str(syn), sig, (sorted(f.items()), 0), compute)
    again = queries._disk("ranking", str(syn), sig, (sorted(f.items()), 0), compute)
    assert len(calls) == 1 and len(list((tmp_path / "cache").glob("ranking-*.parquet"))) == 1
    pd.testing.assert_frame_equal(again, want.reset_index(drop=True))
    pd.testing.assert_frame_equal(first, want)
    other = queries._disk("ranking", str(syn), sig + (("x", 1),), (sorted(f.items()), 0), compute)
    assert len(calls) == 2 and other is want  # another store state: computed again
