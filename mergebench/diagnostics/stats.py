"""Statistics of merge failure (seed 004 eq. 1, Tables 3-5): merging loss, ANOVA, Pearson.

* merging loss (eq. 1): L(T_i) = (P(theta_merged, T_i) / P(theta_i, T_i) - 1) x 100, in percent,
  with P(theta_i, T_i) the score of the expert fine-tuned on T_i.
* one-way ANOVA F-test (Table 3): is the merging loss explained by the task, or by the method?
  Each factor is tested on its own (two one-way tests, as in the paper, not a two-way model).
* Pearson correlation (Tables 4-5): coefficient and two-sided p-value between a diagnostic
  (conflict metric, HiddenSim, MDS) and the merging loss.

Both tests are ``scipy.stats`` (f_oneway, pearsonr); this module only shapes the data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as _st

__all__ = ["AnovaResult", "PearsonResult", "anova_by_factor", "anova_oneway", "correlate", "merging_loss", "pearson"]


def merging_loss(merged: Any, expert: Any) -> np.ndarray:
    """Seed 004 eq. 1, in percent (-100 <= L, 0 = no loss; positive if the merge beats the expert)."""
    merged = np.asarray(merged, dtype=np.float64)
    expert = np.asarray(expert, dtype=np.float64)
    if np.any(expert == 0):
        raise ValueError("merging loss is undefined where the expert's score is 0")
    return (merged / expert - 1.0) * 100.0


@dataclass(frozen=True)
class AnovaResult:
    factor: str
    f: float
    p: float
    df_between: int
    df_within: int
    n_groups: int
    n: int


@dataclass(frozen=True)
class PearsonResult:
    metric: str
    r: float
    p: float
    n: int


def anova_oneway(values: Sequence[float], groups: Sequence[Any], *, factor: str = "group") -> AnovaResult:
    """One-way ANOVA F-test of ``values`` grouped by ``groups`` (NaN values are dropped)."""
    v = np.asarray(values, dtype=np.float64)
    g = np.asarray(groups, dtype=object)
    if v.shape != g.shape:
        raise ValueError(f"values ({v.shape}) and groups ({g.shape}) differ in length")
    keep = ~np.isnan(v)
    v, g = v[keep], g[keep]
    labels = list(dict.fromkeys(g.tolist()))
    samples = [v[g == lab] for lab in labels]
    if len(samples) < 2:
        raise ValueError(f"ANOVA by {factor} needs at least two groups, got {len(samples)}")
    if len(v) <= len(samples):
        raise ValueError(f"ANOVA by {factor} needs more observations ({len(v)}) than groups ({len(samples)})")
    res = _st.f_oneway(*samples)
    return AnovaResult(factor, float(res.statistic), float(res.pvalue), len(samples) - 1, len(v) - len(samples),
                       len(samples), len(v))


def anova_by_factor(
    data: Any, *, value: str = "merging_loss", factors: Sequence[str] = ("task", "method")
) -> dict[str, AnovaResult]:
    """Seed 004 Table 3: a one-way ANOVA of ``value`` for each factor column of ``data``.

    ``data`` is a pandas DataFrame or a mapping of equal-length columns.
    """
    cols = {c: np.asarray(data[c]) for c in (value, *factors)}
    return {f: anova_oneway(cols[value], cols[f], factor=f) for f in factors}


def pearson(x: Sequence[float], y: Sequence[float], *, metric: str = "x") -> PearsonResult:
    """Pearson r and two-sided p-value over the pairs where both values are finite."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"{metric}: x ({x.shape}) and y ({y.shape}) differ in length")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3:
        raise ValueError(f"{metric}: Pearson correlation needs at least 3 finite pairs, got {len(x)}")
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return PearsonResult(metric, float("nan"), float("nan"), len(x))
    res = _st.pearsonr(x, y)
    return PearsonResult(metric, float(res.statistic), float(res.pvalue), len(x))


def correlate(metrics: Mapping[str, Sequence[float]], loss: Sequence[float]) -> dict[str, PearsonResult]:
    """Seed 004 Tables 4-5: Pearson of each diagnostic (aligned with ``loss``) against the merging loss."""
    return {name: pearson(vals, loss, metric=name) for name, vals in metrics.items()}


def stats_rows(anova: Mapping[str, AnovaResult] = (), pearsons: Mapping[str, PearsonResult] = ()) -> list[dict]:
    """Long-format rows (kind='stats') for the ``diagnostics`` store table."""
    rows: list[dict[str, Any]] = []
    for a in dict(anova).values():
        base = {"kind": "stats", "layer": None, "scope": "global", "model": f"by_{a.factor}", "n": a.n}
        rows.append({**base, "metric": "anova_f", "value": a.f})
        rows.append({**base, "metric": "anova_p", "value": a.p})
    for r in dict(pearsons).values():
        base = {"kind": "stats", "layer": None, "scope": "global", "model": r.metric, "model_b": "merging_loss",
                "n": r.n}
        rows.append({**base, "metric": "pearson_r", "value": None if np.isnan(r.r) else r.r})
        rows.append({**base, "metric": "pearson_p", "value": None if np.isnan(r.p) else r.p})
    return rows
