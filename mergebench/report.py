"""Rankings over the results store, for the leaderboard and for static reports.

The leaderboard (``leaderboard/app.py``) and ``mergebench report`` show the same numbers because
both call the functions here. Heavy reductions (millions of result rows -> one score per unit)
run in DuckDB over the Parquet store; only per-unit rows reach pandas, where the seeded bootstrap
of :mod:`mergebench.metrics` adds confidence and rank intervals.

A unit's *headline score* is the unweighted mean over tasks of each task's headline metric, as
the suite's profile declares it (``TaskSpec.metric``); tasks of suites/profiles that are not
defined here fall back to ``acc`` (else the alphabetically first metric), so any store renders.
"""

from __future__ import annotations

import html as _html
import json
import os
import shlex
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mergebench import metrics, store

#: Bootstrap resamples used by the leaderboard/report (seeded, so tables are reproducible).
N_BOOT_CI = 1_000
N_BOOT_RANK = 1_000
_LOCK = threading.RLock()

RANKING_COLUMNS = ["source", "rank", "method", "params", "n_units", "score", "ci_low", "ci_high", "rank_low",
                   "rank_high", "p_best", "p_gt_base", "gain_vs_base_pp", "p_gt_best_expert", "gain_vs_best_expert_pp",
                   "merge_wall_s", "merge_peak_gib", "eval_wall_s", "table"]

_UNIT_COLS = ["suite", "suite_version", "profile", "pool", "base_model", "method", "method_version", "params_json",
              "seed", "subset", "n", "role", "run_id"]


# ------------------------------------------------------------------------------ connection


def headline_map() -> pd.DataFrame:
    """(suite, profile, task, metric): each task's headline metric in every defined suite profile."""
    rows = []
    try:
        from mergebench.suites import list_suites

        for s in list_suites():
            for pname in s.profiles:
                try:
                    prof = s.profile(pname)
                except Exception:  # noqa: BLE001 - a profile needing a pool choice still names its tasks
                    prof = s.profiles[pname]
                for t in getattr(prof, "tasks", []):
                    rows.append((s.name, pname, t.name, t.metric))
    except Exception as exc:  # noqa: BLE001 - a broken suite file must not take the leaderboard down
        warnings.warn(f"suite definitions unavailable ({exc}); every task falls back to 'acc'", stacklevel=2)
    return pd.DataFrame(rows, columns=["suite", "profile", "task", "metric"]).drop_duplicates()


def loss_profiles() -> set[tuple[str, str]]:
    """(suite, profile) pairs whose headline is the merging loss (seed 004 eq. 1), not the score."""
    out = set()
    try:
        from mergebench.suites import list_suites

        for s in list_suites():
            for pname, prof in s.profiles.items():
                if "merging_loss" in (getattr(prof, "report", None) or []):
                    out.add((s.name, pname))
    except Exception:  # noqa: BLE001 - same policy as headline_map
        pass
    return out


def unit_merging_loss(con, f: Filters, merged: pd.DataFrame) -> pd.Series:
    """Mean merging loss (%) per merged unit, over the unit's tasks whose own expert was merged.

    Each task's expert is the single expert reference scored on it in the selection (a
    glue-style profile scores every expert on its own task only); a task scored by several
    experts has no defined expert and is left out.
    """
    where, params = f.where(refs=True)
    keys = ", ".join(metrics.GROUP_KEYS)
    rows = df(con, f"SELECT unit_id, {keys}, role, subset, method, n, task, value FROM headline_rows "
                   f"WHERE role IN ('merged', 'expert') AND {where}", params)
    ex = rows[rows["role"] == "expert"]
    owners = ex.assign(expert=_first(ex["subset"])).groupby("task")["expert"].unique()
    task_expert = {t: e[0] for t, e in owners.items() if len(e) == 1}
    m = rows[rows["unit_id"].isin(merged["unit_id"])]
    loss = metrics.merging_loss(m, ex, task_expert)
    return metrics.average_merging_loss(loss).set_index("unit_id")["merging_loss_pct"]


def _first(subset: pd.Series) -> pd.Series:
    return subset.map(lambda s: s[0] if s is not None and len(s) else None)


def connect(results_dir: str | os.PathLike = store.DEFAULT_RESULTS_DIR, paper_dir: str | os.PathLike | None = None):
    """DuckDB connection with the store's views plus ``task_metric`` and ``unit_scores``.

    Published rows come from `<results_dir>/paper`, else from the repository's ``results/paper``
    so that a fresh store still shows the seeds' numbers. Nothing is ever written to the store.
    """
    results_dir = Path(results_dir)
    if paper_dir is None:
        paper_dir = results_dir / "paper" if (results_dir / "paper").is_dir() else store.PAPER_DIR
    con = store.connect(results_dir, paper_dir)
    con.register("_headline_map", headline_map())
    # one pass over the rows: which metric each (suite, profile, task) is scored by
    con.execute("""
        CREATE OR REPLACE TEMP TABLE task_metric AS
        SELECT t.suite, t.profile, t.task,
               coalesce(h.metric, CASE WHEN list_contains(t.metrics, 'acc') THEN 'acc'
                                       ELSE list_min(t.metrics) END) AS metric
        FROM (SELECT suite, coalesce(profile, '') AS profile, task, list(DISTINCT metric) AS metrics
              FROM results GROUP BY ALL) t
        LEFT JOIN _headline_map h ON h.suite = t.suite AND h.profile = t.profile AND h.task = t.task
                                 AND list_contains(t.metrics, h.metric)""")
    cols = ", ".join(f"any_value(r.{c}) AS {c}" for c in _UNIT_COLS)
    con.execute(f"""
        CREATE OR REPLACE VIEW unit_scores AS
        SELECT r.unit_id, {cols}, avg(r.value) AS score, count(DISTINCT r.task) AS n_tasks
        FROM results r JOIN task_metric m
          ON m.suite = r.suite AND m.profile = coalesce(r.profile, '') AND m.task = r.task AND m.metric = r.metric
        GROUP BY r.unit_id""")
    con.execute("""
        CREATE OR REPLACE VIEW headline_rows AS
        SELECT r.* FROM results r JOIN task_metric m
          ON m.suite = r.suite AND m.profile = coalesce(r.profile, '') AND m.task = r.task AND m.metric = r.metric""")
    return con


def df(con, query: str, params: Sequence[Any] | None = None) -> pd.DataFrame:
    """Run a query (serialized: safe on a connection shared by threads) and return a DataFrame."""
    # one lock per process, not cursors: views over registered (connection-local) tables are
    # invisible to a cursor, and Streamlit reruns share the cached connection across threads
    with _LOCK, warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=Warning)
        return con.execute(query, list(params or [])).df()


# --------------------------------------------------------------------------------- filters


@dataclass
class Filters:
    """What the leaderboard's sidebar selects (None = everything)."""

    suite: str | None = None
    profile: str | None = None
    pool: str | None = None
    n: int | None = None
    families: Sequence[str] | None = None
    data_free_only: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def where(self, *, refs: bool = False, n: bool = True) -> tuple[str, list[Any]]:
        """SQL condition on unit/result columns. With `refs`, base/expert rows pass the n filter."""
        conds, params = ["TRUE"], []
        for col in ("suite", "profile", "pool"):
            v = getattr(self, col)
            if v is not None:
                conds.append(f"{col} = ?")
                params.append(v)
        if n and self.n is not None:
            conds.append("(n = ?" + (" OR role <> 'merged')" if refs else ")"))
            params.append(int(self.n))
        allowed = self.allowed_methods()
        if allowed is not None:
            ph = ",".join(["?"] * len(allowed)) or "NULL"
            conds.append(f"(method IN ({ph})" + (" OR role <> 'merged')" if refs else ")"))
            params += list(allowed)
        return " AND ".join(conds), params

    def allowed_methods(self) -> list[str] | None:
        if not self.families and not self.data_free_only:
            return None
        info = method_info()
        keep = info
        if self.families:
            keep = keep[keep["family"].isin(list(self.families))]
        if self.data_free_only:
            keep = keep[keep["data_free"]]
        return sorted(keep["method"])


_FAMILY = {
    "baselines.linear": "averaging",
    "baselines.task_vector": "task vector",
    "baselines.spherical": "spherical",
    "baselines.model_stock": "averaging",
    "baselines.arcee_fusion": "selection",
    "baselines.subspace": "subspace",
}


def method_info() -> pd.DataFrame:
    """One row per registered method: name, family (from its module), data_free, version, summary."""
    from mergebench.methods import list_methods

    rows = []
    for m in list_methods():
        rows.append({"method": m.name, "family": _FAMILY.get(m.source, "plugin"), "data_free": not m.aux_inputs,
                     "version": m.version, "summary": m.summary, "stochastic": m.stochastic})
    return pd.DataFrame(rows, columns=["method", "family", "data_free", "version", "summary", "stochastic"])


def choices(con) -> dict[str, list]:
    """Distinct suites, profiles, pools and sizes present in run or paper rows (for the filters)."""
    out = {}
    for col in ("suite", "profile", "pool"):
        out[col] = df(con, f"SELECT DISTINCT {col} AS v FROM all_results WHERE {col} IS NOT NULL ORDER BY 1")["v"].tolist()
    out["n"] = [int(x) for x in df(con, "SELECT DISTINCT n AS v FROM all_results WHERE role = 'merged' "
                                        "AND n IS NOT NULL ORDER BY 1")["v"]]
    # suites with reproduced rows, the most recently written first: the leaderboard opens on the last run
    out["run_suite"] = df(con, "SELECT suite AS v FROM results GROUP BY suite ORDER BY max(created_at) DESC, suite"
                          )["v"].tolist()
    return out


# ---------------------------------------------------------------------------------- ranking


def config_params(params_json: str | None) -> str:
    """A configuration's parameters as given: stored params hold per-expert lists expanded to the
    merge size (``density=0.1`` is stored as ``[0.1, 0.1]`` at n=2 and ``[0.1]*8`` at n=8), which
    would split one configuration by n; a list of one repeated value is that value again."""
    params = json.loads(params_json) if params_json else {}
    return store.canonical_json({k: v[0] if isinstance(v, list) and v and all(x == v[0] for x in v) else v
                                 for k, v in params.items()})


def _with_config_params(frame: pd.DataFrame) -> pd.DataFrame:
    """``params_json`` replaced by :func:`config_params` (computed once per distinct value)."""
    if frame.empty:
        return frame
    lookup = {v: config_params(v) for v in frame["params_json"].dropna().unique()}
    return frame.assign(params_json=frame["params_json"].map(lookup))


def unit_table(con, f: Filters) -> pd.DataFrame:
    """Per-unit headline scores of the selection: merged units plus their base/expert references.

    The filter columns are constant within a unit, so rows are filtered before the reduction."""
    where, params = f.where(refs=True)
    cols = ", ".join(f"any_value({c}) AS {c}" for c in _UNIT_COLS)
    return _with_config_params(df(con, f"""SELECT unit_id, {cols}, avg(value) AS score, count(DISTINCT task) AS n_tasks
                        FROM headline_rows WHERE {where} GROUP BY unit_id""", params))


def _variant(merged: pd.DataFrame) -> pd.Series:
    """Method label; a method run with several parameter sets gets its params appended."""
    multi = merged.groupby("method")["params_json"].transform("nunique") > 1
    return merged["method"].where(~multi, merged["method"] + " " + merged["params_json"].fillna("{}"))


def merge_cost(con, units: pd.DataFrame) -> pd.DataFrame:
    """Per variant, from provenance: mean merge wall time (s), max peak RSS (GiB) and mean
    evaluation wall time (s) of `units`; ``unit_cost_s`` is merge + evaluation."""
    prov = df(con, "SELECT unit_id, any_value(merge_wall_s) AS merge_wall_s, any_value(eval_wall_s) AS eval_wall_s, "
                   "any_value(merge_peak_rss_bytes) AS rss FROM provenance WHERE unit_id IS NOT NULL GROUP BY unit_id")
    m = units[["unit_id", "variant"]].merge(prov, on="unit_id", how="inner")
    g = m.groupby("variant", sort=True)
    return pd.DataFrame({"merge_wall_s": g["merge_wall_s"].mean(),
                         "merge_peak_gib": g["rss"].max().astype("float64") / 2**30,
                         "eval_wall_s": g["eval_wall_s"].mean()}).reset_index()


#: Cost axes of the Pareto view: column -> what it measures.
COSTS = {"merge_wall_s": "merge wall time (s, mean per unit)",
         "eval_wall_s": "evaluation wall time (s, mean per unit)",
         "unit_cost_s": "merge + evaluation wall time (s, mean per unit)"}


def run_ranking(con, f: Filters, *, n_boot_ci: int = N_BOOT_CI, n_boot_rank: int = N_BOOT_RANK,
                seed: int = 0) -> pd.DataFrame:
    """Methods ranked by mean headline score of the selected merged units (source='run').

    Columns: RANKING_COLUMNS. Rank intervals resample shared subsets jointly when every method has
    every subset (metrics.rank_intervals); gains are in percentage points (seed 001's definition).
    """
    units = unit_table(con, f)
    merged = units[units["role"] == "merged"]
    if merged.empty:
        return pd.DataFrame(columns=RANKING_COLUMNS)
    comp = metrics.compare_to_references(units)
    comp = comp[comp["role"] == "merged"].copy()
    comp["variant"] = _variant(comp)
    by_loss = set(zip(comp["suite"], comp["profile"].fillna(""))) <= loss_profiles()
    if by_loss:  # glue-style: merges are scored on their members' tasks; rank by merging loss
        comp["score"] = comp["unit_id"].map(unit_merging_loss(con, f, comp))
        comp = comp[comp["score"].notna()]
        for c in ("beats_base", "gain_vs_base_pp", "beats_best_expert", "gain_vs_best_expert_pp"):
            comp[c] = np.nan
        if comp.empty:
            return pd.DataFrame(columns=RANKING_COLUMNS + ["merging_loss_pct"])
    ci = metrics.bootstrap_ci_by(comp, ["variant"], n_boot=n_boot_ci, seed=seed)
    ri = metrics.rank_intervals(comp, method_col="variant", n_boot=n_boot_rank, seed=seed)
    g = comp.groupby("variant", sort=True)
    agg = pd.DataFrame({
        "method": g["method"].first(), "params": g["params_json"].first(),
        "p_gt_base": g["beats_base"].apply(lambda s: s.astype("float64").mean()),
        "gain_vs_base_pp": g["gain_vs_base_pp"].mean(),
        "p_gt_best_expert": g["beats_best_expert"].apply(lambda s: s.astype("float64").mean()),
        "gain_vs_best_expert_pp": g["gain_vs_best_expert_pp"].mean(),
    }).reset_index()
    out = (ri[["variant", "rank", "rank_low", "rank_high", "p_best"]]
           .merge(ci.rename(columns={"mean": "score"}), on="variant")
           .merge(agg, on="variant"))
    out = out.merge(merge_cost(con, comp), on="variant", how="left")
    out["source"] = "run"
    out["table"] = None
    out = out.sort_values(["rank", "score"], ascending=[True, False]).reset_index(drop=True)
    if by_loss:  # the bootstrap CI and rank intervals above are over the units' merging losses
        return out.assign(merging_loss_pct=out["score"], score=np.nan)[RANKING_COLUMNS + ["merging_loss_pct"]]
    return out[RANKING_COLUMNS]


def paper_ranking(con, f: Filters) -> pd.DataFrame:
    """Published (source='paper') rows summarised like :func:`run_ranking`, one row per table,
    pool, method and n; only the quantities the paper prints are filled (score = reported average
    accuracy for seed 000, P(>base)/gains for seed 001, merging loss for seed 004)."""
    where, params = f.where(refs=False)
    q = f"""
        SELECT 'paper' AS source, "table", pool, base_model, method, n,
               any_value(label) AS label,
               avg(value) FILTER (metric = 'reported_average' AND (averaged_metric IS NULL
                                  OR averaged_metric LIKE 'acc%')) AS score,
               avg(value) FILTER (metric = 'p_gt_base_pct') / 100 AS p_gt_base,
               avg(value) FILTER (metric = 'gain_vs_base_pp') AS gain_vs_base_pp,
               avg(value) FILTER (metric = 'p_gt_best_expert_pct') / 100 AS p_gt_best_expert,
               avg(value) FILTER (metric = 'gain_vs_best_expert_pp') AS gain_vs_best_expert_pp,
               avg(value) FILTER (metric = 'reported_average' AND averaged_metric = 'merging_loss_pct')
                   AS merging_loss_pct,
               max(n_combinations) AS n_units
        FROM paper WHERE role = 'merged' AND method IS NOT NULL AND pool IS NOT NULL AND {where}
        GROUP BY ALL
        HAVING score IS NOT NULL OR p_gt_base IS NOT NULL OR gain_vs_best_expert_pp IS NOT NULL
            OR merging_loss_pct IS NOT NULL
        ORDER BY "table", pool, n, score DESC NULLS LAST, merging_loss_pct DESC NULLS LAST, method"""
    return df(con, q, params)


def ranking(con, f: Filters, **kw) -> pd.DataFrame:
    """Reproduced and published rows in one table (`source` says which); run rows first."""
    run = run_ranking(con, f, **kw)
    pap = paper_ranking(con, f)
    if pap.empty:
        return run
    pap = pap.assign(params=None, rank=pd.NA, ci_low=np.nan, ci_high=np.nan, rank_low=pd.NA, rank_high=pd.NA,
                     p_best=np.nan, merge_wall_s=np.nan, merge_peak_gib=np.nan, eval_wall_s=np.nan)
    extra = [c for c in ("pool", "n", "label", "merging_loss_pct") if c in pap]
    if run.empty:
        return pap[RANKING_COLUMNS + extra]
    run = run.astype({"rank": "Int64", "rank_low": "Int64", "rank_high": "Int64"})
    return pd.concat([run, pap[RANKING_COLUMNS + extra]], ignore_index=True)


# --------------------------------------------------------------------------- other pages


_METHOD_LABEL = "coalesce(method, CASE role WHEN 'base' THEN 'base model' ELSE 'single expert' END) AS method"
"""Reference rows have no method: label them for the curves (the base at n=0, experts at n=1)."""


def scaling(con, f: Filters) -> pd.DataFrame:
    """Mean and std (ddof=1) of the headline score per (method, n); experts at n=1, base at n=0."""
    where, params = f.where(refs=True, n=False)
    return df(con, f"""
        SELECT {_METHOD_LABEL},
               role, n, count(*) AS n_units, avg(score) AS mean, coalesce(stddev_samp(score), 0) AS std
        FROM unit_scores WHERE {where} GROUP BY ALL ORDER BY method, n""", params)


def task_vector_norms(con, f: Filters) -> pd.DataFrame:
    """Mean and std (ddof=1) of ``||theta - theta_base||_2`` per (method, n), seed 001 Fig. 4.

    From the provenance of units that recorded it (runs since the column exists); same labels
    and filters as :func:`scaling`."""
    where, params = f.where(refs=True, n=False)
    return df(con, f"""
        WITH norms AS (SELECT unit_id, max(task_vector_norm) AS tv FROM provenance
                       WHERE task_vector_norm IS NOT NULL GROUP BY unit_id)
        SELECT {_METHOD_LABEL}, role, n, count(*) AS n_units, avg(tv) AS mean, coalesce(stddev_samp(tv), 0) AS std
        FROM unit_scores JOIN norms USING (unit_id) WHERE {where} GROUP BY ALL ORDER BY method, n""", params)


def paper_scaling(con, f: Filters) -> pd.DataFrame:
    """Published reported averages per (table, pool, method, n) for the same chart (seed 000)."""
    where, params = f.where(refs=False, n=False)
    return df(con, f"""
        SELECT "table", pool, method, n, avg(value) AS mean FROM paper
        WHERE role = 'merged' AND metric = 'reported_average' AND averaged_metric LIKE 'acc%' AND {where}
        GROUP BY ALL ORDER BY "table", method, n""", params)


def per_task(con, f: Filters) -> pd.DataFrame:
    """Mean headline metric per (method, task, n) of merged units (+ base and experts)."""
    where, params = f.where(refs=True, n=False)
    return df(con, f"""
        SELECT {_METHOD_LABEL},
               role, task, n, any_value(metric) AS metric, avg(value) AS value, count(DISTINCT unit_id) AS n_units
        FROM headline_rows WHERE {where} GROUP BY ALL ORDER BY method, task, n""", params)


def paper_per_task(con, f: Filters) -> pd.DataFrame:
    """Published per-task accuracies (fractions) of merged models per (table, pool, method, n, task)."""
    where, params = f.where(refs=False)
    return df(con, f"""
        SELECT "table", pool, method, n, task, any_value(metric) AS metric,
               avg(CASE WHEN metric LIKE '%\\_pct' ESCAPE '\\' THEN value / 100 ELSE value END) AS value
        FROM paper WHERE role = 'merged' AND method IS NOT NULL AND task <> 'average'
          AND metric IN ('acc', 'acc_norm', 'acc_pct', 'mcc') AND {where}
        GROUP BY ALL ORDER BY "table", pool, method, n, task""", params)


def method_rows(con, method: str) -> pd.DataFrame:
    """The exact configurations behind a method's run rows, with the command that reproduces each."""
    units = _with_config_params(df(con, """
        SELECT suite, suite_version, profile, pool, base_model, method_version, params_json, unit_id, seed, n,
               run_id, score FROM unit_scores WHERE method = ? AND role = 'merged'""", [method]))
    keys = ["suite", "suite_version", "profile", "pool", "base_model", "method_version", "params_json"]
    g = units.groupby(keys, dropna=False, sort=True)
    out = pd.DataFrame({
        "units": g["unit_id"].nunique(), "seed": g["seed"].min(),
        "sizes": g["n"].agg(lambda x: sorted({int(v) for v in x})),
        "run_ids": g["run_id"].agg(lambda x: sorted(set(x))), "mean_score": g["score"].mean(),
    }).reset_index() if not units.empty else pd.DataFrame(columns=keys + ["units", "seed", "sizes", "run_ids",
                                                                          "mean_score"])
    out["command"] = [reproduce_command(method, r.suite, r.profile, r.pool, r.params_json, r.seed)
                      for r in out.itertuples()]  # one per configuration, not per result row
    return out


def reproduce_command(method: str, suite: str, profile: str | None, pool: str | None, params_json: str | None,
                      seed: Any = None) -> str:
    """The `mergebench eval` command line that recomputes a configuration's rows."""
    parts = ["mergebench", "eval", "--method", method, "--suite", suite]
    if profile:
        parts += ["--profile", profile]
    if pool:
        parts += ["--pool", pool]
    try:
        params = json.loads(params_json) if params_json else {}
    except ValueError:
        params = {}
    for k, v in sorted(params.items()):
        val = json.dumps(v) if isinstance(v, (list, dict)) else ("true" if v is True else "false" if v is False
                                                                 else str(v))
        parts += ["--set", f"{k}={val}"]
    if seed is not None and not (isinstance(seed, float) and np.isnan(seed)):
        parts += ["--seed", str(int(seed))]
    return shlex.join(parts)


def pareto(rank: pd.DataFrame, cost: str = "merge_wall_s") -> pd.DataFrame:
    """Run rows with ``cost`` (a :data:`COSTS` column), flagged ``pareto`` when no other row is
    both better and cheaper. Rows without a score or a cost are left out (never optimal)."""
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {', '.join(COSTS)}, got {cost!r}")
    d = rank[rank["source"] == "run"].copy()
    d["unit_cost_s"] = d["merge_wall_s"] + d["eval_wall_s"]
    d = d[d[cost].notna() & d["score"].notna()]
    if d.empty:
        return d.assign(pareto=pd.Series(dtype=bool))
    s = d["score"].to_numpy(float)
    c = d[cost].to_numpy(float)
    dominated = ((s[None, :] >= s[:, None]) & (c[None, :] <= c[:, None])
                 & ((s[None, :] > s[:, None]) | (c[None, :] < c[:, None]))).any(axis=1)
    d["pareto"] = ~dominated
    return d


def diagnostics(con, pool: str | None = None) -> pd.DataFrame | None:
    """Overview of the ``diagnostics`` view (rows per pool, kind, metric, scope); None when the store
    has no diagnostics (no view, or an empty one)."""
    names = set(df(con, "SELECT table_name FROM information_schema.tables")["table_name"])
    if "diagnostics" not in names:
        return None
    out = df(con, """SELECT pool, kind, metric, scope, count(*) AS rows, count(DISTINCT unit_id) AS units,
                            bool_or(model_b IS NOT NULL) AS pairwise, count(DISTINCT layer) AS layers
                     FROM diagnostics WHERE ? IS NULL OR pool = ? GROUP BY ALL ORDER BY ALL""", [pool, pool])
    return None if out.empty else out


def diagnostic_values(con, kind: str, metric: str, pool: str | None = None) -> pd.DataFrame:
    """Mean value per (model, model_b, layer, scope) of one diagnostic metric (heatmap/curve input)."""
    return df(con, """SELECT model, model_b, layer, scope, avg(value) AS value, avg(std) AS std,
                             try_cast(regexp_extract(layer, '(\\d+)$', 1) AS INTEGER) AS layer_index
                      FROM diagnostics WHERE kind = ? AND metric = ? AND (? IS NULL OR pool = ?)
                      GROUP BY ALL ORDER BY ALL""", [kind, metric, pool, pool])


def diagnostic_stats(con, pool: str | None = None) -> pd.DataFrame:
    """`mergebench stats` results (seed 004 Tables 3-5), one row per test: scope (a method, or
    all methods), test (``by_task`` / ``by_method`` ANOVA, or the diagnostic correlated with
    merging loss), statistic (F or Pearson r), p-value and n."""
    names = set(df(con, "SELECT table_name FROM information_schema.tables")["table_name"])
    if "diagnostics" not in names:
        return pd.DataFrame(columns=["pool", "scope", "test", "statistic", "p", "n"])
    return df(con, """SELECT pool, coalesce(method, 'all methods') AS scope, model AS test,
                             max(value) FILTER (WHERE metric IN ('anova_f', 'pearson_r')) AS statistic,
                             max(value) FILTER (WHERE metric IN ('anova_p', 'pearson_p')) AS p,
                             max(n) AS n
                      FROM diagnostics WHERE kind = 'stats' AND (? IS NULL OR pool = ?)
                      GROUP BY ALL ORDER BY ALL""", [pool, pool])


# ---------------------------------------------------------------------------------- reports


_FMT = {"score": "{:.4f}", "ci_low": "{:.4f}", "ci_high": "{:.4f}", "p_best": "{:.2f}", "p_gt_base": "{:.2f}",
        "p_gt_best_expert": "{:.2f}", "gain_vs_base_pp": "{:+.2f}", "gain_vs_best_expert_pp": "{:+.2f}",
        "merge_wall_s": "{:.2f}", "merge_peak_gib": "{:.2f}", "eval_wall_s": "{:.1f}", "merging_loss_pct": "{:+.1f}"}


def _fmt_table(t: pd.DataFrame) -> pd.DataFrame:
    t = t.dropna(axis=1, how="all").copy()
    for c, spec in _FMT.items():
        if c in t:
            t[c] = [("" if pd.isna(v) else spec.format(v)) for v in t[c]]
    return t.astype(object).where(t.notna(), "")


def _md(t: pd.DataFrame) -> str:
    cols = list(t.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    for row in t.itertuples(index=False):  # formatting the (small) summary table, not result rows
        lines.append("| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines)


def report_tables(results_dir: str | os.PathLike = store.DEFAULT_RESULTS_DIR, suite: str | None = None,
                  con=None) -> list[tuple[dict[str, Any], pd.DataFrame]]:
    """[(group, ranking)] for every (suite, profile, pool) with run rows, then the published rows
    per suite. The same computation as the leaderboard's ranking page."""
    con = con or connect(results_dir)
    out = []
    groups = df(con, "SELECT DISTINCT suite, profile, pool FROM results WHERE role = 'merged'"
                + (" AND suite = ?" if suite else "") + " ORDER BY ALL", [suite] if suite else [])
    for g in groups.itertuples(index=False):
        t = run_ranking(con, Filters(suite=g.suite, profile=g.profile, pool=g.pool))
        out.append(({"source": "run", "suite": g.suite, "profile": g.profile, "pool": g.pool}, t))
    suites = df(con, "SELECT DISTINCT suite FROM paper" + (" WHERE suite = ?" if suite else "") + " ORDER BY 1",
                [suite] if suite else [])["suite"]
    for s in suites:
        t = paper_ranking(con, Filters(suite=s))
        if not t.empty:
            out.append(({"source": "paper", "suite": s}, t))
    return out


def write_report(results_dir: str | os.PathLike = store.DEFAULT_RESULTS_DIR, suite: str | None = None,
                 fmt: str = "md", plots_dir: str | os.PathLike | None = None,
                 out: str | os.PathLike | None = None) -> str:
    """The leaderboard's rankings as static tables (md, csv or html); returns the text and writes
    it to `out` when given. With `plots_dir`, also writes one scaling-curve PNG per (suite, pool)
    with run rows (needs matplotlib)."""
    if fmt not in ("md", "csv", "html"):
        raise ValueError(f"fmt must be 'md', 'csv' or 'html', got {fmt!r}")
    con = connect(results_dir)
    tables = report_tables(results_dir, suite, con=con)
    if fmt == "csv":
        frames = [t.assign(**{k: v for k, v in g.items() if k != "source" or "source" not in t}) for g, t in tables]
        text = pd.concat(frames, ignore_index=True).to_csv(index=False) if frames else ",".join(RANKING_COLUMNS) + "\n"
    else:
        parts = []
        for g, t in tables:
            title = (f"{g['suite']} / {g.get('profile')} / {g.get('pool')} (reproduced, source=run)"
                     if g["source"] == "run" else f"{g['suite']}: published numbers (source=paper)")
            shown = _fmt_table(t.drop(columns=["source"], errors="ignore"))
            if fmt == "md":
                parts.append(f"## {title}\n\n{_md(shown)}\n")
            else:
                parts.append(f"<h2>{_html.escape(title)}</h2>\n" + shown.to_html(index=False, escape=True))
        if not parts:
            parts.append("No results." if fmt == "md" else "<p>No results.</p>")
        if fmt == "md":
            text = "# mergebench report\n\n" + "\n".join(parts)
        else:
            text = ("<!doctype html><html><head><meta charset='utf-8'><title>mergebench report</title>"
                    "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
                    "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}</style></head><body>"
                    "<h1>mergebench report</h1>\n" + "\n".join(parts) + "</body></html>\n")
    if plots_dir is not None:
        write_plots(con, plots_dir, suite)
    con.close()
    if out is not None:
        Path(out).write_text(text)
    return text


def write_plots(con, plots_dir: str | os.PathLike, suite: str | None = None) -> list[Path]:
    """Per (suite, profile, pool) with merged units, mean ± std band per method vs n (matplotlib):
    ``scaling_<suite>_<profile>_<pool>.png`` (headline score) and, where recorded,
    ``tvnorm_<...>.png`` (task-vector norm, seed 001 Fig. 4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    written = []
    groups = df(con, "SELECT DISTINCT suite, profile, pool FROM results WHERE role = 'merged'"
                + (" AND suite = ?" if suite else "") + " ORDER BY ALL", [suite] if suite else [])
    for g in groups.itertuples(index=False):
        f = Filters(suite=g.suite, profile=g.profile, pool=g.pool)
        stem = "_".join(str(x).replace("/", "-") for x in (g.suite, g.profile, g.pool))
        for prefix, d, ylabel in (("scaling", scaling(con, f), "headline score"),
                                  ("tvnorm", task_vector_norms(con, f), "task-vector norm ||θ - θ_base||₂")):
            if d[d["role"] == "merged"].empty:
                continue
            fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
            for m, dm in d[d["role"] == "merged"].groupby("method"):
                dm = dm.sort_values("n")
                ax.plot(dm["n"], dm["mean"], marker="o", label=m)
                ax.fill_between(dm["n"], dm["mean"] - dm["std"], dm["mean"] + dm["std"], alpha=0.15)
            base = d[d["role"] == "base"]
            if not base.empty:
                ax.axhline(base["mean"].iloc[0], color="k", ls="--", lw=1, label="base model")
            ax.set_xlabel("models merged (n)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{g.suite} / {g.profile} / {g.pool}")
            ax.legend(fontsize=7, ncol=2)
            ax.grid(alpha=0.3)
            fig.tight_layout()
            fig.savefig(plots_dir / f"{prefix}_{stem}.png")
            plt.close(fig)
            written.append(plots_dir / f"{prefix}_{stem}.png")
    return written
