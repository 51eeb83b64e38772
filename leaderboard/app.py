"""mergebench leaderboard: `streamlit run leaderboard/app.py -- --results DIR` (or `mergebench leaderboard`).

Read-only over the results store: every number comes from DuckDB views (mergebench.report), the
same computation `mergebench report` writes as static tables. Pages are picked in the sidebar;
`?page=<key>` in the URL opens one directly.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # `streamlit run` puts only leaderboard/ on the path
    sys.path.insert(0, str(_ROOT))

import pandas as pd  # noqa: E402
import streamlit as st  # noqa: E402

from leaderboard import charts, queries  # noqa: E402

PAGES = {"ranking": "Ranking", "scaling": "Scaling curves", "tasks": "Per-task detail",
         "diagnostics": "Diagnostics", "methods": "Method pages", "pareto": "Pareto view"}
ALL = "(all)"
SOURCE_LABEL = {"run": "reproduced", "paper": "published"}
SOURCE_BG = {"reproduced": "background-color: #dbeafe; color: #1e3a8a; font-weight: 600",
             "published": "background-color: #ffedd5; color: #9a3412; font-weight: 600"}

st.set_page_config(page_title="mergebench leaderboard", layout="wide")
st.markdown("<style>div.block-container{padding-top:2rem} [data-testid='stMetricValue']{font-size:1.4rem}"
            "</style>", unsafe_allow_html=True)

RESULTS = str(queries.results_dir(sys.argv[1:]))
SIG = queries.signature(RESULTS)

# ------------------------------------------------------------------------------ sidebar
keys = list(PAGES)
want = st.query_params.get("page", "ranking")
page = st.sidebar.radio("Page", keys, index=keys.index(want) if want in keys else 0, format_func=PAGES.get,
                        key="page")
if st.query_params.get("page") != page:
    st.query_params["page"] = page

opts = queries.choices(RESULTS, SIG)
st.sidebar.markdown("### Filters")


def _pick(label, values, key, default=None):
    """A sidebar filter; ``?suite=...&profile=...&pool=...`` in the URL preselects it (shareable links)."""
    vals = [ALL] + list(values)
    default = st.query_params.get(key, default)
    idx = vals.index(default) if default in vals else 0
    v = st.sidebar.selectbox(label, vals, index=idx, key=key)
    return None if v == ALL else v


# default: a suite with reproduced rows, else the seed 000 suite (the richest published tables)
_default_suite = next(iter(opts["run_suite"]), "openllm" if "openllm" in opts["suite"] else next(iter(opts["suite"]), None))
suite = _pick("Suite", opts["suite"], "suite", default=_default_suite)
profile = _pick("Profile", opts["profile"], "profile")
pool = _pick("Pool / base model", opts["pool"], "pool")
n = _pick("Merge size n", opts["n"], "n") if page not in ("scaling", "tasks") else None
info = queries.method_info()
families = st.sidebar.multiselect("Method family", sorted(info["family"].unique()), key="families")
data_free = st.sidebar.checkbox("Data-free methods only", key="data_free")
filters = dict(suite=suite, profile=profile, pool=pool, n=n, families=tuple(families) or None,
               data_free_only=data_free)
st.sidebar.caption(f"Results: `{RESULTS}` (read-only)")
if st.sidebar.button("Reload results"):
    st.cache_data.clear()
    st.cache_resource.clear()
    st.rerun()

st.title("mergebench leaderboard")
st.caption(f"{PAGES[page]} · suite **{suite or 'all'}** · profile **{profile or 'all'}** · pool "
           f"**{pool or 'all'}**" + (f" · n = **{n}**" if n is not None else ""))

LABELS = {"rank": "rank", "score": "score", "ci": "95% CI", "ranks": "rank range", "p_best": "P(best)",
          "p_gt_base": "P(>base)", "gain_vs_base_pp": "Δ base (pp)", "p_gt_best_expert": "P(>best exp.)",
          "gain_vs_best_expert_pp": "Δ best exp. (pp)", "merge_wall_s": "merge s", "merge_peak_gib": "peak GiB", "eval_wall_s": "eval s",
          "merging_loss_pct": "merging loss %", "n_units": "units", "mean_score": "mean score"}
HELP = {"score": "mean headline score over the selected units (published: the paper's reported average)",
        "ci": "95% percentile bootstrap interval of the mean (units resampled)",
        "ranks": "95% bootstrap interval of the rank (shared subsets resampled jointly)",
        "p_best": "share of bootstrap resamples in which the method ranks first",
        "p_gt_base": "share of merged units scoring above the base model",
        "gain_vs_base_pp": "mean gain over the base model, percentage points",
        "p_gt_best_expert": "share of merged units above the pool's best single expert",
        "gain_vs_best_expert_pp": "mean gain over the pool's best single expert, percentage points",
        "merge_wall_s": "mean merge wall time per unit (provenance)", "merge_peak_gib": "max peak RSS of a merge",
        "eval_wall_s": "mean evaluation (scoring) wall time per unit (provenance)",
        "source": "reproduced here (source=run) or transcribed from a seed paper (source=paper)",
        "tuned": "how the parameters were chosen: on the validation split by `mergebench sweep --tune` (trials "
                 "tried / grid size, validation documents), or default (given, not tuned)"}
NUM = {"score": "{:.4f}", "mean": "{:.4f}", "std": "{:.4f}", "value": "{:.4f}", "mean_score": "{:.4f}",
       "p_best": "{:.2f}", "p_gt_base": "{:.2f}", "p_gt_best_expert": "{:.2f}", "gain_vs_base_pp": "{:+.2f}",
       "gain_vs_best_expert_pp": "{:+.2f}", "merge_wall_s": "{:.2f}", "merge_peak_gib": "{:.2f}",
       "eval_wall_s": "{:.1f}", "merging_loss_pct": "{:+.1f}", "rank": "{:.0f}", "n_units": "{:.0f}", "units": "{:.0f}", "n": "{:.0f}",
       "p": "{:.2g}", "statistic": "{:.3f}"}


def table(d: pd.DataFrame, **kw):
    """A dataframe with blank (not 'None') missing cells, fixed number formats and tinted sources."""
    d = d.dropna(axis=1, how="all").reset_index(drop=True)
    text = [c for c in d if d[c].dtype == object or pd.api.types.is_string_dtype(d[c])]
    d[text] = d[text].astype(object).where(d[text].notna(), "")  # the grid shows a missing string as 'None'
    sty = d.style.format({k: v for k, v in NUM.items() if k in d and pd.api.types.is_numeric_dtype(d[k])},
                         na_rep="").format(na_rep="", subset=[c for c in d if not pd.api.types.is_numeric_dtype(d[c])])
    if "source" in d:
        sty = sty.map(lambda v: SOURCE_BG.get(v, ""), subset=["source"])
    cfg = {k: st.column_config.Column(LABELS.get(k, k), help=HELP.get(k)) for k in d if k in LABELS or k in HELP}
    st.dataframe(sty, hide_index=True, width="stretch", column_config=cfg, **kw)


# ------------------------------------------------------------------------------- pages
def page_ranking():
    rank = queries.ranking(RESULTS, SIG, filters)
    run = rank[rank["source"] == "run"]
    c = st.columns(4)
    c[0].metric("methods ranked", int(run["method"].nunique()) if len(run) else 0)
    c[1].metric("merged units", int(run["n_units"].sum()) if len(run) else 0)
    c[2].metric("leader", run.iloc[0]["method"] if len(run) else "—")
    c[3].metric("published rows", int((rank["source"] == "paper").sum()))
    if rank.empty:
        st.info("No rows match these filters.")
        return
    by_loss = len(run) > 0 and "merging_loss_pct" in run and run["score"].isna().all()
    headline = ("the mean **merging loss** (seed 004 eq. 1: % of each task's own expert's score kept or lost, "
                "0 = none lost, higher is better; merges are scored on their members' tasks)" if by_loss else
                "the mean **headline score** (unweighted mean of each task's headline metric)")
    st.markdown(f"Methods ranked by {headline} "
                "over the selected merged units; CI = 95 % bootstrap, rank interval = 95 % bootstrap of the rank. "
                ":blue-background[reproduced] rows were measured here (`source=run`); "
                ":orange-background[published] rows are the seeds' printed numbers (`source=paper`), shown "
                "for comparison and never ranked.")
    shown = rank.assign(source=rank["source"].map(SOURCE_LABEL))
    runs, pubs = shown[shown["source"] == "reproduced"].copy(), shown[shown["source"] == "published"]
    st.subheader("Reproduced (source=run)")
    if runs.empty:
        st.info("No reproduced rows for these filters yet: run `mergebench eval` (results land in the store).")
    else:
        fmt = ("{:+.1f}" if by_loss else "{:.4f}").format
        runs.insert(runs.columns.get_loc("ci_low"), "ci", runs["ci_low"].map(fmt) + " – " + runs["ci_high"].map(fmt))
        runs.insert(runs.columns.get_loc("rank_low"), "ranks", runs["rank_low"].astype("string") + " – "
                    + runs["rank_high"].astype("string"))
        marks = runs[["method", "params"]].merge(queries.tuned(RESULTS, SIG, filters), how="left")["tuned"]
        runs.insert(runs.columns.get_loc("method") + 1, "tuned", marks.fillna("default").to_numpy())
        table(runs.drop(columns=["ci_low", "ci_high", "rank_low", "rank_high"]),
              height=min(640, 38 + 35 * len(runs)))
    st.subheader("Published (source=paper)")
    if pubs.empty:
        st.info("The seed papers print no comparable numbers for these filters.")
    else:
        lead = ["source", "table", "pool", "n", "method", "label"]
        table(pubs[lead + [c for c in pubs.columns if c not in lead]], height=min(520, 38 + 35 * len(pubs)))
    if len(run):
        st.subheader(f"{'Merging loss (%)' if by_loss else 'Score'} with 95 % bootstrap CI (reproduced)")
        shown_ci = rank.assign(score=rank["merging_loss_pct"]) if by_loss else rank
        st.altair_chart(charts.ranking_ci(shown_ci, "merging loss %" if by_loss else "headline score"), width="stretch")


def page_scaling():
    d, pap = queries.scaling(RESULTS, SIG, filters)
    if d.empty and pap.empty:
        st.info("No scaling data for these filters.")
        return
    st.markdown("Headline score vs the number of merged models, mean ± 1 std over the subsets of each size "
                "(as seed 000 Fig. 1 and seed 001 Figs. 3, 6). Single experts appear at n = 1, the base model "
                "as the dashed line; dashed diamonds are published averages (seed 000 Tables 1, 3-5).")
    st.altair_chart(charts.scaling(d, pap), width="stretch")
    table(d)
    norms = queries.task_vector_norms(RESULTS, SIG, filters)
    st.subheader("Task-vector norm vs n")
    if norms.empty:
        st.info("No unit of this selection recorded its task-vector norm "
                "(`mergebench eval` measures it for every merged and expert unit).")
        return
    st.markdown("How far each merge moves from the base, ‖θ_merged − θ_base‖₂ over all weights, mean ± 1 std "
                "over the subsets of each size (seed 001 Fig. 4); single experts at n = 1.")
    st.altair_chart(charts.scaling(norms, y_title="‖θ − θ_base‖₂"), width="stretch")


def page_tasks():
    d = queries.per_task(RESULTS, SIG, filters)
    if d.empty:
        st.info("No reproduced per-task rows for these filters yet; showing the published per-task numbers.")
        pap = queries.paper_per_task(RESULTS, SIG, filters)
        if pap.empty:
            return
        tables = sorted(pap["table"].unique())
        tab = st.selectbox("Published table", tables, key="paper_table")
        p = pap[pap["table"] == tab]
        for pool_, g in p.groupby("pool", sort=True):
            st.subheader(f"{tab}: {pool_} (source=paper)")
            g = g.assign(method=g["method"] + " · n=" + g["n"].astype(str))
            st.altair_chart(charts.heatmap(g), width="stretch")
        table(p.assign(source="published"))
        return
    st.subheader("Method × task (mean headline metric over all sizes)")
    st.altair_chart(charts.heatmap(d), width="stretch")
    tasks = sorted(d["task"].unique())
    task = st.selectbox("Task", tasks, key="task")
    st.subheader(f"{task}: score vs n")
    st.altair_chart(charts.task_vs_n(d[d["task"] == task]), width="stretch")
    table(d[d["task"] == task])


def page_diagnostics():
    from mergebench import report

    con = queries.connection(RESULTS, SIG)
    diag = report.diagnostics(con, pool)
    if diag is None:
        st.info("No diagnostics in this store yet (`mergebench diagnose` writes them under results/diagnostics). "
                "This page then shows layer-wise activation variance and effective rank, pairwise cosine "
                "heatmaps of task vectors and HiddenSim / MDS heatmaps, per pool (task-vector norm vs n is "
                "on the Scaling page).")
        table(pd.DataFrame({"planned view": ["activation variance per layer", "effective rank per layer",
                                             "pairwise cosine of task vectors", "HiddenSim / MDS"]}))
        return
    st.markdown("Diagnostics stored for this selection (rows per pool, kind, metric and scope):")
    table(diag)
    stats = report.diagnostic_stats(con, pool)
    if not stats.empty:
        st.subheader("Why merges fail: ANOVA of merging loss and correlations with it (`mergebench stats`)")
        st.caption("by_task / by_method: one-way ANOVA F of the per-task merging loss (seed 004 Table 3); "
                   "other rows: Pearson r of a pairwise diagnostic (pairwise merges) or of MDS (merge of all, "
                   "best method) with the merging loss (Tables 4-5). p < 0.05 is significant.")
        table(stats)
    kinds = sorted(k for k in diag["kind"].unique() if k != "stats")
    if not kinds:
        return
    kind = st.selectbox("Kind", kinds, key="diag_kind")
    metric = st.selectbox("Metric", sorted(diag[diag["kind"] == kind]["metric"].unique()), key="diag_metric")
    v = report.diagnostic_values(con, kind, metric, pool)
    pairs = v[v["model_b"].notna()]
    if not pairs.empty:
        st.subheader(f"{metric}: pairwise (mean over layers)")
        h = pairs.groupby(["model", "model_b"], as_index=False)["value"].mean()
        st.altair_chart(charts.heatmap(h.rename(columns={"model": "method", "model_b": "task"})), width="stretch")
    curves = v[v["model_b"].isna() & v["layer_index"].notna()]
    if not curves.empty:
        st.subheader(f"{metric} by layer")
        st.altair_chart(charts.layer_curve(curves), width="stretch")


def page_methods():
    names = sorted(info["method"])
    ranked = queries.ranking(RESULTS, SIG, filters)["method"].tolist()
    first = next((m for m in ranked if m in names), names[0])
    method = st.selectbox("Method", names, index=names.index(first), key="method")
    from mergebench.methods import get_method

    spec = get_method(method).describe()
    st.header(method)
    st.markdown(f"**{spec.get('summary', '')}**")
    c = st.columns(4)
    c[0].metric("version", spec.get("version"))
    c[1].metric("family", info.set_index("method").loc[method, "family"])
    c[2].metric("experts", f"{spec.get('min_experts')}–{spec.get('max_experts') or '∞'}")
    c[3].metric("stochastic", "yes" if spec.get("stochastic") else "no")
    st.markdown(f"**Citation.** {spec.get('citation') or '—'}")
    st.markdown("**Parameters**")
    table(pd.DataFrame(spec.get("params") or [], columns=["name", "type", "default", "range", "per_expert", "help"])
          .astype(str))
    st.markdown("**Configurations behind the reproduced rows** and the command that recomputes each")
    rows = queries.method_rows(RESULTS, SIG, method)
    if rows.empty:
        st.info("No reproduced rows for this method yet.")
    else:
        table(rows.drop(columns=["command"]).assign(sizes=rows["sizes"].map(lambda s: ", ".join(map(str, s))),
                                                    run_ids=rows["run_ids"].map(lambda s: ", ".join(s))))
        for cmd in rows["command"].unique():
            st.code(cmd, language="bash")
    pap = queries.paper_method_rows(RESULTS, SIG, method)
    if not pap.empty:
        st.markdown("**Published rows** (`source=paper`)")
        table(pap)
    with st.expander("Full spec (JSON)"):
        st.code(json.dumps(spec, indent=1, default=str), language="json")


def page_pareto():
    from mergebench import report

    rank = queries.ranking(RESULTS, SIG, filters)
    cost = st.radio("cost", list(report.COSTS), format_func=lambda c: report.COSTS[c], horizontal=True)
    d = report.pareto(rank, cost)
    if d.empty:
        st.info("No reproduced rows with this cost (provenance) for these filters.")
        return
    st.markdown(f"Quality (mean headline score) vs {report.COSTS[cost]}, from provenance. "
                "Red points are Pareto-optimal: no other method is both better and cheaper.")
    st.altair_chart(charts.pareto(d, cost, report.COSTS[cost]), width="stretch")
    table(d[["method", "params", "score", "merge_wall_s", "eval_wall_s", "merge_peak_gib", "pareto"]].sort_values(cost))


{"ranking": page_ranking, "scaling": page_scaling, "tasks": page_tasks, "diagnostics": page_diagnostics,
 "methods": page_methods, "pareto": page_pareto}[page]()
