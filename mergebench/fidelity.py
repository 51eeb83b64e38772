"""How faithful the embedded benchmark is to the papers: each published finding tested on the store.

``suites/papers/findings.yaml`` declares the papers' findings (each with its place in the paper)
and the published method rankings to compare with. :func:`fidelity_table` tests every one on a
suite's embedded profile and returns one row per finding and per ranking: the embedded result,
a seeded 95 % bootstrap interval and a verdict (:data:`REPRODUCED`, :data:`NOT_REPRODUCED` or
:data:`NOT_TESTABLE`) with the reason. Rank agreement is Kendall's tau-b between the embedded and
the published ranking of the methods both have, matched on configuration (the suite file records
each paper's hyperparameters), never on the name alone.

Everything here is a pure function of a DuckDB connection (:func:`mergebench.report.connect`) and
the findings file; the rows are what ``mergebench fidelity`` prints and stores
(``results/fidelity/``, the ``fidelity`` view of ``mergebench sql``), the leaderboard's Fidelity
page shows and :func:`markdown_table` writes into ``suites/README.md``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from scipy import stats

from mergebench import report
from mergebench.config import papers
from mergebench.config.yamlio import ConfigError, format_validation_error, read_yaml
from mergebench.errors import MergebenchError
from mergebench.paths import suites_root
from mergebench.results import metrics, store

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
NOT_TESTABLE = "not testable here"
VERDICTS = (REPRODUCED, NOT_REPRODUCED, NOT_TESTABLE)
PROFILE = "embedded"
SEED = report.BOOT_SEED
N_BOOT = 1_000
CI = 0.95
#: Fewest methods a rank agreement is computed over (with two, tau is only ever +1 or -1).
MIN_RANKED = 3

#: Per-unit quantities a finding can test (columns of :func:`suite_data`'s ``units``).
QUANTITIES = {"score": "headline score", "beats_base": "P(> base)", "gain_vs_base_pp": "gain over the base (pp)",
              "beats_best_expert": "P(> best expert)", "gain_vs_best_expert_pp": "gain over the best expert (pp)",
              "task_vector_norm": "‖θ − θ_base‖₂", "merging_loss_pct": "merging loss (%)"}

#: Columns of :func:`fidelity_table` (and of the store's ``fidelity`` view, with ``computed_at``).
COLUMNS = ["suite", "profile", "pool", "kind", "id", "paper", "paper_title", "where", "claim", "check", "quantity",
           "estimate", "ci_low", "ci_high", "n_obs", "observed", "verdict", "reason", "seed", "n_boot", "inputs_hash"]


class FidelityError(MergebenchError, ValueError):
    """The findings file is invalid, or a fidelity check was asked for something it cannot test."""


def findings_file() -> Path:
    """``suites/papers/findings.yaml`` (under ``$MERGEBENCH_SUITES`` when set). Not ``suites/*.yaml``:
    every YAML file there is read as a suite."""
    return suites_root() / "papers" / "findings.yaml"


# ------------------------------------------------------------------------------ the file


class FindingSpec(BaseModel):
    """One published finding and how the embedded benchmark tests it (see the file's header)."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=r"^[a-z0-9_]+$")
    paper: str
    where: str
    claim: str
    suite: str
    check: Literal["trend", "share", "method_gap", "collapse", "anova", "correlation", "activation"]
    method: str | None = None
    versus: str | list[str] | None = None
    quantity: str | None = None
    direction: Literal["increasing", "decreasing"] | None = None
    role: Literal["merged", "expert"] | None = None
    below: float | None = None
    above: float | None = None
    min_gap: float = 0.0
    metric: str | None = None
    metrics: list[str] | None = None
    sign: Literal["positive", "negative", "none"] | None = None

    @model_validator(mode="after")
    def _fields_of_check(self):
        need = {"trend": ("method", "quantity", "direction"), "share": ("role", "quantity"),
                "method_gap": ("method", "versus", "quantity"), "collapse": (), "anova": (),
                "correlation": ("sign",), "activation": ("method", "versus", "metric")}[self.check]
        lacking = [k for k in need if getattr(self, k) is None]
        if lacking:
            raise ValueError(f"check {self.check!r} needs {', '.join(lacking)}")
        if self.quantity is not None and self.quantity not in QUANTITIES:
            raise ValueError(f"quantity {self.quantity!r} is not one of {', '.join(QUANTITIES)}")
        if self.check == "share" and (self.below is None) == (self.above is None):
            raise ValueError("check 'share' needs exactly one of below, above")
        if self.check == "correlation" and (self.metric is None) == (self.metrics is None):
            raise ValueError("check 'correlation' needs exactly one of metric, metrics")
        return self

    @property
    def baselines(self) -> list[str]:
        return [self.versus] if isinstance(self.versus, str) else list(self.versus or [])


class RankingSpec(BaseModel):
    """A published ranking of methods to compare the embedded ranking with."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=r"^[a-z0-9_]+$")
    paper: str
    where: str
    suite: str
    tables: list[str] = Field(min_length=1)
    quantity: Literal["score", "gain_vs_base_pp", "gain_vs_best_expert_pp", "merging_loss_pct"]
    n: Literal["common"] | int = "common"
    embedded_n: Literal["max"] | int | None = None
    goal: float = 0.6


class FindingsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alpha: float = Field(0.05, gt=0, lt=1)
    findings: list[FindingSpec]
    rankings: list[RankingSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _ids_and_papers(self):
        ids = [f.id for f in self.findings] + [r.id for r in self.rankings]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"id {dup[0]!r} is used twice")
        known = set(papers.load_papers())
        bad = sorted({x.paper for x in [*self.findings, *self.rankings]} - known)
        if bad:
            raise ValueError(f"paper {bad[0]!r} is not a key of suites/papers/papers.yaml")
        return self


def load_findings(path: str | Path | None = None) -> FindingsFile:
    """Read and validate the findings file; a problem is one :class:`FidelityError` line naming the
    file and the field."""
    path = Path(path) if path is not None else findings_file()
    try:
        return FindingsFile.model_validate(read_yaml(path))
    except ConfigError as exc:
        raise FidelityError(str(exc)) from None
    except ValidationError as exc:
        raise FidelityError(format_validation_error(path, exc)) from None


# ------------------------------------------------------------------------------ the data


@dataclass(frozen=True)
class SuiteData:
    """What the checks of one suite read: its embedded units with their references, the per-task
    merging losses (glue-style profiles), the pool's diagnostics and the published rows."""

    suite: str
    profile: str
    pool: str | None
    units: pd.DataFrame
    losses: pd.DataFrame
    diagnostics: pd.DataFrame
    paper: pd.DataFrame
    configs: Mapping[str, dict[str, Any]]  # method -> the paper's configuration recorded in the suite file


def paper_configurations(suite: str) -> dict[str, dict[str, Any]]:
    """method -> the hyperparameters the suite file records for its paper (suite-level params with
    the ``paper`` profile's overrides, :func:`mergebench.report.paper_config`); empty when the suite
    cannot be loaded."""
    s = report.suite_definitions().get(suite)
    if s is None:
        return {}
    names = set(s.methods) | set(s.profiles["paper"].methods if "paper" in s.profiles else ())
    return {m: json.loads(report.paper_config(suite, m, "paper")) for m in sorted(names)}


def suite_data(con, suite: str, profile: str = PROFILE) -> SuiteData:
    """Gather :class:`SuiteData` from a :func:`mergebench.report.connect` connection: the (suite,
    profile) group on the profile's default pool when it has merged rows, else the group written
    last, else the default pool (for diagnostics)."""
    groups = report.run_groups(con)
    g = groups[(groups["suite"] == suite) & (groups["profile"] == profile)]
    default = report.default_pool(suite, profile)
    pool = default if default in set(g["pool"]) or not len(g) else g["pool"].iloc[0]
    empty = pd.DataFrame(columns=["unit_id", "role", "method", "params_json", "n", "subset", "score"])
    units, losses = empty, pd.DataFrame(columns=["unit_id", "method", "n", "task", "merging_loss_pct"])
    if len(g):
        f = report.Filters(suite=suite, profile=profile, pool=pool)
        table = report.unit_table(con, f).sort_values("unit_id", kind="stable", ignore_index=True)
        units = metrics.compare_to_references(table)
        norms = report.df(con, "SELECT unit_id, max(task_vector_norm) AS task_vector_norm FROM provenance "
                               "WHERE task_vector_norm IS NOT NULL GROUP BY unit_id")
        units = units.merge(norms, on="unit_id", how="left").sort_values("unit_id", ignore_index=True)
        if (suite, profile) in report.loss_profiles():
            losses = report.task_merging_loss(con, f, units[units["role"] == "merged"])
            per_unit = metrics.average_merging_loss(losses)[["unit_id", "merging_loss_pct"]]
            units = units.merge(per_unit, on="unit_id", how="left")
    diag = (report.df(con, "SELECT kind, metric, method, model, model_b, layer, task, value FROM diagnostics "
                           "WHERE pool = ?", [pool]) if pool is not None else pd.DataFrame())
    return SuiteData(suite, profile, pool, units, losses, diag, report.paper_ranking(con, report.Filters(suite=suite)),
                     paper_configurations(suite))


def method_units(data: SuiteData, method: str) -> tuple[pd.DataFrame, str | None]:
    """The merged units of `method` in the paper's configuration, and None; or no units and why not.

    A method the suite file records a configuration for counts only in that configuration
    (:func:`mergebench.report.same_configuration`); one it records none for counts as stored
    (its most used configuration, when several)."""
    u = data.units
    rows = u[(u["role"] == "merged") & (u["method"] == method)] if len(u) else u
    where = f"the {data.suite} {data.profile} profile"
    if rows.empty:
        return rows, f"no merged rows of {method} in {where} (run `mergebench eval --method {method} --suite {data.suite}`)"
    stored = rows["params_json"].fillna("{}")
    if method in data.configs:
        want = data.configs[method]
        ok = stored.map(lambda j: report.same_configuration(method, json.loads(j), want))
        if not ok.any():
            have = " or ".join(sorted({report.config_params(j) for j in stored}))
            return rows.iloc[:0], (f"the stored {method} rows ({have}) are not in the paper's configuration "
                                   f"({report.config_params(json.dumps(want))})")
        return rows[ok.to_numpy()], None
    top = stored.value_counts().index[0]
    return rows[stored == top], None


# ---------------------------------------------------------------------------- statistics


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b of two paired samples (ties in either corrected for); NaN when either is constant."""
    return float(_tau_rows(np.asarray(x, dtype=np.float64)[None, :], np.asarray(y, dtype=np.float64))[0])


def _tau_rows(xs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """tau-b of every row of `xs` (B x k) against the fixed `y` (k): vectorized over the rows."""
    xs = np.round(xs, metrics.TIE_DECIMALS)
    y = np.round(y, metrics.TIE_DECIMALS)
    i, j = np.triu_indices(len(y), k=1)
    sx = np.sign(xs[:, i] - xs[:, j])
    sy = np.sign(y[i] - y[j])
    num = (sx * sy).sum(axis=1)
    den = np.sqrt((sx != 0).sum(axis=1) * float((sy != 0).sum()))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _quantiles(values: np.ndarray) -> tuple[float, float]:
    v = values[np.isfinite(values)]
    if v.size == 0:
        return math.nan, math.nan
    a = (1.0 - CI) / 2.0
    lo, hi = np.quantile(v, [a, 1.0 - a])
    return float(lo), float(hi)


def _strata_resample(groups: Sequence[np.ndarray], n_boot: int, rng: np.random.Generator) -> list[np.ndarray]:
    """For each group of values, a (n_boot x size) matrix of resamples within the group."""
    return [g[rng.integers(0, len(g), size=(n_boot, len(g)))] for g in groups]


def trend_slope(n: Sequence[float], y: Sequence[float], *, n_boot: int = N_BOOT, seed: int = SEED
                ) -> tuple[float, float, float]:
    """(OLS slope of y on n, 95 % interval): units resampled within each n, so every resample keeps
    the design's sizes; seeded (:func:`metrics.bootstrap_rng`). Values are sorted within each size
    first, so the interval does not depend on row order."""
    n = np.asarray(n, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    order = np.lexsort((y, n))
    n, y = n[order], y[order]
    sizes = np.unique(n)
    if sizes.size < 2:
        raise FidelityError("a trend needs at least two merge sizes")
    xc = n - n.mean()
    slope = float((xc * (y - y.mean())).sum() / (xc**2).sum())
    rng = metrics.bootstrap_rng(seed)
    groups = [np.sort(y[n == s]) for s in sizes]
    boot_y = np.concatenate(_strata_resample(groups, n_boot, rng), axis=1)
    x = np.concatenate([np.full(len(g), s) for g, s in zip(groups, sizes)])
    xc = x - x.mean()
    slopes = ((boot_y - boot_y.mean(axis=1, keepdims=True)) * xc).sum(axis=1) / (xc**2).sum()
    return (slope, *_quantiles(slopes))


def eta_squared(values: np.ndarray, labels: np.ndarray) -> float:
    """Share of the variance of `values` explained by the groups `labels` (one-way ANOVA's SS_between / SS_total)."""
    values = np.asarray(values, dtype=np.float64)
    _, codes = np.unique(labels, return_inverse=True)
    total = ((values - values.mean()) ** 2).sum()
    if total == 0:
        return math.nan
    sums = np.bincount(codes, weights=values)
    counts = np.bincount(codes)
    between = (sums**2 / np.maximum(counts, 1)).sum() - values.sum() ** 2 / values.size
    return float(between / total)


# ------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class Result:
    """The outcome of one check, before it becomes a row."""

    verdict: str
    reason: str
    estimate: float = math.nan
    ci_low: float = math.nan
    ci_high: float = math.nan
    n_obs: int = 0
    observed: str = ""


def untestable(reason: str) -> Result:
    return Result(NOT_TESTABLE, reason)


def _num(v: float, spec: str = "{:+.3g}") -> str:
    return "—" if v is None or not np.isfinite(v) else spec.format(v)


def _interval(lo: float, hi: float) -> str:
    return f"[{_num(lo)}, {_num(hi)}]"


def _unit_values(rows: pd.DataFrame, quantity: str) -> pd.DataFrame:
    d = rows[["unit_id", "n", "subset", quantity]].rename(columns={quantity: "y"})
    d = d.assign(y=pd.to_numeric(d["y"].astype("float64"), errors="coerce"), n=d["n"].astype(int))
    return d[d["y"].notna()]


def _per_n(d: pd.DataFrame, spec: str = "{:.3g}") -> str:
    return ", ".join(f"n={int(k)}: {spec.format(v)}" for k, v in d.groupby("n")["y"].mean().items())


def check_trend(data: SuiteData, f: FindingSpec, *, n_boot: int, seed: int, alpha: float) -> Result:
    rows, why = method_units(data, f.method)
    if why:
        return untestable(why)
    d = _unit_values(rows, f.quantity)
    if d.empty:
        return untestable(f"no {f.method} unit of {data.suite} recorded {QUANTITIES[f.quantity]}")
    if d["n"].nunique() < 2:
        return untestable(f"{f.method} has rows at one merge size only (n = {d['n'].iloc[0]})")
    slope, lo, hi = trend_slope(d["n"], d["y"], n_boot=n_boot, seed=seed)
    observed = f"slope {_num(slope)} per added expert; {_per_n(d)}"
    up = f.direction == "increasing"
    if (lo > 0) if up else (hi < 0):
        return Result(REPRODUCED, f"the 95 % interval of the slope {_interval(lo, hi)} lies "
                                  f"{'above' if up else 'below'} 0", slope, lo, hi, len(d), observed)
    if d.groupby("n")["y"].mean().nunique() == 1:
        why = f"{QUANTITIES[f.quantity]} is {d['y'].iloc[0]:.3g} at every n: no room for a trend"
    elif (hi < 0) if up else (lo > 0):
        why = f"the opposite trend: the slope's interval {_interval(lo, hi)} lies {'below' if up else 'above'} 0"
    else:
        why = f"the slope's interval {_interval(lo, hi)} includes 0: no decidable trend at this power"
    return Result(NOT_REPRODUCED, why, slope, lo, hi, len(d), observed)


def check_share(data: SuiteData, f: FindingSpec, *, n_boot: int, seed: int, alpha: float) -> Result:
    u = data.units
    rows = u[u["role"] == f.role] if len(u) else u
    if rows.empty:
        return untestable(f"no {f.role} rows in the {data.suite} {data.profile} profile")
    x = pd.to_numeric(rows[f.quantity].astype("float64"), errors="coerce").dropna().to_numpy()
    if x.size == 0:
        return untestable(f"the {f.role} rows have no {QUANTITIES[f.quantity]} (no base model scored?)")
    est, lo, hi = metrics.bootstrap_ci(x, n_boot=n_boot, seed=seed)
    thr, below = (f.below, True) if f.below is not None else (f.above, False)
    observed = f"{int(x.sum())} of {x.size} {f.role}s ({est:.0%})"
    side = "below" if below else "above"
    if (hi < thr) if below else (lo > thr):
        return Result(REPRODUCED, f"the 95 % interval [{lo:.2f}, {hi:.2f}] lies {side} {thr:g}", est, lo, hi, x.size,
                      observed)
    wrong = (lo >= thr) if below else (hi <= thr)
    why = (f"the 95 % interval [{lo:.2f}, {hi:.2f}] lies on the other side of {thr:g}" if wrong
           else f"the 95 % interval [{lo:.2f}, {hi:.2f}] includes {thr:g}")
    return Result(NOT_REPRODUCED, why, est, lo, hi, x.size, observed)


def paired_gap(a: pd.DataFrame, b: pd.DataFrame, *, n_boot: int, seed: int) -> tuple[float, float, float, int, bool]:
    """(mean of a − mean of b, 95 % interval, observations, paired?): paired on shared subsets when
    at least two are shared, else two independent resamples."""
    ka = a.assign(k=metrics.pair_key(a["subset"])).groupby("k")["y"].mean()
    kb = b.assign(k=metrics.pair_key(b["subset"])).groupby("k")["y"].mean()
    shared = ka.index.intersection(kb.index)
    if len(shared) >= 2:
        diff = (ka[shared] - kb[shared]).to_numpy()
        est, lo, hi = metrics.bootstrap_ci(diff, n_boot=n_boot, seed=seed)
        return est, lo, hi, len(shared), True
    rng = metrics.bootstrap_rng(seed)
    xa, xb = np.sort(a["y"].to_numpy()), np.sort(b["y"].to_numpy())
    ba, bb = _strata_resample([xa, xb], n_boot, rng)
    lo, hi = _quantiles(ba.mean(axis=1) - bb.mean(axis=1))
    return float(xa.mean() - xb.mean()), lo, hi, len(xa) + len(xb), False


def check_method_gap(data: SuiteData, f: FindingSpec, *, n_boot: int, seed: int, alpha: float) -> Result:
    ra, why = method_units(data, f.method)
    if why:
        return untestable(why)
    rb, why = method_units(data, f.baselines[0])
    if why:
        return untestable(why)
    a, b = _unit_values(ra, f.quantity), _unit_values(rb, f.quantity)
    sizes = sorted(set(a["n"]) & set(b["n"]))
    if not sizes:
        return untestable(f"{f.method} and {f.baselines[0]} share no merge size")
    n = sizes[-1]
    a, b = a[a["n"] == n], b[b["n"] == n]
    est, lo, hi, k, paired = paired_gap(a, b, n_boot=n_boot, seed=seed)
    observed = (f"{f.method} − {f.baselines[0]} at n = {n}: {_num(est)} ({'paired on' if paired else 'unpaired,'} "
                f"{k} {'shared subsets' if paired else 'units'})")
    if lo > f.min_gap:
        return Result(REPRODUCED, f"the 95 % interval {_interval(lo, hi)} lies above {f.min_gap:g}", est, lo, hi, k,
                      observed)
    why = (f"{f.baselines[0]} is ahead: the interval {_interval(lo, hi)} lies below {f.min_gap:g}" if hi < f.min_gap
           else f"the 95 % interval {_interval(lo, hi)} includes {f.min_gap:g}: no decidable difference")
    return Result(NOT_REPRODUCED, why, est, lo, hi, k, observed)


def _losses_or_why(data: SuiteData) -> tuple[pd.DataFrame, str | None]:
    if data.losses.empty:
        if (data.suite, data.profile) not in report.loss_profiles():
            return data.losses, f"the {data.suite} {data.profile} profile does not score the merging loss"
        return data.losses, f"no merged rows with their experts' scores in the {data.suite} {data.profile} profile"
    return data.losses[np.isfinite(data.losses["merging_loss_pct"].to_numpy(np.float64))], None


def check_collapse(data: SuiteData, f: FindingSpec, *, n_boot: int, seed: int, alpha: float) -> Result:
    losses, why = _losses_or_why(data)
    if why:
        return untestable(why)
    n = int(losses["n"].max())
    top = losses[losses["n"] == n]
    piv = top.pivot_table(index="task", columns="method", values="merging_loss_pct", aggfunc="mean").dropna()
    if piv.empty:
        return untestable(f"no task is scored by every method at n = {n}")
    means = piv.mean()
    best = means.idxmax()
    x = piv.sort_index().to_numpy()
    rng = metrics.bootstrap_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    lo, hi = _quantiles(x[idx].mean(axis=1).max(axis=1))
    observed = f"n = {n}: " + ", ".join(f"{m} {v:+.1f} %" for m, v in means.sort_values(ascending=False).items())
    if hi < 0:
        return Result(REPRODUCED, f"even the least lossy method ({best}) loses: its interval {_interval(lo, hi)} "
                                  "lies below 0", float(means.max()), lo, hi, len(x), observed)
    return Result(NOT_REPRODUCED, f"the least lossy method ({best}) has the interval {_interval(lo, hi)}, which "
                                  "includes or lies above 0: no collapse", float(means.max()), lo, hi, len(x), observed)


def check_anova(data: SuiteData, f: FindingSpec, *, n_boot: int, seed: int, alpha: float) -> Result:
    losses, why = _losses_or_why(data)
    if why:
        return untestable(why)
    if losses["method"].nunique() < 2 or losses["task"].nunique() < 2:
        return untestable("needs at least two methods and two tasks with merging losses")
    d = losses.sort_values(["unit_id", "task"], ignore_index=True)
    y = d["merging_loss_pct"].to_numpy(np.float64)
    p_task = float(stats.f_oneway(*[g.to_numpy() for _, g in d.groupby("task")["merging_loss_pct"]]).pvalue)
    p_method = float(stats.f_oneway(*[g.to_numpy() for _, g in d.groupby("method")["merging_loss_pct"]]).pvalue)
    task, method = d["task"].to_numpy(), d["method"].to_numpy()
    est = eta_squared(y, task) - eta_squared(y, method)
    units = d["unit_id"].to_numpy()
    uids, start = np.unique(units, return_index=True)
    bounds = list(zip(start, [*start[1:], len(d)]))
    rng = metrics.bootstrap_rng(seed)
    draws = rng.integers(0, len(uids), size=(n_boot, len(uids)))
    boot = np.empty(n_boot)
    for b, pick in enumerate(draws):  # resamples (1,000), not rows: each a few numpy reductions
        rows = np.concatenate([np.arange(*bounds[i]) for i in pick])
        boot[b] = eta_squared(y[rows], task[rows]) - eta_squared(y[rows], method[rows])
    lo, hi = _quantiles(boot)
    observed = (f"p(task) = {p_task:.2g}, p(method) = {p_method:.2g}; η²(task) − η²(method) = {est:+.2f} over "
                f"{len(uids)} merges × their tasks")
    if p_task < alpha <= p_method and lo > 0:
        return Result(REPRODUCED, f"the task is significant and the method is not (alpha {alpha:g}); the η² gap's "
                                  f"interval {_interval(lo, hi)} lies above 0", est, lo, hi, len(d), observed)
    parts = []
    if p_task >= alpha:
        parts.append(f"the task effect is not significant (p = {p_task:.2g})")
    if p_method < alpha:
        parts.append(f"the method effect is significant (p = {p_method:.2g})")
    if not lo > 0:
        parts.append(f"the η² gap's interval {_interval(lo, hi)} includes 0")
    return Result(NOT_REPRODUCED, "; ".join(parts), est, lo, hi, len(d), observed)


def _pearson(x: np.ndarray, y: np.ndarray, *, n_boot: int, seed: int) -> tuple[float, float, float, float]:
    """(r, p, 95 % interval of r): observations resampled (a resample with a constant side is dropped)."""
    order = np.lexsort((y, x))
    x, y = x[order], y[order]
    r, p = stats.pearsonr(x, y)
    rng = metrics.bootstrap_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    bx, by = x[idx], y[idx]
    bx = bx - bx.mean(axis=1, keepdims=True)
    by = by - by.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        rs = (bx * by).sum(axis=1) / np.sqrt((bx**2).sum(axis=1) * (by**2).sum(axis=1))
    return float(r), float(p), *_quantiles(rs)


def _pair_losses(data: SuiteData) -> pd.Series:
    """Mean merging loss of each pair merge (n = 2) over its two tasks, averaged over the methods; by pair key."""
    losses, _ = _losses_or_why(data)
    pairs = losses[losses["n"] == 2]
    if pairs.empty:
        return pd.Series(dtype=float)
    subsets = data.units.set_index("unit_id")["subset"]
    per_unit = pairs.groupby(["unit_id", "method"], as_index=False)["merging_loss_pct"].mean()
    per_unit["k"] = metrics.pair_key(per_unit["unit_id"].map(subsets)).to_numpy()
    return per_unit.groupby("k")["merging_loss_pct"].mean()


def _pairwise_metric(data: SuiteData, metric: str) -> pd.Series:
    d = data.diagnostics
    if d.empty:
        return pd.Series(dtype=float)
    d = d[(d["metric"] == metric) & d["model_b"].notna() & d["method"].isna()]
    if d.empty:
        return pd.Series(dtype=float)
    k = [("|".join(sorted((a, b)))) for a, b in zip(d["model"], d["model_b"])]
    return d.assign(k=k).groupby("k")["value"].mean()


def check_correlation(data: SuiteData, f: FindingSpec, *, n_boot: int, seed: int, alpha: float) -> Result:
    losses, why = _losses_or_why(data)
    if why:
        return untestable(why)
    if data.diagnostics.empty:
        return untestable(f"no diagnostics for pool {data.pool} (run `mergebench diagnose` and `mergebench stats`)")
    names = [f.metric] if f.metric else list(f.metrics or [])
    found = []
    for name in names:
        if name == "mds":
            d = data.diagnostics
            mds = d[(d["metric"] == "mds") & d["task"].notna()].groupby("task")["value"].mean()
            n = int(losses["n"].max())
            best = losses[losses["n"] == n].groupby(["task", "method"])["merging_loss_pct"].mean().groupby("task").max()
            joined = pd.concat([mds.rename("x"), best.rename("y")], axis=1, join="inner")
            unit = f"tasks (best method's loss at n = {n})"
        else:
            joined = pd.concat([_pairwise_metric(data, name).rename("x"), _pair_losses(data).rename("y")], axis=1,
                               join="inner")
            unit = "pair merges"
        joined = joined.dropna()
        if len(joined) < 4:
            return untestable(f"{len(joined)} {unit} have both {name} and a merging loss (need 4)")
        r, p, lo, hi = _pearson(joined["x"].to_numpy(np.float64), joined["y"].to_numpy(np.float64), n_boot=n_boot,
                                seed=seed)
        found.append((name, r, p, lo, hi, len(joined), unit))
    observed = "; ".join(f"{nm}: r = {r:+.2f}, p = {p:.2g} over {k} {u}" for nm, r, p, _, _, k, u in found)
    if f.sign == "none":
        name, r, p, lo, hi, k, _ = min(found, key=lambda t: t[2])
        if p >= alpha:
            return Result(REPRODUCED, f"no metric is significant (smallest p = {p:.2g}, {name})", r, lo, hi, k, observed)
        return Result(NOT_REPRODUCED, f"{name} is significantly correlated (p = {p:.2g})", r, lo, hi, k, observed)
    name, r, p, lo, hi, k, _ = found[0]
    want = 1 if f.sign == "positive" else -1
    if p < alpha and np.sign(r) == want and ((lo > 0) if want > 0 else (hi < 0)):
        return Result(REPRODUCED, f"{f.sign} and significant (p = {p:.2g}); r's interval {_interval(lo, hi)} excludes 0",
                      r, lo, hi, k, observed)
    parts = [f"not significant (p = {p:.2g})" if p >= alpha else f"significant (p = {p:.2g})"]
    if np.sign(r) != want:
        parts.append(f"and of the other sign (r = {r:+.2f}; the paper: {f.sign} in eq. 1's sign)")
    parts.append(f"r's interval {_interval(lo, hi)}")
    return Result(NOT_REPRODUCED, ", ".join(parts), r, lo, hi, k, observed)


def _layer_index(layer: Any) -> float:
    try:
        return float(str(layer).rsplit(".", 1)[1])
    except (IndexError, ValueError):
        return math.nan


def check_activation(data: SuiteData, f: FindingSpec, *, n_boot: int, seed: int, alpha: float) -> Result:
    d = data.diagnostics
    if d.empty:
        return untestable(f"no diagnostics for pool {data.pool} (run `mergebench diagnose --activations`)")
    d = d[(d["kind"] == "activations") & (d["metric"] == f.metric)]
    d = d.assign(i=d["layer"].map(_layer_index))
    d = d[d["i"].notna() & (d["i"] >= 0)]
    piv = d.pivot_table(index="i", columns="method", values="value", aggfunc="mean")
    lacking = [m for m in [f.method, *f.baselines] if m not in piv]
    if lacking:
        return untestable(f"no {f.metric} activation diagnostics of {', '.join(lacking)} for pool {data.pool}")
    deep = piv[piv.index >= np.median(piv.index)].sort_index()
    base = deep[f.baselines].to_numpy()
    gaps = (deep[[f.method]].to_numpy() - base) / np.abs(base)  # layers x baselines
    est_each = gaps.mean(axis=0)
    rng = metrics.bootstrap_rng(seed)
    idx = rng.integers(0, len(gaps), size=(n_boot, len(gaps)))
    lo, hi = _quantiles(gaps[idx].mean(axis=1).min(axis=1))
    est = float(est_each.min())
    layers = ", ".join(str(int(i)) for i in deep.index)
    observed = (f"{f.metric} of {f.method} vs " + ", ".join(f"{b} {100 * g:+.2g} %" for b, g in zip(f.baselines, est_each))
                + f" (mean relative gap, layers {layers})")
    if lo > f.min_gap:
        return Result(REPRODUCED, f"the smallest gap's interval {_interval(lo, hi)} lies above {f.min_gap:g}", est,
                      lo, hi, len(gaps), observed)
    why = (f"the smallest gap's interval {_interval(lo, hi)} is not above {f.min_gap:g} (a {f.min_gap:.0%} "
           "relative gap): the merges are too alike to show a collapse")
    return Result(NOT_REPRODUCED, why, est, lo, hi, len(gaps), observed)


CHECKS: dict[str, Callable[..., Result]] = {
    "trend": check_trend, "share": check_share, "method_gap": check_method_gap, "collapse": check_collapse,
    "anova": check_anova, "correlation": check_correlation, "activation": check_activation}


# --------------------------------------------------------------------------- rank agreement


def _unit_quantity(data: SuiteData, method: str, quantity: str) -> tuple[pd.DataFrame, str | None]:
    rows, why = method_units(data, method)
    if why:
        return rows, why
    if quantity not in rows:
        return rows.iloc[:0], f"{method} rows have no {QUANTITIES[quantity]}"
    return _unit_values(rows, quantity), None


def rank_agreement(data: SuiteData, r: RankingSpec, *, n_boot: int = N_BOOT, seed: int = SEED) -> Result:
    """Kendall's tau-b between the embedded and the published ranking of the methods both have (matched
    on configuration): embedded means per method over the sizes compared, published means over the
    paper's models; interval from embedded units resampled within each (method, n)."""
    pap = data.paper[data.paper["table"].isin(r.tables)] if len(data.paper) else data.paper
    pap = pap[pap[r.quantity].notna()] if len(pap) else pap
    if pap.empty:
        return untestable(f"the tables {', '.join(r.tables)} print no {QUANTITIES[r.quantity]}")
    published = pap.groupby(["method", "n"])[r.quantity].mean()
    emb, skipped, absent = {}, [], []
    for m in sorted(pap["method"].unique()):
        d, why = _unit_quantity(data, m, r.quantity)
        if why and why.startswith("no merged rows"):
            absent.append(m)
        elif why:
            skipped.append(f"{m}: {why}")
        elif not d.empty:
            emb[m] = d
    if absent:
        skipped.append(f"no merged rows here of {', '.join(absent)}")
    if r.n == "common":
        pairs = {m: [(n, n) for n in sorted(set(d["n"]) & set(published[m].index))] for m, d in emb.items()}
    else:
        pairs = {m: [(int(d["n"].max()) if r.embedded_n in (None, "max") else int(r.embedded_n), int(r.n))]
                 for m, d in emb.items()}
        pairs = {m: [(e, p) for e, p in ps if e in set(emb[m]["n"]) and p in published[m].index]
                 for m, ps in pairs.items()}
    if r.n == "common" and pairs:  # the sizes every compared method has, so no method is averaged over others'
        common = set.intersection(*[{e for e, _ in ps} for ps in pairs.values() if ps] or [set()])
        pairs = {m: [(e, p) for e, p in ps if e in common] for m, ps in pairs.items()}
    ranked = sorted(m for m, ps in pairs.items() if ps)
    skipped += [f"{m}: no size in common with the paper" for m, ps in pairs.items() if not ps]
    if len(ranked) < MIN_RANKED:
        have = ", ".join(ranked) or "none"
        return untestable(f"{len(ranked)} method(s) comparable on configuration ({have}); tau needs {MIN_RANKED}"
                          + (f" — {'; '.join(skipped)}" if skipped else ""))
    y = np.array([np.mean([published[m][p] for _, p in pairs[m]]) for m in ranked])
    strata = [(m, e) for m in ranked for e, _ in pairs[m]]
    groups = [np.sort(emb[m].loc[emb[m]["n"] == e, "y"].to_numpy()) for m, e in strata]
    x = np.array([np.mean([g.mean() for (mm, _), g in zip(strata, groups) if mm == m]) for m in ranked])
    tau = kendall_tau(x, y)
    rng = metrics.bootstrap_rng(seed)
    boot = np.stack([b.mean(axis=1) for b in _strata_resample(groups, n_boot, rng)], axis=1)  # B x strata
    owner = np.array([ranked.index(m) for m, _ in strata])
    xs = np.stack([boot[:, owner == i].mean(axis=1) for i in range(len(ranked))], axis=1)
    lo, hi = _quantiles(_tau_rows(xs, y))
    sizes = sorted({e for m in ranked for e, _ in pairs[m]})
    paper_sizes = sorted({p for m in ranked for _, p in pairs[m]})
    order = lambda v: " > ".join(m for _, m in sorted(zip(-v, ranked)))
    at = f"n = {', '.join(map(str, sizes))}" + ("" if paper_sizes == sizes
                                                else f"; the paper's n = {', '.join(map(str, paper_sizes))}")
    observed = f"here {order(x)}; paper {order(y)} ({at})"
    if all(len(g) == 1 for g in groups):
        observed += "; one unit per method and size, so the interval cannot show their uncertainty"
    if skipped:
        observed += "; left out: " + "; ".join(skipped)
    if tau >= r.goal and lo > 0:
        return Result(REPRODUCED, f"tau {tau:+.2f} reaches the goal {r.goal:g} and its interval {_interval(lo, hi)} "
                                  "lies above 0", tau, lo, hi, len(ranked), observed)
    why = (f"tau {tau:+.2f} is below the goal {r.goal:g}" if not tau >= r.goal
           else f"tau {tau:+.2f} reaches the goal but its interval {_interval(lo, hi)} includes 0")
    return Result(NOT_REPRODUCED, why, tau, lo, hi, len(ranked), observed)


# ------------------------------------------------------------------------------ the table


def inputs_hash(con, findings_path: str | Path | None = None) -> str:
    """Fingerprint of what the table is computed from: the store's unit ids (results, diagnostics),
    the published rows and the findings file; a stored table with another hash is stale."""
    q = ("SELECT (SELECT string_agg(DISTINCT unit_id, ',' ORDER BY unit_id) FROM results) AS r, "
         "(SELECT string_agg(DISTINCT unit_id, ',' ORDER BY unit_id) FROM diagnostics) AS d, "
         "(SELECT count(*) FROM paper) AS p")
    row = report.df(con, q).iloc[0]
    text = Path(findings_path or findings_file()).read_text(encoding="utf-8")
    return hashlib.sha256(f"{row['r']}|{row['d']}|{row['p']}|{text}".encode()).hexdigest()[:16]


def _row(data: SuiteData, kind: str, spec: FindingSpec | RankingSpec, check: str, quantity: str | None,
         res: Result, seed: int, n_boot: int, digest: str) -> dict[str, Any]:
    return {"suite": data.suite, "profile": data.profile, "pool": data.pool, "kind": kind, "id": spec.id,
            "paper": spec.paper, "paper_title": papers.get_paper(spec.paper).short_title, "where": spec.where,
            "claim": getattr(spec, "claim", None) or f"the published method ranking ({QUANTITIES[quantity]})",
            "check": check, "quantity": quantity, "estimate": res.estimate, "ci_low": res.ci_low,
            "ci_high": res.ci_high, "n_obs": int(res.n_obs), "observed": res.observed, "verdict": res.verdict,
            "reason": res.reason, "seed": int(seed), "n_boot": int(n_boot), "inputs_hash": digest}


def evaluate_suite(data: SuiteData, spec: FindingsFile, *, seed: int = SEED, n_boot: int = N_BOOT,
                   digest: str = "") -> pd.DataFrame:
    """Rows (:data:`COLUMNS`) for every finding and ranking of `data`'s suite, in file order."""
    rows = []
    for f in spec.findings:
        if f.suite == data.suite:
            res = CHECKS[f.check](data, f, n_boot=n_boot, seed=seed, alpha=spec.alpha)
            rows.append(_row(data, "finding", f, f.check, f.quantity or f.metric, res, seed, n_boot, digest))
    for r in spec.rankings:
        if r.suite == data.suite:
            res = rank_agreement(data, r, n_boot=n_boot, seed=seed)
            rows.append(_row(data, "ranking", r, "kendall_tau", r.quantity, res, seed, n_boot, digest))
    return pd.DataFrame(rows, columns=COLUMNS)


def fidelity_table(con, suite: str | None = None, *, seed: int = SEED, n_boot: int = N_BOOT,
                   findings_path: str | Path | None = None) -> pd.DataFrame:
    """Every finding and ranking of the findings file (of `suite` only, when given) tested on the
    embedded profile of the store behind `con` (:func:`mergebench.report.connect`)."""
    spec = load_findings(findings_path)
    suites = list(dict.fromkeys([x.suite for x in [*spec.findings, *spec.rankings]]))
    if suite is not None:
        if suite not in suites:
            raise FidelityError(f"no finding of {findings_path or findings_file()} is about suite {suite!r} "
                                f"(suites with findings: {', '.join(suites)})")
        suites = [suite]
    metrics.bootstrap_rng(seed)  # refuse a bad seed before any work
    digest = inputs_hash(con, findings_path)
    frames = [evaluate_suite(suite_data(con, s), spec, seed=seed, n_boot=n_boot, digest=digest) for s in suites]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)


def summary(frame: pd.DataFrame) -> dict[str, int]:
    """Verdict -> count."""
    return {v: int((frame["verdict"] == v).sum()) for v in VERDICTS}


def markdown_table(frame: pd.DataFrame) -> str:
    """The fidelity table as GitHub markdown (what ``suites/README.md`` carries)."""
    head = "| suite | finding | paper | embedded result | 95 % CI | verdict | why |\n|---|---|---|---|---|---|---|\n"
    lines = []
    for r in frame.itertuples(index=False):
        ci = "" if not np.isfinite(r.ci_low) else f"[{_num(r.ci_low)}, {_num(r.ci_high)}]"
        cells = [r.suite, f"`{r.id}`: {r.claim}", f"{r.paper_title}, {r.where}", r.observed or "—", ci,
                 f"**{r.verdict}**", r.reason]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return head + "\n".join(lines) + "\n"


MARKERS = ("<!-- fidelity:start (generated by `mergebench fidelity --readme`; do not edit by hand) -->",
           "<!-- fidelity:end -->")


def with_table(text: str, frame: pd.DataFrame) -> str:
    """`text` with the block between :data:`MARKERS` replaced by :func:`markdown_table` (appended
    under a "Fidelity" heading when the markers are missing)."""
    counts = summary(frame)
    block = (f"{MARKERS[0]}\n{counts[REPRODUCED]} reproduced, {counts[NOT_REPRODUCED]} not reproduced, "
             f"{counts[NOT_TESTABLE]} not testable here (bootstrap seed {int(frame['seed'].iloc[0]) if len(frame) else SEED}, "
             f"{int(frame['n_boot'].iloc[0]) if len(frame) else N_BOOT:,} resamples).\n\n{markdown_table(frame)}{MARKERS[1]}")
    start, end = text.find(MARKERS[0]), text.find(MARKERS[1])
    if start >= 0 and end > start:
        return text[:start] + block + text[end + len(MARKERS[1]):]
    return text.rstrip("\n") + "\n\n## Fidelity to the papers\n\n" + block + "\n"


# ------------------------------------------------------------------------------ the store


def table_path(results_dir: str | Path, suite: str) -> Path:
    """Where a suite's fidelity rows are stored: ``<results>/fidelity/suite=<suite>/fidelity.parquet``."""
    return Path(results_dir) / store.FIDELITY_DIR / f"suite={quote(suite, safe='')}" / "fidelity.parquet"


def write_table(frame: pd.DataFrame, results_dir: str | Path) -> list[Path]:
    """Store `frame` (:func:`fidelity_table` rows) as one file per suite, each replaced atomically, so
    the store's ``fidelity`` view (``mergebench sql "select * from fidelity"``) reads the latest run.
    The rows are derived, like ``mergebench stats``' statistics: ``inputs_hash`` says what they were
    computed from (:func:`is_stale`)."""
    now = pd.Timestamp.now(tz="UTC").floor("us")
    paths = []
    for suite, rows in frame.groupby("suite", sort=True):
        rows = rows.assign(computed_at=now)
        cols = [pa.array(rows[f.name], f.type, from_pandas=True) if f.name in rows else pa.nulls(len(rows), f.type)
                for f in store.FIDELITY_SCHEMA]
        path = table_path(results_dir, str(suite))
        store.atomic_write_table(pa.Table.from_arrays(cols, schema=store.FIDELITY_SCHEMA), path, overwrite=True)
        paths.append(path)
    return paths


def is_stale(con, findings_path: str | Path | None = None) -> bool:
    """Whether the stored fidelity rows were computed from other inputs than the store holds now."""
    stored = report.df(con, "SELECT DISTINCT inputs_hash FROM fidelity")["inputs_hash"].tolist()
    return stored != [inputs_hash(con, findings_path)]
