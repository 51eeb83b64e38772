"""Scores of a sweep, one row per (method, grid point), from the stored rows of its units."""

from __future__ import annotations

import os
import warnings

import pandas as pd

from mergebench.results import metrics, store
from .plan import SweepPlan

__all__ = ["point_scores"]


def point_scores(sweep: SweepPlan, results_dir: str | os.PathLike) -> pd.DataFrame:
    """Columns: method, point (dict), setting (``k=v,...``), units, scored, mean, std.

    ``mean`` is the mean over the point's merged subsets of each unit's headline score (the
    unweighted mean over its tasks of each task's headline metric); None until every subset has
    rows, so a partly run point is never compared with a complete one.
    """
    ids = [wu.unit.unit_id for p in sweep.plans for wu in p.merges]
    with store.connect(results_dir, include_paper=False) as con, warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=Warning)  # duckdb's DataFrame conversion uses deprecated pandas API
        rows = con.execute("SELECT * FROM results WHERE unit_id IN (SELECT unnest(?))", [ids]).df()
    metric = {t.name: t.metric for t in sweep.profile.tasks}
    per_unit = metrics.unit_scores(rows, metric=metric).set_index("unit_id")["score"] if len(rows) else pd.Series()
    out = []
    for (method, point), plan in zip(sweep.keys, sweep.plans):
        vals = [per_unit[wu.unit.unit_id] for wu in plan.merges if wu.unit.unit_id in per_unit.index]
        complete = bool(plan.merges) and len(vals) == len(plan.merges)
        s = pd.Series(vals, dtype="float64")
        out.append({"method": method, "point": dict(point),
                    "setting": ", ".join(f"{k}={v}" for k, v in point.items()) or "(suite default)",
                    "units": len(plan.merges), "scored": len(vals),
                    "mean": float(s.mean()) if complete else None,
                    "std": float(s.std(ddof=1)) if complete and len(s) > 1 else None})
    return pd.DataFrame(out, columns=["method", "point", "setting", "units", "scored", "mean", "std"])
