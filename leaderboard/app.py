"""mergebench leaderboard: `streamlit run leaderboard/app.py -- --results DIR` (or `mergebench leaderboard`).

Read-only over the results store: every number comes from DuckDB views (mergebench.report), the
same computation `mergebench report` writes as static tables. Pages are picked in the sidebar;
every sidebar filter is mirrored into the URL (``?page=ranking&suite=glue&n=2 ...``), so a shared
link opens the same page; a URL value that matches nothing in the store is reported, not ignored.
"""

from __future__ import annotations

import importlib
import json
import sys

import pandas as pd
import streamlit as st
from mergebench.leaderboard import queries, specs

from mergebench import report


def charts():
    """The Altair charts (:mod:`mergebench.leaderboard.charts`), imported on first use: the ranking
    page, which most readers open first, draws its one chart without Altair (:mod:`specs`)."""
    return importlib.import_module("mergebench.leaderboard.charts")


PAGES = {"ranking": "Ranking", "scaling": "Scaling curves", "tasks": "Per-task detail",
         "diagnostics": "Diagnostics", "methods": "Method pages", "pareto": "Pareto view", "fidelity": "Fidelity"}
ALL = "(all)"
SEED = report.BOOT_SEED

st.set_page_config(page_title="mergebench leaderboard", layout="wide")
st.markdown("<style>div.block-container{padding-top:2rem;padding-left:3rem;padding-right:3rem} [data-testid='stMetricValue']{font-size:1.4rem}"
            "</style>", unsafe_allow_html=True)

RESULTS = str(queries.results_dir(sys.argv[1:]))
SIG = queries.signature(RESULTS)
NOTICES: list[str] = []  # URL values that match nothing, shown above the page


# ------------------------------------------------------------------------------ sidebar
def _mirror(key: str, value) -> None:
    """Write a filter's value into the URL (removed when it is the 'everything' choice)."""
    if value is None or value is False or value == []:
        if key in st.query_params:
            del st.query_params[key]
        return
    if isinstance(value, list):
        if st.query_params.get_all(key) != [str(v) for v in value]:
            st.query_params[key] = [str(v) for v in value]
    elif st.query_params.get(key) != ("true" if value is True else str(value)):
        st.query_params[key] = "true" if value is True else str(value)


def _no_match(key: str, wanted, values, shown) -> None:
    have = ", ".join(map(str, values)) or "none"
    NOTICES.append(f"`?{key}={wanted}` in the link matches nothing in this store ({key} values here: {have}); "
                   f"showing **{shown}** instead.")


def _init(key: str, values: list, default, *, fmt=str) -> None:
    """On a session's first run (or when the options changed), preselect a widget from the URL."""
    if key in st.session_state and st.session_state[key] in values:
        return
    want = st.query_params.get(key)
    pick = default if default in values else (values[0] if values else None)
    if want is not None and key not in st.session_state:
        match = next((v for v in values if str(v) == want), None)
        if match is None:
            _no_match(key, want, [v for v in values if v != ALL], fmt(pick))
        else:
            pick = match
    st.session_state[key] = pick


def _select(label: str, values: list, key: str, default=None, *, allow_all: bool = False, fmt=str, where=None):
    """A filter selectbox mirrored into ``?key=value`` (ALL = no filter)."""
    vals = ([ALL] if allow_all else []) + list(values)
    _init(key, vals, default if default is not None else vals[0], fmt=fmt)
    v = (where or st.sidebar).selectbox(label, vals, key=key, format_func=fmt)
    _mirror(key, None if v == ALL else v)
    return None if v == ALL else v


keys = list(PAGES)
_init("page", keys, "ranking", fmt=PAGES.get)
page = st.sidebar.radio("Page", keys, key="page", format_func=PAGES.get)
_mirror("page", page)

opts = queries.choices(RESULTS, SIG)
groups = queries.run_groups(RESULTS, SIG)
st.sidebar.markdown("### Filters")
if not opts["suite"]:
    st.title("mergebench leaderboard")
    st.info(f"The results store `{RESULTS}` holds no results and no published tables yet: run `mergebench eval`.")
    st.stop()

# one suite at a time: a ranking never pools suites (their tasks, references and sizes differ).
# Default: the suite written last, else the Fisher-Rao merging paper's suite (the richest published tables).
_default_suite = next(iter(opts["run_suite"]), "openllm" if "openllm" in opts["suite"] else opts["suite"][0])
suite = _select("Suite", opts["suite"], "suite", _default_suite)
g = groups[groups["suite"] == suite]
# profile and pool: those with reproduced rows in this suite, ordered by report.group_choices (the
# one written last first, the profile's default pool first when it has rows)
profile = _select("Profile", report.group_choices(groups, suite)[0], "profile") if len(g) else None
g = g[g["profile"] == profile]
pool = _select("Pool / base model", report.group_choices(groups, suite, profile)[1], "pool") if len(g) else None
g = g[g["pool"] == pool]
sizes = sorted({int(n) for s in g["sizes"] for n in s}) if len(g) else []
n = (_select("Merge size n", sizes, "n", ALL, allow_all=True) if page not in ("scaling", "tasks", "fidelity") and sizes
     else None)
info = queries.method_info()
family_opts = sorted(info["family"].unique())
if "families" not in st.session_state:
    want = st.query_params.get_all("families")
    unknown = [w for w in want if w not in family_opts]
    if unknown:
        _no_match("families", ",".join(unknown), family_opts, "every family" if len(unknown) == len(want)
                  else ", ".join(w for w in want if w in family_opts))
    st.session_state["families"] = [w for w in want if w in family_opts]
families = st.sidebar.multiselect("Method family", family_opts, key="families")
_mirror("families", list(families))
if "data_free" not in st.session_state:
    st.session_state["data_free"] = st.query_params.get("data_free", "").lower() in ("1", "true", "yes")
data_free = st.sidebar.checkbox("Data-free methods only", key="data_free")
_mirror("data_free", bool(data_free))
filters = dict(suite=suite, profile=profile, pool=pool, n=n, families=tuple(families) or None,
               data_free_only=data_free)
st.sidebar.caption(f"Results: `{RESULTS}` (read-only)")
if st.sidebar.button("Reload results"):
    st.cache_data.clear()
    st.cache_resource.clear()
    report.method_catalog.cache_clear()  # a plugin installed meanwhile is listed and labelled
    st.rerun()

st.title("mergebench leaderboard")
st.caption(f"{PAGES[page]} · suite **{suite}** · profile **{profile or '—'}** · pool **{pool or '—'}**"
           + (f" · n = **{n}**" if n is not None else ""))
for note in NOTICES:
    st.warning(note, icon="⚠️")

LABELS = {**report.COLUMN_LABELS, "id": "finding", "paper_where": "paper, where", "check": "test", "estimate": "estimate",
          "n_obs": "n", "verdict": "verdict", "rank": "rank", "ranks": "ranks", "gain_vs_best_expert_pp": "Δ best (pp)",
          "p_gt_best_expert": "P(>best)", "mean_score": "mean score", "params_json": "params (JSON)",
          "tuned": "tuned", "data": "data"}
HELP = {"data": "calibrated: a data-dependent method, merged after seeing validation texts (cost includes the "
                "calibration; the sidebar's 'Data-free methods only' hides it)",
        "rank_label": "rank by the point estimate; '=k' marks an exact tie (same rank, shared)",
        "score": "mean headline score over the selected units (published: the paper's reported average)",
        "merging_loss_pct": "mean merging loss over the selected units: % of each task's own expert's score kept "
                            "(0 = nothing lost); the ranking metric of this suite",
        "ci": "95% percentile bootstrap interval of the mean (units resampled)",
        "ranks": "95% bootstrap interval of the rank (shared subsets resampled jointly)",
        "p_best": "share of bootstrap resamples in which the method ranks first (a tie for first splits the "
                  "resample evenly, so P(best) sums to 1)",
        "p_gt_base": "share of merged units scoring above the base model",
        "gain_vs_base_pp": "mean gain over the base model, percentage points",
        "p_gt_best_expert": "share of merged units above the pool's best single expert",
        "gain_vs_best_expert_pp": "mean gain over the pool's best single expert, percentage points",
        "merge_wall_s": "mean merge wall time per unit (provenance)", "merge_peak_gib": "max peak RSS of a merge",
        "eval_wall_s": "mean evaluation (scoring) wall time per unit (provenance)",
        "n_units": "merged units (subsets) averaged",
        "paper": "the published value for the same method, configuration (the suite's paper hyperparameters) and "
                 "merge size n, from the papers' own models (a range over them); pick one n to see it",
        "average": "unweighted mean over the task columns (as the Open LLM Leaderboard averages benchmarks)",
        "tuned": "how the parameters were chosen: on the validation split by `mergebench sweep --tune` (trials "
                 "tried / grid size, validation documents), or default (given, not tuned)"}
NUM = {"score": "{:.4f}", "mean": "{:.4f}", "std": "{:.4f}", "value": "{:.4f}", "mean_score": "{:.4f}",
       "p_best": "{:.2f}", "p_gt_base": "{:.2f}", "p_gt_best_expert": "{:.2f}", "gain_vs_base_pp": "{:+.2f}",
       "gain_vs_best_expert_pp": "{:+.2f}", "merge_wall_s": "{:.2f}", "merge_peak_gib": "{:.2f}",
       "eval_wall_s": "{:.1f}", "merging_loss_pct": "{:+.1f}", "average": "{:.4f}", "p": "{:.2g}",
       "statistic": "{:.3f}", "estimate": "{:+.3g}"}
#: Pixel widths of the ranking table's columns: the in-the-wild table with every column (data badge
#: included) is 1,096 px, so it fits a 1500 px window beside the sidebar (a 1,102 px box) without a
#: horizontal scrollbar.
WIDTHS = {"rank_label": 44, "method": 126, "params_label": 112, "score": 72, "merging_loss_pct": 96, "ci": 120,
          "ranks": 64, "p_best": 64, "p_gt_base": 72, "gain_vs_base_pp": 86, "gain_vs_best_expert_pp": 86,
          "merge_wall_s": 66, "eval_wall_s": 60, "n_units": 50, "paper": 150, "tuned": 90,
          "data": 74}


def _integral(s: pd.Series) -> bool:
    v = s.dropna()
    return pd.api.types.is_float_dtype(s) and len(v) > 0 and bool((v == v.round()).all())


def table(d: pd.DataFrame, *, help_: dict | None = None, widths: dict | None = None, **kw):
    """A dataframe with blank (not 'None') missing cells, human labels, fixed number formats and
    integers shown as integers. Numbers are formatted by the grid itself (printf formats of its
    number columns, so they stay numbers and sort as numbers; no pandas Styler, whose import and
    rendering cost the first page load several tenths of a second)."""
    d = d.dropna(axis=1, how="all").reset_index(drop=True)
    text = [c for c in d if d[c].dtype == object or pd.api.types.is_string_dtype(d[c])]
    d[text] = d[text].astype(object).where(d[text].notna(), "")  # the grid shows a missing string as 'None'
    fmt = {k: v for k, v in NUM.items() if k in d and pd.api.types.is_numeric_dtype(d[k])}
    fmt.update({c: "{:.0f}" for c in d if c not in fmt and _integral(d[c])})
    # the grid draws a missing number as a grey 'None' whatever its format says: a numeric column with
    # gaps is shown as its formatted text instead (blank where missing)
    for c in [c for c in d if pd.api.types.is_numeric_dtype(d[c]) and d[c].isna().any()]:
        f = fmt.pop(c, "{:.4g}")
        d[c] = [("" if pd.isna(v) else f.format(v)) for v in d[c]]
    helps = {**HELP, **(help_ or {})}
    cfg = {}
    for k in d:
        label, width = LABELS.get(k, k), (widths or {}).get(k)
        if k in fmt and pd.api.types.is_numeric_dtype(d[k]):
            cfg[k] = st.column_config.NumberColumn(label, help=helps.get(k), width=width,
                                                   format="%" + fmt[k][2:-1])  # "{:+.2f}" -> "%+.2f"
        elif k in LABELS or k in helps or width:
            cfg[k] = st.column_config.Column(label, help=helps.get(k), width=width)
    st.dataframe(d, hide_index=True, width="stretch", column_config=cfg, **kw)


def _params_help(run: pd.DataFrame) -> str:
    """The params column's hover text: every short label with its full JSON."""
    pairs = dict(zip(run["params_label"], run["params"]))
    return "parameters that differ from the method's defaults; full configuration:\n\n" + "\n".join(
        f"- `{label}`: `{full}`" for label, full in pairs.items())


# ------------------------------------------------------------------------------- pages
def run_table(run: pd.DataFrame, by_loss: bool) -> pd.DataFrame:
    """The reproduced ranking as the app shows it: ranked score first, then its CI, rank interval,
    P(best), P(>base), Δ base, Δ best expert, cost, units and the matching published value."""
    shown = run.assign(ci=[report.ci_text(lo, hi, by_loss) for lo, hi in zip(run["ci_low"], run["ci_high"])],
                       ranks=[report.rank_interval_text(lo, hi) for lo, hi in zip(run["rank_low"], run["rank_high"])])
    marks = run[["method", "params"]].merge(queries.tuned(RESULTS, SIG, filters), how="left")["tuned"]
    shown["tuned"] = marks.fillna("default").to_numpy()
    # the badge of methods that saw calibration data (their cost includes it; "data-free only" hides them)
    calibrated = info.set_index("method")["data_dependent"]
    shown["data"] = ["calibrated" if calibrated.get(m, False) else "" for m in shown["method"]]
    cols = ["rank_label", "method", "params_label", "merging_loss_pct" if by_loss else "score", "ci", "ranks",
            "p_best", "p_gt_base", "gain_vs_base_pp", "gain_vs_best_expert_pp", "merge_wall_s", "eval_wall_s",
            "n_units"] + (["paper"] if (shown["paper"].fillna("") != "").any() else []) \
        + (["tuned"] if (shown["tuned"] != "default").any() else []) \
        + (["data"] if (shown["data"] != "").any() else [])
    return shown[[c for c in cols if c in shown]]


def page_ranking():
    rank = queries.ranking(RESULTS, SIG, filters, SEED)
    run = rank[rank["source"] == "run"]
    pubs = rank[rank["source"] == "paper"]
    c = st.columns(4)
    c[0].metric("methods ranked", int(run["method"].nunique()) if len(run) else 0)
    c[1].metric("merged units", int(run["n_units"].sum()) if len(run) else 0)
    c[2].metric("leader", " = ".join(run[run["rank"] == 1]["variant"]) if len(run) else "—")
    c[3].metric("published rows", len(pubs))
    if rank.empty:
        st.info("No rows match these filters.")
        return
    by_loss = len(run) > 0 and report.ranked_value(run) == "merging_loss_pct"
    headline = ("the mean **merging loss** (the merging-collapse study's eq. 1: % of each task's own expert's "
                "score kept or lost, 0 = none lost, higher is better; merges are scored on their members' tasks)"
                if by_loss else "the mean **headline score** (unweighted mean of each task's headline metric)")
    st.markdown(f"Methods ranked by {headline} over the selected merged units of this suite, profile and pool; "
                "CI = 95 % bootstrap, rank interval = 95 % bootstrap of the rank, `=1` = an exact tie. "
                "Published numbers are listed below and never ranked.")
    st.subheader("Reproduced here")
    if run.empty:
        st.info("No reproduced rows for these filters yet: run `mergebench eval` (results land in the store).")
    else:
        st.caption(report.bootstrap_note(SEED))
        tab_rank, tab_tasks = st.tabs(["Ranking", "Per-task scores"])
        with tab_rank:
            shown = run_table(run, by_loss)
            table(shown, help_={"params_label": _params_help(run)}, widths=WIDTHS,
                  height=min(640, 38 + 35 * len(shown)))
        with tab_tasks:
            st.caption("Mean " + ("merging loss (%)" if by_loss else "headline metric") + " per task over each "
                       "method's merged units, and their unweighted average; click a header to sort.")
            tasks = queries.task_scores(RESULTS, SIG, filters, SEED)
            table(tasks.drop(columns=["rank", "variant"], errors="ignore"),
                  help_={"params_label": _params_help(run)}, height=min(640, 38 + 35 * len(tasks)))
    st.subheader("Published in the papers (never ranked)")
    if pubs.empty:
        st.info("The papers print no comparable numbers for these filters.")
    else:
        lead = ["table", "pool", "n", "method", "label"]
        rest = [c for c in ("score", "merging_loss_pct", "p_gt_base", "gain_vs_base_pp", "p_gt_best_expert",
                            "gain_vs_best_expert_pp", "n_units") if c in pubs]
        table(pubs.assign(table=pubs["table"].map(report.table_title))[lead + rest],
              height=min(520, 38 + 35 * len(pubs)))
    if len(run):
        st.subheader(f"{'Merging loss (%)' if by_loss else 'Score'} with 95 % bootstrap CI (reproduced)")
        shown_ci = run.assign(score=run["merging_loss_pct"]) if by_loss else run
        st.vega_lite_chart(specs.ranking_ci(shown_ci, "merging loss %" if by_loss else "headline score"),
                           width="stretch")


def page_scaling():
    d, pap = queries.scaling(RESULTS, SIG, filters)
    if d.empty and pap.empty:
        st.info("No scaling data for these filters.")
        return
    st.markdown("Headline score vs the number of merged models, mean ± 1 std over the subsets of each size "
                "(error bars; as the Fisher–Rao merging paper's Fig. 1 and the in-the-wild merging study's "
                "Figs. 3, 6). Single experts appear at n = 1, the base model as the dashed line; dashed diamonds "
                "are published averages (Fisher–Rao merging paper, Tables 1, 3-5).")
    st.altair_chart(charts().scaling(d, pap), width="stretch")
    table(d)
    norms = queries.task_vector_norms(RESULTS, SIG, filters)
    st.subheader("Task-vector norm vs n")
    if norms.empty:
        st.info("No unit of this selection recorded its task-vector norm "
                "(`mergebench eval` measures it for every merged and expert unit).")
        return
    st.markdown("How far each merge moves from the base, ‖θ_merged − θ_base‖₂ over all weights, mean ± 1 std "
                "over the subsets of each size (the in-the-wild merging study's Fig. 4); single experts at n = 1.")
    st.altair_chart(charts().scaling(norms, y_title="‖θ − θ_base‖₂"), width="stretch")


def page_tasks():
    d = queries.per_task(RESULTS, SIG, filters)
    if d.empty:
        st.info("No reproduced per-task rows for these filters yet; showing the published per-task numbers.")
        pap = queries.paper_per_task(RESULTS, SIG, filters)
        if pap.empty:
            return
        tables = sorted(pap["table"].unique())
        tab = st.selectbox("Published table", tables, key="paper_table", format_func=report.table_title)
        p = pap[pap["table"] == tab]
        for pool_, g in p.groupby("pool", sort=True):
            st.subheader(f"{report.table_title(tab)}: {pool_} (published)")
            g = g.assign(method=g["method"] + " · n=" + g["n"].astype(int).astype(str))
            st.altair_chart(charts().heatmap(g), width="stretch")
        table(p.assign(table=p["table"].map(report.table_title)))
        return
    rank = queries.ranking(RESULTS, SIG, filters, SEED)
    order = list(dict.fromkeys(rank[rank["source"] == "run"]["method"])) + ["single expert", "base model"]
    st.subheader("Method × task (mean headline metric over all sizes), methods in ranking order")
    st.altair_chart(charts().heatmap(d, order=order), width="stretch")
    tasks = sorted(d["task"].unique())
    task = st.selectbox("Task", tasks, key="task")
    st.subheader(f"{task}: score vs n")
    st.altair_chart(charts().task_vs_n(d[d["task"] == task]), width="stretch")
    table(d[d["task"] == task])


def page_diagnostics():
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
        st.caption("by_task / by_method: one-way ANOVA F of the per-task merging loss (merging-collapse study, "
                   "Table 3); "
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
        st.altair_chart(charts().heatmap(h.rename(columns={"model": "method", "model_b": "task"})), width="stretch")
    curves = v[v["model_b"].isna() & v["layer_index"].notna()]
    if not curves.empty:
        st.subheader(f"{metric} by layer")
        st.altair_chart(charts().layer_curve(curves), width="stretch")


def page_methods():
    names = sorted(info["method"])
    ranked = queries.ranking(RESULTS, SIG, filters, SEED)["method"].tolist()
    first = next((m for m in ranked if m in names), names[0])
    _init("method", names, first)
    method = st.selectbox("Method", names, key="method")
    _mirror("method", method)
    spec = report.method_catalog()[method]  # the registry's describe(), cached: no torch import
    st.header(method)
    st.markdown(f"**{spec.get('summary', '')}**")
    c = st.columns(4)
    c[0].metric("version", spec.get("version"))
    c[1].metric("family", info.set_index("method").loc[method, "family"])
    c[2].metric("experts", f"{spec.get('min_experts')}–{spec.get('max_experts') or '∞'}")
    c[3].metric("stochastic", "yes" if spec.get("stochastic") else "no")
    if spec.get("paper"):
        p = spec["paper"]
        st.markdown(f"**Paper.** {p['title']} — {', '.join(p['authors'])}"
                    f"{', ' + str(p['year']) if p['year'] else ''}{', ' + p['venue'] if p['venue'] else ''}")
    if spec.get("url"):
        st.markdown(f"**URL.** {spec['url']}")
    st.markdown(f"**Citation.** {spec.get('citation') or '—'}")
    st.markdown("**Parameters**")
    cols = ["name", "type", "default", "range", "per_expert", "help"]
    params = [{c: report.cell_text(p.get(c), None) if c == "default" else p.get(c) for c in cols}
              for p in spec.get("params") or []]  # a column of ints and floats must not print 10 as 10.0
    table(pd.DataFrame(params, columns=cols, dtype=object))
    st.markdown("**Configurations behind the reproduced rows** and the command that recomputes each")
    rows = queries.method_rows(RESULTS, SIG, method)
    if rows.empty:
        st.info("No reproduced rows for this method yet.")
    else:
        shown = rows.drop(columns=["command"]).assign(sizes=rows["sizes"].map(lambda s: ", ".join(map(str, s))),
                                                      run_ids=rows["run_ids"].map(lambda s: ", ".join(s)))
        shown.insert(shown.columns.get_loc("params_json"), "params_label",
                     [report.params_label(method, j) for j in rows["params_json"]])
        table(shown)
        for cmd in rows["command"].unique():
            st.code(cmd, language="bash")
    pap = queries.paper_method_rows(RESULTS, SIG, method)
    if not pap.empty:
        st.markdown("**Published rows** (the papers' printed numbers)")
        table(pap.assign(table=pap["table"].map(report.table_title)))
    with st.expander("Full spec (JSON)"):
        st.code(json.dumps(spec, indent=1, default=str), language="json")


def page_pareto():
    rank = queries.ranking(RESULTS, SIG, filters, SEED)
    cost = st.radio("cost", list(report.COSTS), format_func=lambda c: report.COSTS[c], horizontal=True)
    value = report.ranked_value(rank)  # the merging loss on glue-style suites
    quality = "mean merging loss, %" if value == "merging_loss_pct" else "mean headline score"
    d = report.pareto(rank.assign(score=rank[value]), cost)
    if d.empty:
        st.info("No reproduced rows with this cost (provenance) for these filters.")
        return
    st.markdown(f"Quality ({quality}) vs {report.COSTS[cost]}, from provenance. Diamonds are Pareto-optimal: "
                "no other configuration is both better and cheaper (the red step line is the front).")
    st.altair_chart(charts().pareto(d, cost, report.COSTS[cost], quality), width="stretch")
    table(d[["method", "params_label", "score", "merge_wall_s", "eval_wall_s", "merge_peak_gib", "pareto"]]
          .rename(columns={"score": value}).sort_values(cost), help_={"params_label": _params_help(d)})


VERDICT_COLOR = {"reproduced": "green", "not reproduced": "red", "not testable here": "orange"}


def _md_cell(text) -> str:
    return "" if pd.isna(text) else str(text).replace("|", "\\|").replace("\n", " ")


def page_fidelity():
    frame, source = queries.fidelity(RESULTS, SIG, suite)
    if frame.empty:
        st.info(f"No published finding in `suites/papers/findings.yaml` is about the suite **{suite}**.")
        return
    counts = frame["verdict"].value_counts()
    c = st.columns(4)
    for col, verdict in zip(c, VERDICT_COLOR):
        col.metric(verdict, int(counts.get(verdict, 0)))
    ranks = frame[frame["kind"] == "ranking"]
    taus = [f"{t:+.2f}" for t in ranks["estimate"] if pd.notna(t)]
    c[3].metric("rank agreement (Kendall τ)", ", ".join(taus) or "—")
    st.markdown("Each finding the papers publish (declared with its place in the paper in "
                "`suites/papers/findings.yaml`) tested on this suite's **embedded** profile: the embedded result, "
                "a 95 % bootstrap interval and a verdict with its reason; rank agreement is Kendall's τ-b between "
                "the embedded and the published ranking of the methods both have, matched on configuration. "
                "The profile, pool and n filters do not apply here.")
    seed, n_boot = int(frame["seed"].iloc[0]), int(frame["n_boot"].iloc[0])
    st.caption(f"Bootstrap: seed {seed} (NumPy PCG64), {n_boot:,} resamples · rows {source} · "
               f"pool {frame['pool'].dropna().iloc[0] if frame['pool'].notna().any() else '—'} · "
               f"`mergebench sql \"select * from fidelity\"`")
    compact = frame.assign(ci=[f"{lo:+.3g} – {hi:+.3g}" if pd.notna(lo) else "" for lo, hi in zip(frame["ci_low"],
                                                                                           frame["ci_high"])],
                           paper_where=frame["paper_title"] + ", " + frame["where"].fillna(""),
                           n_obs=frame["n_obs"].where(frame["verdict"] != "not testable here"))  # blank, not 0
    table(compact[["verdict", "id", "paper_where", "check", "estimate", "ci", "n_obs"]],
          help_={"verdict": "reproduced: the interval lies on the paper's side; not reproduced: it does not (the "
                            "reason says how); not testable here: the store lacks what the test needs",
                 "estimate": "the embedded result: a slope per added expert, a share, a gap, Pearson r, τ ...",
                 "ci": "95 % bootstrap interval (seeded)", "n_obs": "observations behind it"},
          widths={"verdict": 115, "id": 265, "paper_where": 300, "check": 90, "estimate": 75, "ci": 140,
                  "n_obs": 45}, height=38 + 35 * len(compact))
    st.subheader("Details")
    lines = ["| verdict | finding | paper | embedded result | estimate [95 % CI] | why |", "|---|---|---|---|---|---|"]
    for r in frame.itertuples(index=False):
        est = "" if r.estimate != r.estimate else (
            f"{r.estimate:+.3g} [{r.ci_low:+.3g}, {r.ci_high:+.3g}]" if r.ci_low == r.ci_low else f"{r.estimate:+.3g}")
        lines.append("| " + " | ".join([f":{VERDICT_COLOR[r.verdict]}[**{r.verdict}**]",
                                         f"`{r.id}` — {_md_cell(r.claim)}", f"{r.paper_title}, {_md_cell(r.where)}",
                                         _md_cell(r.observed) or "—", est, _md_cell(r.reason)]) + " |")
    st.markdown("\n".join(lines))


{"ranking": page_ranking, "scaling": page_scaling, "tasks": page_tasks, "diagnostics": page_diagnostics,
 "methods": page_methods, "pareto": page_pareto, "fidelity": page_fidelity}[page]()
