"""Rankings over the results store, for the leaderboard and for static reports.

The leaderboard (``leaderboard/app.py``) and ``mergebench report`` show the same numbers because
both call the functions here. Heavy reductions (millions of result rows -> one score per unit)
run in DuckDB over the Parquet store; only per-unit rows reach pandas, where the seeded bootstrap
of :mod:`mergebench.results.metrics` adds confidence and rank intervals.

A unit's *headline score* is the unweighted mean over tasks of each task's headline metric, as
the suite's profile declares it (``TaskSpec.metric``); tasks of suites/profiles that are not
defined here fall back to ``acc`` (else the alphabetically first metric), so any store renders.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import html as _html
import json
import math
import os
import shlex
import threading
import warnings
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mergebench.config import papers
from mergebench.errors import MergebenchError
from mergebench.paths import suites_root
from mergebench.results import metrics, store

#: Bootstrap of the leaderboard and the report: seed and resamples (NumPy ``Generator(PCG64(seed))``,
#: units in unit-id order), shown under every table so an interval can be recomputed digit for digit.
BOOT_SEED = 0
N_BOOT_CI = 1_000
N_BOOT_RANK = 1_000
_LOCK = threading.RLock()

RANKING_COLUMNS = ["source", "rank", "rank_label", "variant", "method", "params", "params_label", "n_units", "sizes",
                   "score", "ci_low", "ci_high", "rank_low", "rank_high", "p_best", "p_gt_base", "gain_vs_base_pp",
                   "p_gt_best_expert", "gain_vs_best_expert_pp", "merge_wall_s", "eval_wall_s", "merge_peak_gib",
                   "table"]



class SelectionError(MergebenchError, ValueError):
    """A ranking asked for over a selection that pools several suites, profiles or pools."""


def bootstrap_note(seed: int = BOOT_SEED, n_boot_ci: int = N_BOOT_CI, n_boot_rank: int = N_BOOT_RANK) -> str:
    """The line under every ranking that says how its intervals were drawn."""
    return (f"Bootstrap: seed {seed} (NumPy PCG64), {n_boot_ci:,} resamples for the 95 % CIs, {n_boot_rank:,} for "
            "the rank intervals and P(best); units resampled in unit-id order, shared subsets jointly.")


def table_title(table: str | None) -> str:
    """``seed001_table2`` -> ``in-the-wild merging study, Table 2``: the paper's short title from
    the registry (unknown ids are returned as is)."""
    if not table:
        return ""
    key, _, rest = str(table).partition("_")
    if key.startswith("seed") and rest.startswith("table"):
        try:
            return f"{papers.paper_for_seed(key).short_title}, Table {rest[len('table'):]}"
        except papers.UnknownPaperError:
            pass
    return str(table)

_UNIT_COLS = ["suite", "suite_version", "profile", "pool", "base_model", "method", "method_version", "params_json",
              "seed", "subset", "n", "role", "run_id"]


# ------------------------------------------------------------------------------ connection


def _suite_files_key() -> tuple:
    """The suite and pool files' names, sizes and mtimes: the suite definitions are parsed once per
    process for as long as none of these changes (parsing every suite costs about a second)."""
    root = suites_root()
    files = sorted([*root.glob("*.yaml"), *root.glob("pools/*.yaml")])
    return (str(root), *((f.name, st.st_size, st.st_mtime_ns) for f in files for st in [f.stat()]))


@functools.lru_cache(maxsize=2)
def _suites(key: tuple) -> tuple[dict[str, Any], str | None]:
    """(name -> suite, why unavailable); a broken suite file must not take the leaderboard down."""
    try:
        from mergebench.config.suites import list_suites

        return {s.name: s for s in list_suites()}, None
    except Exception as exc:
        return {}, str(exc)


def suite_definitions() -> dict[str, Any]:
    """Every suite of ``suites/`` by name (cached while the files do not change)."""
    return _suites(_suite_files_key())[0]


def default_pool(suite: str, profile: str | None) -> str | None:
    """The pool a suite's profile runs on when none is given (its first), or None if unknown."""
    s = suite_definitions().get(suite)
    prof = s.profiles.get(profile) if s is not None and profile is not None else None
    return prof.pools[0] if prof is not None and prof.pools else None


@functools.lru_cache(maxsize=2)
def _headline_rows(key: tuple) -> tuple[tuple[str, str, str, str], ...]:
    rows = []
    for s in _suites(key)[0].values():
        for pname in s.profiles:
            try:
                prof = s.profile(pname)
            except Exception:
                prof = s.profiles[pname]
            for t in getattr(prof, "tasks", []):
                rows.append((s.name, pname, t.name, t.metric))
    return tuple(rows)


def headline_map() -> pd.DataFrame:
    """(suite, profile, task, metric): each task's headline metric in every defined suite profile."""
    key = _suite_files_key()
    why = _suites(key)[1]
    if why is not None:
        warnings.warn(f"suite definitions unavailable ({why}); every task falls back to 'acc'", stacklevel=2)
    return pd.DataFrame(list(_headline_rows(key)), columns=["suite", "profile", "task", "metric"]).drop_duplicates()


def loss_profiles() -> set[tuple[str, str]]:
    """(suite, profile) pairs whose headline is the merging loss (the merging-collapse study eq. 1), not the score."""
    return {(s.name, pname) for s in suite_definitions().values() for pname, prof in s.profiles.items()
            if "merging_loss" in (getattr(prof, "report", None) or [])}


def unit_merging_loss(con, f: Filters, merged: pd.DataFrame) -> pd.Series:
    """Mean merging loss (%) per merged unit, over the unit's tasks whose own expert was merged.

    Each task's expert is the single expert reference scored on it in the selection (a
    glue-style profile scores every expert on its own task only); a task scored by several
    experts has no defined expert and is left out.
    """
    loss = task_merging_loss(con, f, merged)
    return metrics.average_merging_loss(loss).set_index("unit_id")["merging_loss_pct"]


def task_merging_loss(con, f: Filters, merged: pd.DataFrame) -> pd.DataFrame:
    """Merging loss (%) per (merged unit of `merged`, task of its own members), as
    :func:`metrics.merging_loss` returns it; the experts are found as in :func:`unit_merging_loss`."""
    where, params = f.where(refs=True)
    keys = ", ".join(metrics.GROUP_KEYS)
    rows = df(con, f"SELECT unit_id, {keys}, role, subset, method, n, task, value FROM headline_rows "
                   f"WHERE role IN ('merged', 'expert') AND {where}", params)
    ex = rows[rows["role"] == "expert"]
    owners = ex.assign(expert=_first(ex["subset"])).groupby("task")["expert"].unique()
    task_expert = {t: e[0] for t, e in owners.items() if len(e) == 1}
    m = rows[rows["unit_id"].isin(merged["unit_id"])]
    return metrics.merging_loss(m, ex, task_expert)


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
    "mergebench.baselines.linear": "averaging",
    "mergebench.baselines.task_vector": "task vector",
    "mergebench.baselines.spherical": "spherical",
    "mergebench.baselines.model_stock": "averaging",
    "mergebench.baselines.arcee_fusion": "selection",
    "mergebench.baselines.subspace": "subspace",
    "mergebench.baselines.fisher": "data-dependent",
    "mergebench.baselines.regmean": "data-dependent",
    "mergebench.baselines.adamerging": "data-dependent",
    "mergebench.baselines.emr": "data-dependent",
}


#: The entry-point group of merge methods (:data:`mergebench.methods.ENTRY_POINT_GROUP`, named here
#: because importing that package imports torch, which the leaderboard must not wait for).
METHOD_GROUP = "mergebench.methods"
CATALOG_ENV = "MERGEBENCH_CACHE"


def _catalog_key() -> str:
    """Fingerprint of the installed methods without importing them: every entry point (name, target,
    distribution and version) and the size and mtime of every ``.py`` file beside its module and of
    the method API itself; any edit or install changes it."""
    import importlib.metadata as md
    import importlib.util

    parts = [store.package_version("mergebench") or "", store.SCHEMA_VERSION]
    folders = {Path(__file__).resolve().parent / "methods"}
    for ep in sorted(md.entry_points(group=METHOD_GROUP), key=lambda e: (e.name, e.value)):
        dist = getattr(ep, "dist", None)
        parts.append(f"{ep.name}={ep.value}@{getattr(dist, 'name', '')}-{getattr(dist, 'version', '')}")
        try:
            spec = importlib.util.find_spec(ep.module)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            folders.add(Path(spec.origin).resolve().parent)
    for folder in sorted(folders):
        for f in sorted(folder.glob("*.py")):
            st = f.stat()
            parts.append(f"{f}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def catalog_path() -> Path:
    """Where :func:`method_catalog` keeps its JSON: ``$MERGEBENCH_CACHE`` or ``~/.cache/mergebench``."""
    root = Path(os.environ.get(CATALOG_ENV) or Path.home() / ".cache" / "mergebench").expanduser()
    return root / f"method-catalog-{_catalog_key()}.json"


def _describe_all() -> list[dict[str, Any]]:
    from mergebench.methods import list_methods

    return [{**json.loads(json.dumps(m.describe(), default=str)), "name": m.name,
             "family": _FAMILY.get(m.source, "plugin"), "data_free": not m.aux_inputs and m.calibration is None, "version": m.version,
             "summary": m.summary, "stochastic": m.stochastic} for m in list_methods()]


@functools.lru_cache(maxsize=1)
def _catalog(path: Path) -> tuple[dict[str, Any], ...]:
    try:
        return tuple(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        pass
    entries = _describe_all()
    try:  # a cache: a folder that cannot be written only costs the next process the import again
        _atomic_write(path, json.dumps(entries, sort_keys=True, ensure_ascii=False))
        for old in path.parent.glob("method-catalog-*.json"):  # catalogs of earlier installs
            if old != path:
                old.unlink(missing_ok=True)
    except OSError:
        pass
    return tuple(entries)


@functools.lru_cache(maxsize=1)
def method_catalog() -> dict[str, dict[str, Any]]:
    """name -> every registered method's ``describe()`` plus family, data_free, version, summary and
    stochastic: read from a JSON cache (:func:`catalog_path`) that is valid while no method file or
    installed plugin changes, so the leaderboard and the reports never import torch to label a
    parameter set. The first process after a change imports the registry once and writes it.
    Looked up once per process (``method_catalog.cache_clear()`` looks again: the leaderboard's
    "Reload results" does); do not modify the returned dicts."""
    return {e["name"]: dict(e) for e in _catalog(catalog_path())}


def method_info() -> pd.DataFrame:
    """One row per registered method: name, family (from its module), data_free (no calibration data
    and no auxiliary checkpoint inputs), data_dependent (calibrated on data), version, summary."""
    rows = [{"method": name, **{k: e[k] for k in ("family", "data_free", "version", "summary", "stochastic")},
             "data_dependent": bool(e.get("data_dependent"))} for name, e in sorted(method_catalog().items())]
    return pd.DataFrame(rows, columns=["method", "family", "data_free", "data_dependent", "version", "summary",
                                       "stochastic"])


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


def run_groups(con) -> pd.DataFrame:
    """One row per (suite, profile, pool) with merged run rows: its merge sizes (sorted list) and
    when it was last written, the most recent first (the leaderboard's filters offer these)."""
    return df(con, """SELECT suite, profile, pool, list(DISTINCT n ORDER BY n) AS sizes, max(created_at) AS last
                      FROM results WHERE role = 'merged' GROUP BY ALL ORDER BY last DESC, suite, profile, pool""")


def group_choices(groups: pd.DataFrame, suite: str, profile: str | None = None) -> tuple[list[str], list[str]]:
    """What the leaderboard offers for ``suite`` given :func:`run_groups`: its profiles with merged
    rows (the one written last first) and the pools of ``profile`` (default: that first profile),
    the profile's default pool first when it has rows, else the pool written last first.  The
    app's filters and the browser tests both take their defaults from here."""
    g = groups[groups["suite"] == suite]
    profiles = list(dict.fromkeys(g["profile"]))
    profile = profile if profile is not None else next(iter(profiles), None)
    pools = list(dict.fromkeys(g[g["profile"] == profile]["pool"]))
    default = default_pool(suite, profile)
    if default in pools:
        pools = [default, *(p for p in pools if p != default)]
    return profiles, pools


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


#: Short names of common parameters in :func:`params_label`; others keep their own name.
_PARAM_SHORT = {"lambda": "λ", "density": "d", "weight": "w", "weights": "w", "beta": "β", "eta": "η",
                "epsilon": "ε", "normalize": "norm", "consensus": "sign", "max_iter": "iters",
                "regmean_samples": "docs", "fisher_samples": "docs", "calibration_docs": "docs"}
_PARAM_FIRST = ("lambda", "density", "t", "weight", "weights")


@functools.cache
def _method_defaults(method: str) -> tuple[tuple[str, Any], ...]:
    """(name, default) of a registered method's parameters; () for a method that is not installed."""
    entry = method_catalog().get(method)  # a plugin missing here still gets a label (all its params)
    return tuple((p["name"], p.get("default")) for p in (entry or {}).get("params") or [])


def _value_text(v: Any) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        items = [_value_text(x) for x in v]
        return "[" + ",".join(items[:4]) + (f",…] ({len(items)})" if len(items) > 4 else "]")
    return str(v)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b and type(a) is type(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def params_label(method: str | None, params_json: str | None) -> str:
    """A configuration in a few characters: the parameters that differ from the method's defaults,
    short names first (``{"lambda": 0.1, "density": 0.1, "normalize": true, ...}`` -> ``λ=0.1 d=0.1``);
    ``default`` when every parameter has its default. The full JSON stays in ``params``."""
    try:
        params = json.loads(params_json) if params_json else {}
    except ValueError:
        return str(params_json)
    defaults = dict(_method_defaults(method)) if method else {}
    keep = {k: v for k, v in params.items() if not (k in defaults and _same(v, defaults[k]))
            and not (v is None and k not in defaults)}
    order = sorted(keep, key=lambda k: (_PARAM_FIRST.index(k) if k in _PARAM_FIRST else len(_PARAM_FIRST), k))
    return " ".join(f"{_PARAM_SHORT.get(k, k)}={_value_text(keep[k])}" for k in order) or "default"


def _variant(merged: pd.DataFrame) -> pd.Series:
    """Method label; a method run with several parameter sets gets its short params label appended
    (the full JSON where two configurations of a method would share a label)."""
    pj = merged["params_json"].fillna("{}")
    multi = merged.groupby("method")["params_json"].transform("nunique") > 1
    labels = pd.Series([params_label(m, j) for m, j in zip(merged["method"], pj)], index=merged.index)
    clash = (pd.DataFrame({"m": merged["method"], "l": labels, "j": pj}).groupby(["m", "l"])["j"]
             .transform("nunique") > 1)
    suffix = pj.where(clash, labels)
    return merged["method"].where(~multi, merged["method"] + " " + suffix)


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


def _group_label(row) -> str:
    return f"{row.suite}@{row.suite_version} / {row.profile} / {row.pool} (base {row.base_model})"


def _one_group(merged: pd.DataFrame) -> None:
    """Refuse to rank merged units of several (suite, version, profile, pool, base) groups together:
    their scores average different tasks, references and subset sizes."""
    keys = [k for k in metrics.GROUP_KEYS if k in merged]
    groups = merged[keys].astype("string").fillna("-").drop_duplicates().sort_values(keys)
    if len(groups) > 1:
        shown = ", ".join(_group_label(r) for r in groups.itertuples(index=False))
        raise SelectionError(f"the selection pools {len(groups)} result groups ({shown}); rank one suite, profile "
                             "and pool at a time (report.ranking_groups splits a selection)")


def run_ranking(con, f: Filters, *, n_boot_ci: int = N_BOOT_CI, n_boot_rank: int = N_BOOT_RANK,
                seed: int = BOOT_SEED) -> pd.DataFrame:
    """Methods ranked by mean headline score of the selected merged units (source='run').

    Columns: RANKING_COLUMNS. The selection must hold one (suite, profile, pool) group
    (:class:`SelectionError` otherwise; :func:`ranking_groups` splits one). The seeded bootstrap
    (`seed`, `n_boot_ci`, `n_boot_rank`, recorded in ``.attrs["bootstrap"]``) runs over the units
    in unit-id order, so two calls, and the app and the report, give the same digits. Rank
    intervals resample shared subsets jointly when every method has every subset
    (metrics.rank_intervals); exact ties share a rank, ``rank_label`` marks them ``=1``; gains are
    in percentage points (the in-the-wild merging study's definition).
    """
    units = unit_table(con, f).sort_values("unit_id", kind="stable", ignore_index=True)
    merged = units[units["role"] == "merged"]
    boot = {"seed": seed, "n_boot_ci": n_boot_ci, "n_boot_rank": n_boot_rank}
    if merged.empty:
        return _with_boot(pd.DataFrame(columns=RANKING_COLUMNS), boot)
    _one_group(merged)
    comp = metrics.compare_to_references(units)
    comp = comp[comp["role"] == "merged"].sort_values("unit_id", kind="stable", ignore_index=True)
    comp["variant"] = _variant(comp)
    by_loss = set(zip(comp["suite"], comp["profile"].fillna(""))) <= loss_profiles()
    if by_loss:  # glue-style: merges are scored on their members' tasks; rank by merging loss
        comp["score"] = comp["unit_id"].map(unit_merging_loss(con, f, comp))
        comp = comp[comp["score"].notna()]
        for c in ("beats_base", "gain_vs_base_pp", "beats_best_expert", "gain_vs_best_expert_pp"):
            comp[c] = np.nan
        if comp.empty:
            return _with_boot(pd.DataFrame(columns=RANKING_COLUMNS + ["merging_loss_pct"]), boot)
    ci = metrics.bootstrap_ci_by(comp, ["variant"], n_boot=n_boot_ci, seed=seed)
    ri = metrics.rank_intervals(comp, method_col="variant", n_boot=n_boot_rank, seed=seed)
    g = comp.groupby("variant", sort=True)
    agg = pd.DataFrame({
        "method": g["method"].first(), "params": g["params_json"].first(),
        "sizes": g["n"].agg(lambda x: ", ".join(str(v) for v in sorted({int(n) for n in x}))),
        "p_gt_base": g["beats_base"].apply(lambda s: s.astype("float64").mean()),
        "gain_vs_base_pp": g["gain_vs_base_pp"].mean(),
        "p_gt_best_expert": g["beats_best_expert"].apply(lambda s: s.astype("float64").mean()),
        "gain_vs_best_expert_pp": g["gain_vs_best_expert_pp"].mean(),
    }).reset_index()
    out = (ri[["variant", "rank", "tied", "rank_low", "rank_high", "p_best"]]
           .merge(ci.rename(columns={"mean": "score"}), on="variant")
           .merge(agg, on="variant"))
    out = out.merge(merge_cost(con, comp), on="variant", how="left")
    out["source"] = "run"
    out["table"] = None
    out["rank_label"] = [f"={r}" if t else str(r) for r, t in zip(out["rank"], out["tied"])]
    out["params_label"] = [params_label(m, j) for m, j in zip(out["method"], out["params"])]
    out = out.sort_values(["rank", "variant"]).reset_index(drop=True)
    if by_loss:  # the bootstrap CI and rank intervals above are over the units' merging losses
        out = out.assign(merging_loss_pct=out["score"], score=np.nan)[RANKING_COLUMNS + ["merging_loss_pct"]]
        return _with_boot(out, boot)
    return _with_boot(out[RANKING_COLUMNS], boot)


def _with_boot(t: pd.DataFrame, boot: dict) -> pd.DataFrame:
    t.attrs["bootstrap"] = dict(boot)
    return t


def ranked_value(rank: pd.DataFrame) -> str:
    """The column a ranking is ordered by: ``merging_loss_pct`` on glue-style profiles, else ``score``."""
    run = rank[rank["source"] == "run"] if "source" in rank else rank
    if "merging_loss_pct" in run and len(run) and run["score"].isna().all():
        return "merging_loss_pct"
    return "score"


def task_scores(con, f: Filters, rank: pd.DataFrame | None = None) -> pd.DataFrame:
    """Open LLM Leaderboard-style per-task table of one (suite, profile, pool) selection: one row per
    ranked variant, one column per task holding the mean over its merged units of the task's
    headline metric (the merging loss, %, on glue-style profiles) and ``average``, the unweighted
    mean of the task columns. With the selection's `rank` (:func:`ranking`), rows carry its rank and
    follow its order. Variant labels are :func:`run_ranking`'s."""
    where, params = f.where()
    rows = _with_config_params(df(con, f"""SELECT unit_id, any_value(suite) AS suite, any_value(profile) AS profile,
                                        any_value(method) AS method, any_value(params_json) AS params_json,
                                        any_value(subset) AS subset, any_value(n) AS n, task, avg(value) AS value
                                 FROM headline_rows WHERE role = 'merged' AND {where} GROUP BY unit_id, task""",
                                  params))
    lead = ["rank", "rank_label", "variant", "method", "params_label", "average"]
    if rows.empty:
        return pd.DataFrame(columns=lead)
    units = rows.drop_duplicates("unit_id")
    variant = dict(zip(units["unit_id"], _variant(units)))
    if set(zip(units["suite"], units["profile"].fillna(""))) <= loss_profiles():
        loss = task_merging_loss(con, f, units)
        rows = loss.rename(columns={"merging_loss_pct": "value"})[["unit_id", "task", "value"]]
    rows = rows.assign(variant=rows["unit_id"].map(variant))
    piv = rows.pivot_table(index="variant", columns="task", values="value", aggfunc="mean").sort_index(axis=1)
    tasks = list(piv.columns)
    piv.columns.name = None
    piv.insert(0, "average", piv[tasks].mean(axis=1))
    piv = piv.reset_index()
    first = units.assign(variant=units["unit_id"].map(variant)).drop_duplicates("variant").set_index("variant")
    piv.insert(1, "method", piv["variant"].map(first["method"]))
    piv.insert(2, "params_label", [params_label(m, first.loc[v, "params_json"]) for m, v in
                                   zip(piv["method"], piv["variant"])])
    if rank is not None and len(rank):
        r = rank[rank["source"] == "run"] if "source" in rank else rank
        r = r.drop_duplicates("variant").set_index("variant")
        piv.insert(0, "rank", piv["variant"].map(r["rank"]).astype("Int64"))
        piv.insert(1, "rank_label", piv["variant"].map(r["rank_label"]))
        order = {v: i for i, v in enumerate(r.index)}
        piv = piv.sort_values("variant", key=lambda s: s.map(order).fillna(len(order))).reset_index(drop=True)
    else:
        piv = piv.sort_values("average", ascending=False).reset_index(drop=True)
    return piv


def ranking_groups(con, f: Filters, **kw) -> list[tuple[dict[str, Any], pd.DataFrame]]:
    """[(group, :func:`ranking`)] for every (suite, profile, pool) with merged run rows in the
    selection `f` (its suite, profile and pool narrow the groups; None = each one separately)."""
    where, params = f.where()
    groups = df(con, f"SELECT DISTINCT suite, profile, pool FROM results WHERE role = 'merged' AND {where} "
                     "ORDER BY ALL", params)
    return [({"suite": g.suite, "profile": g.profile, "pool": g.pool},
             ranking(con, dataclasses.replace(f, suite=g.suite, profile=g.profile, pool=g.pool), **kw))
            for g in groups.itertuples(index=False)]


def paper_ranking(con, f: Filters) -> pd.DataFrame:
    """Published (source='paper') rows summarised like :func:`run_ranking`, one row per table,
    pool, method and n; only the quantities the paper prints are filled (score = reported average
    accuracy for the Fisher–Rao merging paper, P(>base)/gains for the in-the-wild merging study,
    merging loss for the merging-collapse study)."""
    where, params = f.where(refs=False)
    q = f"""
        SELECT 'paper' AS source, "table", suite, profile, pool, base_model, method, n,
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
    """Reproduced and published rows in one table (`source` says which); run rows first.

    The published rows are those of the selection's suite and n in any profile and pool (the
    papers' own models); they are never ranked. A run row's ``paper`` column quotes the published
    rows of the same method, configuration and n (:func:`match_paper`)."""
    run = run_ranking(con, f, **kw)
    boot = dict(run.attrs.get("bootstrap", {}))
    pap = paper_ranking(con, dataclasses.replace(f, profile=None, pool=None))
    if not run.empty:
        run["paper"] = paper_column(run, match_paper(run, pap)).to_numpy()
    if pap.empty:
        return run
    pap = pap.assign(params=None, rank=pd.NA, ci_low=np.nan, ci_high=np.nan, rank_low=pd.NA, rank_high=pd.NA,
                     p_best=np.nan, merge_wall_s=np.nan, merge_peak_gib=np.nan, eval_wall_s=np.nan,
                     rank_label=None, variant=pap["method"], params_label=None, sizes=pap["n"].astype("string"))
    extra = [c for c in ("suite", "profile", "pool", "n", "label", "merging_loss_pct") if c in pap]
    ranks = {"rank": "Int64", "rank_low": "Int64", "rank_high": "Int64"}  # blank for published rows, never 1.0
    if run.empty:
        return _with_boot(pap[RANKING_COLUMNS + extra].reset_index(drop=True).astype(ranks), boot)
    return _with_boot(pd.concat([run.astype(ranks), pap[RANKING_COLUMNS + extra].astype(ranks)], ignore_index=True),
                      boot)


@functools.lru_cache(maxsize=256)
def paper_config(suite: str, method: str, profile: str | None) -> str | None:
    """JSON of the hyperparameters a suite file records for `method` in the paper's `profile`
    (suite-level params, profile overrides applied); None when the suite cannot be loaded."""
    s = suite_definitions().get(suite)
    if s is None:  # a store may hold suites this checkout does not define
        return None
    params = dict(s.methods[method].params) if method in s.methods else {}
    if profile in s.profiles:
        params.update(s.profiles[profile].methods.get(method, {}))
    return store.canonical_json(params)


def _non_default(method: str, params: dict[str, Any]) -> dict[str, Any]:
    defaults = dict(_method_defaults(method))
    return {k: v for k, v in params.items()
            if not (k in defaults and _same(v, defaults[k])) and not (v is None and k not in defaults)}


def same_configuration(method: str, a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two parameter sets of `method` describe the same merge: equal once parameters at the
    method's default are left out (the store records every parameter, a suite only the paper's)."""
    a, b = _non_default(method, a), _non_default(method, b)
    return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)


MATCH_COLUMNS = ["variant", "table", "suite", "profile", "pool", "n", "label", "score", "p_gt_base", "gain_vs_base_pp",
                 "p_gt_best_expert", "gain_vs_best_expert_pp", "merging_loss_pct"]


def match_paper(run: pd.DataFrame, pap: pd.DataFrame) -> pd.DataFrame:
    """The published rows that report the same merge as a run row: same method, the configuration
    the suite file records for that paper (:func:`same_configuration` with the run's params) and
    the same n (a run row averaging several sizes matches nothing). Never matched on a name alone.
    Returns one row per (run variant, published row): :data:`MATCH_COLUMNS`."""
    run = run[run["source"] == "run"] if "source" in run else run
    if run.empty or pap.empty:
        return pd.DataFrame(columns=MATCH_COLUMNS)
    pap = pap[pap["method"].notna() & pap["n"].notna()]
    out = []
    for r in run.itertuples(index=False):  # ranked variants (a few dozen), not result rows
        sizes = {int(x) for x in str(r.sizes).split(",") if x.strip()}
        if len(sizes) != 1:
            continue
        cand = pap[(pap["method"] == r.method) & (pap["n"].astype(int) == next(iter(sizes)))]
        if cand.empty:
            continue
        run_params = json.loads(r.params) if r.params else {}
        for (suite, profile), c in cand.groupby(["suite", "profile"], dropna=False, sort=True):
            cfg = paper_config(suite, r.method, None if pd.isna(profile) else profile)
            if cfg is not None and same_configuration(r.method, run_params, json.loads(cfg)):
                out.append(c.assign(variant=r.variant))
    if not out:
        return pd.DataFrame(columns=MATCH_COLUMNS)
    m = pd.concat(out, ignore_index=True)
    return m[[c for c in MATCH_COLUMNS if c in m]].reset_index(drop=True)


_PAPER_QUANTITIES = (("score", "{:.3f}", "", ""), ("merging_loss_pct", "{:+.1f}", "", " %"),
                     ("gain_vs_base_pp", "{:+.2f}", "Δ base ", " pp"), ("p_gt_base", "{:.2f}", "P(>base) ", ""))


def paper_column(run: pd.DataFrame, matches: pd.DataFrame) -> pd.Series:
    """Per run row, the matched published value of the same quantity the row is ranked by where the
    paper prints it (score, merging loss), else its gain over the base or P(>base): one value, or
    the range (``lo…hi``) over the paper's models; blank without a match."""
    texts = []
    for v in run["variant"]:
        m = matches[matches["variant"] == v] if len(matches) else matches
        text = ""
        for col, fmt, pre, post in _PAPER_QUANTITIES:
            vals = m[col].dropna().astype(float) if col in m else pd.Series(dtype=float)
            if len(vals):
                lo, hi = vals.min(), vals.max()
                text = (pre + fmt.format(lo) + post if len(vals) == 1 or lo == hi
                        else f"{pre}{fmt.format(lo)}…{fmt.format(hi)}{post}")
                break
        texts.append(text)
    return pd.Series(texts, index=run.index, dtype=object)


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
    """Mean and std (ddof=1) of ``||theta - theta_base||_2`` per (method, n), the in-the-wild merging study Fig. 4.

    From the provenance of units that recorded it (runs since the column exists); same labels
    and filters as :func:`scaling`."""
    where, params = f.where(refs=True, n=False)
    return df(con, f"""
        WITH norms AS (SELECT unit_id, max(task_vector_norm) AS tv FROM provenance
                       WHERE task_vector_norm IS NOT NULL GROUP BY unit_id)
        SELECT {_METHOD_LABEL}, role, n, count(*) AS n_units, avg(tv) AS mean, coalesce(stddev_samp(tv), 0) AS std
        FROM unit_scores JOIN norms USING (unit_id) WHERE {where} GROUP BY ALL ORDER BY method, n""", params)


def paper_scaling(con, f: Filters) -> pd.DataFrame:
    """Published reported averages per (table, pool, method, n) for the same chart (the Fisher–Rao merging paper)."""
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
    """`mergebench stats` results (the merging-collapse study Tables 3-5), one row per test: scope (a method, or
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


# ---------------------------------------------------------------------------------- colours

#: 32 distinguishable colours (Tableau 10 without its grey, then darker and lighter hues), so up
#: to 32 methods never share one; the base model is black and the single experts grey.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
           "#000075", "#911eb4", "#3cb44b", "#f032e6", "#9a6324", "#800000", "#808000", "#4363d8", "#e6194b",
           "#469990", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d",
           "#9edae5", "#393b79", "#637939", "#8c6d31", "#843c39")
REFERENCE_COLORS = {"base model": "#000000", "single expert": "#7f7f7f"}


@functools.lru_cache(maxsize=1)
def _color_order() -> tuple[str, ...]:
    """Registered methods, built-ins (sorted) before plugins (sorted): installing a plugin never
    changes a built-in's colour."""
    try:
        info = method_info()
    except Exception:
        return ()
    builtin = info["family"] != "plugin"
    return tuple(sorted(info.loc[builtin, "method"])) + tuple(sorted(info.loc[~builtin, "method"]))


def method_color(method: str) -> str:
    """The fixed colour of a method (or of 'base model' / 'single expert') on every leaderboard
    chart and in ``mergebench report --plots``; a method this installation does not register gets
    a colour from a stable hash of its name."""
    if method in REFERENCE_COLORS:
        return REFERENCE_COLORS[method]
    order = _color_order()
    if method in order:
        return PALETTE[order.index(method) % len(PALETTE)]
    return PALETTE[zlib.crc32(str(method).encode()) % len(PALETTE)]


def method_colors(methods: Sequence[str]) -> dict[str, str]:
    """{method: colour} for the given names (order kept, duplicates dropped)."""
    return {m: method_color(m) for m in dict.fromkeys(methods)}


# ---------------------------------------------------------------------------------- reports

#: Human labels of the ranking's columns (the leaderboard uses the same).
COLUMN_LABELS = {"rank_label": "rank", "rank": "rank", "method": "method", "params_label": "params",
                 "score": "score", "merging_loss_pct": "merging loss %", "ci": "95% CI", "ranks": "rank interval",
                 "p_best": "P(best)", "p_gt_base": "P(>base)", "gain_vs_base_pp": "Δ base (pp)",
                 "p_gt_best_expert": "P(>best expert)", "gain_vs_best_expert_pp": "Δ best expert (pp)",
                 "merge_wall_s": "merge s", "eval_wall_s": "eval s", "merge_peak_gib": "peak GiB",
                 "n_units": "units", "sizes": "n", "paper": "paper", "table": "published in", "pool": "pool",
                 "n": "n", "label": "paper's label", "average": "average"}

#: Display order of a run ranking: the ranked score (merging loss on glue-style profiles) first.
RUN_DISPLAY = ["rank_label", "method", "params_label", "score", "merging_loss_pct", "ci", "ranks", "p_best",
               "p_gt_base", "gain_vs_base_pp", "gain_vs_best_expert_pp", "p_gt_best_expert", "merge_wall_s",
               "eval_wall_s", "merge_peak_gib", "n_units", "sizes", "paper"]
PAPER_DISPLAY = ["table", "pool", "n", "method", "label", "score", "merging_loss_pct", "p_gt_base", "gain_vs_base_pp",
                 "p_gt_best_expert", "gain_vs_best_expert_pp", "n_units"]

_FMT = {"score": "{:.4f}", "ci_low": "{:.4f}", "ci_high": "{:.4f}", "p_best": "{:.2f}", "p_gt_base": "{:.2f}",
        "p_gt_best_expert": "{:.2f}", "gain_vs_base_pp": "{:+.2f}", "gain_vs_best_expert_pp": "{:+.2f}",
        "merge_wall_s": "{:.2f}", "merge_peak_gib": "{:.2f}", "eval_wall_s": "{:.1f}", "merging_loss_pct": "{:+.1f}",
        "n_units": "{:.0f}", "n": "{:.0f}", "rank": "{:.0f}"}
_TEXT = {"rank_label", "method", "params_label", "variant", "table", "pool", "label", "paper", "sizes", "params"}


def ci_text(lo: float, hi: float, loss: bool = False) -> str:
    """A 95 % interval as both the leaderboard and the report print it (4 decimals; 1 for a loss in %)."""
    if pd.isna(lo) or pd.isna(hi):
        return ""
    spec = _FMT["merging_loss_pct"] if loss else _FMT["score"]
    return f"{spec.format(lo)} – {spec.format(hi)}"


def rank_interval_text(lo: Any, hi: Any) -> str:
    if pd.isna(lo) or pd.isna(hi):
        return ""
    return str(int(lo)) if int(lo) == int(hi) else f"{int(lo)} – {int(hi)}"


def cell_text(v: Any, spec: str | None = None) -> str:
    """Blank for a missing value, integers without a fraction, else `spec`."""
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
        return ""
    if spec is not None and isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
        return spec.format(v)
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v)


def display_ranking(t: pd.DataFrame) -> pd.DataFrame:
    """A run ranking as text, in :data:`RUN_DISPLAY` order (columns without a value dropped)."""
    loss = ranked_value(t) == "merging_loss_pct"
    d = t.assign(ci=[ci_text(lo, hi, loss) for lo, hi in zip(t["ci_low"], t["ci_high"])],
                 ranks=[rank_interval_text(lo, hi) for lo, hi in zip(t["rank_low"], t["rank_high"])])
    return _text_frame(d, RUN_DISPLAY)


def display_paper(t: pd.DataFrame) -> pd.DataFrame:
    """Published rows as text, the paper named by its short title."""
    return _text_frame(t.assign(table=t["table"].map(table_title)), PAPER_DISPLAY)


def display_tasks(t: pd.DataFrame, loss: bool = False) -> pd.DataFrame:
    """:func:`task_scores` as text: rank, method, params, average, then one column per task."""
    spec = _FMT["merging_loss_pct"] if loss else _FMT["score"]
    tasks = [c for c in t.columns if c not in ("rank", "rank_label", "variant", "method", "params_label", "average")]
    cols = [c for c in ("rank_label", "method", "params_label", "average") if c in t] + tasks
    out = pd.DataFrame({c: [cell_text(v, None if c in _TEXT else spec) for v in t[c]] for c in cols})
    return out[[c for c in cols if (out[c] != "").any()]]


def _text_frame(d: pd.DataFrame, order: Sequence[str]) -> pd.DataFrame:
    cols = [c for c in order if c in d and d[c].notna().any() and not (d[c].astype(str) == "").all()]
    return pd.DataFrame({c: [cell_text(v, None if c in _TEXT else _FMT.get(c)) for v in d[c]] for c in cols})


def _numeric(frame: pd.DataFrame) -> set[str]:
    """Columns of a text frame whose cells are numbers (right-aligned), blanks allowed."""
    num = set()
    for c in frame.columns:
        vals = [v for v in frame[c] if v != ""]
        if vals and all(_is_number(v) for v in vals):
            num.add(c)
    return num


def _is_number(text: str) -> bool:
    head = str(text).split(" – ")[0].replace("−", "-").replace("=", "")
    try:
        float(head)
    except ValueError:
        return False
    return True


def _md(t: pd.DataFrame) -> str:
    """A Markdown table with human headers, numbers right-aligned and text left-aligned."""
    num = _numeric(t)
    cols = list(t.columns)
    lines = ["| " + " | ".join(COLUMN_LABELS.get(c, c) for c in cols) + " |",
             "|" + "|".join(" ---: " if c in num else " :--- " for c in cols) + "|"]
    for row in t.itertuples(index=False):  # formatting the (small) summary table, not result rows
        lines.append("| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines)


def _html_table(t: pd.DataFrame, titles: Mapping[str, Sequence[str]] | None = None) -> str:
    """An HTML table like :func:`_md`; `titles` gives per-column hover texts (one per row)."""
    num = _numeric(t)
    esc = _html.escape
    head = "".join(f"<th class='{'num' if c in num else 'txt'}'>{esc(COLUMN_LABELS.get(c, c))}</th>" for c in t)
    body = []
    for i, row in enumerate(t.itertuples(index=False)):
        cells = []
        for c, v in zip(t.columns, row):
            tip = (titles or {}).get(c)
            attr = f" title='{esc(str(tip[i]), quote=True)}'" if tip is not None and tip[i] else ""
            cells.append(f"<td class='{'num' if c in num else 'txt'}'{attr}>{esc(str(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>\n" + "\n".join(body) + "\n</tbody></table>"


def store_notice(results_dir: str | os.PathLike, con=None) -> str | None:
    """Why a report shows no reproduced rows, or None when the store has some."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        return (f"No results store at {results_dir}: nothing has been reproduced here yet (run `mergebench eval`, "
                "or pass --results); only the papers' published numbers are shown.")
    own = con is None
    con = con or connect(results_dir)
    try:
        n = int(df(con, "SELECT count(*) AS n FROM results WHERE role = 'merged'")["n"].iloc[0])
    finally:
        if own:
            con.close()
    if n == 0:
        return (f"The results store at {results_dir} holds no merged runs yet (run `mergebench eval`); only the "
                "papers' published numbers are shown.")
    return None


def report_tables(results_dir: str | os.PathLike = store.DEFAULT_RESULTS_DIR, suite: str | None = None,
                  con=None, seed: int = BOOT_SEED) -> list[tuple[dict[str, Any], pd.DataFrame]]:
    """[(group, ranking)] for every (suite, profile, pool) with run rows, then the published rows
    per suite. The same computation as the leaderboard's ranking page (:func:`ranking_groups`)."""
    con = con or connect(results_dir)
    out = []
    for g, t in ranking_groups(con, Filters(suite=suite), seed=seed):
        run = t[t["source"] == "run"].drop(columns=["source"]).reset_index(drop=True)
        run = run.drop(columns=[c for c in ("suite", "profile", "pool", "n", "label") if c in run]).assign(**g)
        run.attrs = dict(t.attrs)
        out.append(({"source": "run", **g}, run))
    suites = df(con, "SELECT DISTINCT suite FROM paper" + (" WHERE suite = ?" if suite else "") + " ORDER BY 1",
                [suite] if suite else [])["suite"]
    for s in suites:
        t = paper_ranking(con, Filters(suite=s))
        if not t.empty:
            out.append(({"source": "paper", "suite": s}, t))
    return out


_CSS = ("body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1600px}"
        "table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:14px}"
        "th,td{border:1px solid #ccc;padding:3px 8px;vertical-align:top}th{background:#f3f4f6}"
        "td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}td.txt,th.txt{text-align:left}"
        "td[title]{text-decoration:underline dotted;cursor:help}p.note{color:#555}img{max-width:100%}")


def _atomic_write(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_report(results_dir: str | os.PathLike = store.DEFAULT_RESULTS_DIR, suite: str | None = None,
                 fmt: str = "md", plots_dir: str | os.PathLike | None = None,
                 out: str | os.PathLike | None = None, seed: int = BOOT_SEED) -> str:
    """The leaderboard's rankings as static tables (md, csv or html); returns the text and writes
    it to `out` when given (atomically). With `plots_dir`, also writes one scaling-curve PNG per
    (suite, profile, pool) with run rows (needs matplotlib); an html report embeds them."""
    if fmt not in ("md", "csv", "html"):
        raise ValueError(f"fmt must be 'md', 'csv' or 'html', got {fmt!r}")
    con = connect(results_dir)
    try:
        tables = report_tables(results_dir, suite, con=con, seed=seed)
        notice = store_notice(results_dir, con)
        plots = write_plots(con, plots_dir, suite) if plots_dir is not None else []
        if fmt == "csv":
            text = _csv(tables, seed)
        else:
            text = _document(con, tables, fmt, notice, plots, seed, Path(out).parent if out is not None else None)
    finally:
        con.close()
    if out is not None:
        _atomic_write(Path(out), text)
    return text


def _csv(tables, seed: int) -> str:
    frames = []
    for g, t in tables:
        if g["source"] == "run":
            t = t.assign(bootstrap_seed=seed, n_boot_ci=N_BOOT_CI, n_boot_rank=N_BOOT_RANK)
        frames.append(t.assign(**{k: v for k, v in g.items() if k not in t}))
    if not frames:
        return ",".join(RANKING_COLUMNS) + "\n"
    return pd.concat(frames, ignore_index=True).to_csv(index=False)


def _document(con, tables, fmt: str, notice: str | None, plots: Sequence[Path], seed: int,
              out_dir: Path | None) -> str:
    md = fmt == "md"
    esc = _html.escape
    parts = []
    if notice:
        parts.append(f"> **{notice}**\n" if md else f"<p class='note'><strong>{esc(notice)}</strong></p>")
    for g, t in tables:
        if g["source"] == "run":
            f = Filters(suite=g["suite"], profile=g["profile"], pool=g["pool"])
            loss = ranked_value(t) == "merging_loss_pct"
            title = f"{g['suite']} / {g['profile']} / {g['pool']}: reproduced here"
            what = ("ranked by the mean merging loss (% of each task's own expert's score kept, 0 = nothing lost)"
                    if loss else "ranked by the mean headline score (unweighted mean of each task's headline metric)")
            shown = display_ranking(t)
            tasks = display_tasks(task_scores(con, f, t.assign(source="run")), loss)
            stem = _plot_stem(g["suite"], g["profile"], g["pool"])
            pngs = [p for p in plots if p.stem in (f"scaling_{stem}", f"tvnorm_{stem}")]
            if md:
                parts.append(f"## {title}\n\n{what}.\n\n{_md(shown)}\n\n{bootstrap_note(seed)}\n")
                parts.append(f"### Per-task {'merging loss (%)' if loss else 'mean scores'}\n\n{_md(tasks)}\n")
                parts += [f"![{p.stem}]({os.path.relpath(p, out_dir) if out_dir else p})\n" for p in pngs]
            else:
                titles = {"params_label": list(t["params"].fillna(""))}
                parts.append(f"<h2>{esc(title)}</h2>\n<p>{esc(what)}.</p>\n{_html_table(shown, titles)}\n"
                             f"<p class='note'>{esc(bootstrap_note(seed))}</p>")
                parts.append(f"<h3>Per-task {'merging loss (%)' if loss else 'mean scores'}</h3>\n"
                             + _html_table(tasks))
                parts += [f"<p><img alt='{esc(p.stem)}' src='data:image/png;base64,"
                          f"{base64.b64encode(p.read_bytes()).decode()}'></p>" for p in pngs]
        else:
            title = f"{g['suite']}: published numbers (never ranked)"
            shown = display_paper(t)
            parts.append(f"## {title}\n\n{_md(shown)}\n" if md else f"<h2>{esc(title)}</h2>\n{_html_table(shown)}")
    if not tables:
        parts.append("No results." if md else "<p>No results.</p>")
    if md:
        return "# mergebench report\n\n" + "\n".join(parts)
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'><title>mergebench report</title>"
            f"<style>{_CSS}</style></head><body>\n<h1>mergebench report</h1>\n" + "\n".join(parts)
            + "\n</body></html>\n")


def _plot_stem(suite: str, profile: str | None, pool: str | None) -> str:
    return "_".join(str(x).replace("/", "-") for x in (suite, profile, pool))


def scaling_figure(d: pd.DataFrame, title: str, ylabel: str = "headline score"):
    """A matplotlib figure of :func:`scaling` output: one line per method in :func:`method_color`,
    ±1 std error bars at every point (a band where a method has several sizes), the single experts
    at n = 1 and the base model as a dashed line, all in a fully opaque legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.4), dpi=120)
    for m, dm in d[d["role"] != "base"].groupby("method", sort=True):
        dm = dm.sort_values("n")
        c = method_color(m)
        ax.errorbar(dm["n"], dm["mean"], yerr=dm["std"], color=c, marker="s" if m == "single expert" else "o",
                    capsize=3, lw=1.6, label=m)
        if len(dm) > 1:
            ax.fill_between(dm["n"], dm["mean"] - dm["std"], dm["mean"] + dm["std"], color=c, alpha=0.12)
    base = d[d["role"] == "base"]
    if not base.empty:
        ax.axhline(base["mean"].iloc[0], color=method_color("base model"), ls="--", lw=1, label="base model")
    ax.set_xlabel("models merged (n)")
    ax.set_ylabel(ylabel)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2, framealpha=1.0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def write_plots(con, plots_dir: str | os.PathLike, suite: str | None = None) -> list[Path]:
    """Per (suite, profile, pool) with merged units, mean ± 1 std per method vs n (matplotlib), in the
    leaderboard's colours (:func:`method_color`), with error bars at every point (the single
    experts at n = 1 too) and the base model as a dashed line in the legend:
    ``scaling_<suite>_<profile>_<pool>.png`` (headline score) and, where recorded,
    ``tvnorm_<...>.png`` (task-vector norm, as in the in-the-wild merging study's Fig. 4)."""
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
        stem = _plot_stem(g.suite, g.profile, g.pool)
        for prefix, d, ylabel in (("scaling", scaling(con, f), "headline score"),
                                  ("tvnorm", task_vector_norms(con, f), "task-vector norm ||θ - θ_base||₂")):
            if d[d["role"] == "merged"].empty:
                continue
            fig = scaling_figure(d, f"{g.suite} / {g.profile} / {g.pool}", ylabel)
            path = plots_dir / f"{prefix}_{stem}.png"
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
            try:
                fig.savefig(tmp)
                os.replace(tmp, path)
            finally:
                plt.close(fig)
                tmp.unlink(missing_ok=True)
            written.append(path)
    return written
