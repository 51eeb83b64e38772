"""Seed 004's statistics of merge failure over a stored suite run (Tables 3-5).

Joins two tables of the results store: the merging loss (eq. 1) of every merged unit of a
glue-style suite run (``results``), and the pool's weight / representation diagnostics
(``diagnostics``, written by ``mergebench diagnose``). Then:

* Table 3: one-way ANOVA of the per-task merging loss, by task and by method;
* Table 4: Pearson correlation, per method and over all methods, between each pairwise
  diagnostic of two experts (four conflict metrics, cosine, HiddenSim) and the merging loss of
  their pairwise merge (mean over the pair's two tasks);
* Table 5: Pearson correlation between each task's MDS and its *best* merging loss over
  methods in the merge of all experts (the largest merge size run).

Pure functions over DataFrames (:func:`pair_table`, :func:`task_table`, :func:`failure_statistics`)
plus one loader (:func:`load_failure_inputs`), so the statistics are testable without a store.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import DiagnosticsError
from .stats import AnovaResult, PearsonResult, anova_by_factor, pearson

__all__ = ["PAIR_METRICS", "FailureStatistics", "failure_statistics", "load_failure_inputs", "pair_table",
           "task_table"]

PAIR_METRICS = ("magnitude_change_ratio", "sign_change_ratio", "conflicting_magnitude_change_ratio",
                "average_cosine", "cosine", "hidden_sim")
"""Pairwise diagnostics of two experts tested against their pairwise merge's loss (seed 004 Table 4
has the first four and HiddenSim; the global task-vector cosine is added for comparison)."""


@dataclass
class FailureStatistics:
    anova: dict[str, AnovaResult]
    pair_pearson: dict[str, dict[str, PearsonResult]]  # scope ('all' or a method) -> metric -> result
    mds_pearson: PearsonResult | None
    pairs: pd.DataFrame
    tasks: pd.DataFrame
    notes: list[str] = field(default_factory=list)

    def pearson_frame(self) -> pd.DataFrame:
        rows = [{"scope": scope, "metric": m, "r": r.r, "p": r.p, "n": r.n}
                for scope, by_metric in self.pair_pearson.items() for m, r in by_metric.items()]
        if self.mds_pearson is not None:
            r = self.mds_pearson
            rows.append({"scope": "best over methods", "metric": "mds", "r": r.r, "p": r.p, "n": r.n})
        return pd.DataFrame(rows, columns=["scope", "metric", "r", "p", "n"])


def _pair(a: str, b: str) -> str:
    return "|".join(sorted((a, b)))


def pair_table(losses: pd.DataFrame, diagnostics: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, pairwise merge): the pair's mean merging loss and its diagnostics.

    ``losses`` has unit_id, method, n, expert, merging_loss_pct (one row per merged unit and
    task, :func:`mergebench.results.metrics.merging_loss`); ``diagnostics`` holds global pairwise rows
    (metric, model, model_b, value) of the experts. Pairs without a diagnostic get NaN there.
    """
    two = losses[losses["n"] == 2]
    if two.empty:
        return pd.DataFrame(columns=["method", "unit_id", "pair", "merging_loss_pct", *PAIR_METRICS])
    per_unit = two.groupby(["method", "unit_id"], sort=True).agg(
        merging_loss_pct=("merging_loss_pct", "mean"), experts=("expert", lambda s: tuple(sorted(s))))
    per_unit = per_unit[per_unit["experts"].map(len) == 2].reset_index()
    per_unit["pair"] = per_unit["experts"].map(lambda e: _pair(*e))
    d = diagnostics[diagnostics["metric"].isin(PAIR_METRICS) & diagnostics["model_b"].notna()]
    d = d.assign(pair=[_pair(a, b) for a, b in zip(d["model"], d["model_b"])])
    wide = d.drop_duplicates(["pair", "metric"], keep="last").pivot(index="pair", columns="metric", values="value")
    out = per_unit.drop(columns="experts").merge(wide, left_on="pair", right_index=True, how="left")
    for m in PAIR_METRICS:
        if m not in out:
            out[m] = np.nan
    return out[["method", "unit_id", "pair", "merging_loss_pct", *PAIR_METRICS]]


def task_table(losses: pd.DataFrame, diagnostics: pd.DataFrame) -> pd.DataFrame:
    """One row per task: its MDS and its best (highest) merging loss over methods in the largest merge."""
    if losses.empty:
        return pd.DataFrame(columns=["task", "n", "best_merging_loss_pct", "best_method", "mds"])
    top = losses[losses["n"] == losses["n"].max()]
    best = top.loc[top.groupby("task")["merging_loss_pct"].idxmax(), ["task", "n", "merging_loss_pct", "method"]]
    best = best.rename(columns={"merging_loss_pct": "best_merging_loss_pct", "method": "best_method"})
    mds = diagnostics[(diagnostics["metric"] == "mds") & diagnostics["task"].notna()]
    mds = mds.drop_duplicates("task", keep="last").set_index("task")["value"].rename("mds")
    return best.merge(mds, left_on="task", right_index=True, how="left").sort_values("task").reset_index(drop=True)


def _pearsons(pairs: pd.DataFrame) -> dict[str, PearsonResult]:
    out = {}
    for m in PAIR_METRICS:
        ok = pairs[m].notna() & pairs["merging_loss_pct"].notna()
        if ok.sum() >= 3:
            out[m] = pearson(pairs.loc[ok, m], pairs.loc[ok, "merging_loss_pct"], metric=m)
    return out


def failure_statistics(losses: pd.DataFrame, diagnostics: pd.DataFrame) -> FailureStatistics:
    """Tables 3-5 of seed 004 from per-task merging losses and the pool's diagnostics rows."""
    notes: list[str] = []
    anova: dict[str, AnovaResult] = {}
    for factor in ("task", "method"):
        try:
            anova.update(anova_by_factor(losses, value="merging_loss_pct", factors=(factor,)))
        except ValueError as exc:
            notes.append(f"ANOVA by {factor}: {exc}")
    pairs = pair_table(losses, diagnostics)
    pair_pearson: dict[str, dict[str, PearsonResult]] = {}
    if not pairs.empty:
        if pairs[list(PAIR_METRICS)].isna().all().all():
            notes.append("no pairwise diagnostics of these experts are stored: run `mergebench diagnose` on them")
        for method, grp in pairs.groupby("method", sort=True):
            pair_pearson[str(method)] = _pearsons(grp)
        if pairs["method"].nunique() > 1:
            pair_pearson["all methods"] = _pearsons(pairs)
    else:
        notes.append("no pairwise merges (n = 2) in this run: no Table 4 correlations")
    tasks = task_table(losses, diagnostics)
    mds_pearson = None
    ok = tasks.dropna(subset=["mds", "best_merging_loss_pct"]) if not tasks.empty else tasks
    if len(ok) >= 3:
        mds_pearson = pearson(ok["mds"], ok["best_merging_loss_pct"], metric="mds")
    elif not tasks.empty:
        notes.append("fewer than 3 tasks have both an MDS and a merging loss: no Table 5 correlation")
    return FailureStatistics(anova, pair_pearson, mds_pearson, pairs, tasks, notes)


def load_failure_inputs(
    results_dir: str | Path, suite: str, *, profile: str | None = None, pool: str | None = None,
    methods: Sequence[str] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(per-task merging losses, the pool's global diagnostics rows, context) from a results store.

    The task -> expert map (whose score eq. 1 divides by) comes from the suite profile, as in
    ``mergebench eval``'s summary.
    """
    from mergebench.results import metrics, store
    from mergebench.config.pools import load_pool
    from mergebench.config.suites import load_suite
    from .store import read_diagnostics

    s = load_suite(suite)
    prof = s.profile(profile, pool=pool)
    p = load_pool(pool or prof.pools[0])
    task_expert: dict[str, str] = {}
    for e in prof.experts(p):
        for t in prof.reference_tasks(p, e):
            task_expert.setdefault(t.name, e)
    metric = {t.name: t.metric for t in prof.tasks}
    with store.connect(results_dir) as con:
        rows = con.execute(
            "SELECT * FROM results WHERE suite = ? AND profile = ? AND pool = ? AND role IN ('merged', 'expert')",
            [s.name, prof.name, p.name]).df()
    if methods:
        rows = rows[(rows["role"] == "expert") | rows["method"].isin(list(methods))]
    sel = metrics.select_metric(rows, metric)
    if sel[sel["role"] == "merged"].empty:
        raise DiagnosticsError(f"no merged results of suite {s.name!r} (profile {prof.name!r}, pool {p.name!r}) in "
                         f"{results_dir}: run `mergebench eval --suite {s.name} --method ...` first")
    losses = metrics.merging_loss(sel[sel["role"] == "merged"], sel[sel["role"] == "expert"], task_expert)
    diag = read_diagnostics(results_dir, pool=p.name)
    experts = set(task_expert.values())
    diag = diag[(diag["scope"].isin(["global", "layer"])) & diag["method"].isna()
                & diag["kind"].isin(["weights", "representations"])]
    # HiddenSim and MDS are normalized within the diagnosed group: use units over exactly these experts
    group = diag["subset"].map(lambda s: set(s) == experts)
    reps = diag[(diag["kind"] == "representations") & group]
    weights = diag[(diag["kind"] == "weights") & diag["layer"].isna()]
    context = {"suite": s.name, "profile": prof.name, "pool": p.name, "experts": sorted(experts),
               "task_expert": task_expert,
               "diagnose_hint": f"mergebench diagnose --pool {p.name} --experts {','.join(sorted(experts))} "
                                "--kinds weights,representations"}
    return losses, pd.concat([weights, reps], ignore_index=True), context
