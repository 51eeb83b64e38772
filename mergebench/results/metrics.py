"""Every number mergebench reports, computed from the store's raw rows.

All functions are pure: they take DataFrames (or a DuckDB connection for the first, large
reduction) and return new DataFrames; work is vectorized with pandas / numpy / DuckDB, and the
only Python loops run over groups (methods, method pairs), never over result rows.

The pipeline, from tidy rows (one per unit, task, metric) to a summary table::

    rows --(normalize_leaderboard / leaderboard_scores)--> rows --(unit_scores)--> one score per unit
         --(compare_to_references)--> gains, beats_base ... --(summary_by_n)--> per (method, n) table
    scores --(bootstrap_ci_by / rank_intervals / paired_comparisons)--> uncertainty
    rows --(merging_loss)--> seed 004 eq. 1 per task, --(average_merging_loss)--> per merged model

Units: lm-eval accuracies are fractions in [0, 1]; gains are reported in *percentage points*
(``scale=100``), matching seed 001 Tables 1-3, whose "relative improvement" is the difference of
average accuracies in points (checked against the tables themselves in tests/test_paper_tables.py:
Table 2's gain vs the best expert equals Table 1's gain vs base minus (best FT - base) within
rounding, which a ratio definition fails by up to 1.4 points).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from mergebench.errors import MergebenchError

# ------------------------------------------------------------------ leaderboard normalization

#: Answer choices per Open LLM Leaderboard v2 multiple-choice subtask, from the ``doc_to_choice``
#: lists of lm-eval's ``tasks/leaderboard`` configs (lm-eval 0.4.x), the "num_choices" that the
#: leaderboard's normalization page refers to.
LEADERBOARD_NUM_CHOICES: dict[str, int] = {
    "leaderboard_bbh_boolean_expressions": 2,
    "leaderboard_bbh_causal_judgement": 2,
    "leaderboard_bbh_date_understanding": 6,
    "leaderboard_bbh_disambiguation_qa": 3,
    "leaderboard_bbh_formal_fallacies": 2,
    "leaderboard_bbh_geometric_shapes": 11,
    "leaderboard_bbh_hyperbaton": 2,
    "leaderboard_bbh_logical_deduction_five_objects": 5,
    "leaderboard_bbh_logical_deduction_seven_objects": 7,
    "leaderboard_bbh_logical_deduction_three_objects": 3,
    "leaderboard_bbh_movie_recommendation": 6,
    "leaderboard_bbh_navigate": 2,
    "leaderboard_bbh_object_counting": 19,
    "leaderboard_bbh_penguins_in_a_table": 5,
    "leaderboard_bbh_reasoning_about_colored_objects": 18,
    "leaderboard_bbh_ruin_names": 6,
    "leaderboard_bbh_salient_translation_error_detection": 6,
    "leaderboard_bbh_snarks": 2,
    "leaderboard_bbh_sports_understanding": 2,
    "leaderboard_bbh_temporal_sequences": 4,
    "leaderboard_bbh_tracking_shuffled_objects_five_objects": 5,
    "leaderboard_bbh_tracking_shuffled_objects_seven_objects": 7,
    "leaderboard_bbh_tracking_shuffled_objects_three_objects": 3,
    "leaderboard_bbh_web_of_lies": 2,
    "leaderboard_musr_murder_mysteries": 2,
    "leaderboard_musr_object_placements": 5,
    "leaderboard_musr_team_allocation": 3,
    "leaderboard_gpqa_diamond": 4,
    "leaderboard_gpqa_main": 4,
    "leaderboard_gpqa_extended": 4,
    "leaderboard_mmlu_pro": 10,
}

#: Benchmark each subtask rolls up into (BBH and MuSR are unweighted means of their subtasks).
LEADERBOARD_BENCHMARK: dict[str, str] = {
    t: next((b for b in ("leaderboard_bbh", "leaderboard_musr") if t.startswith(b + "_")), t)
    for t in LEADERBOARD_NUM_CHOICES
}

#: The metric the leaderboard reads for each benchmark.
LEADERBOARD_METRIC: dict[str, str] = {
    "leaderboard_bbh": "acc_norm",
    "leaderboard_musr": "acc_norm",
    "leaderboard_gpqa_diamond": "acc_norm",
    "leaderboard_gpqa_main": "acc_norm",
    "leaderboard_gpqa_extended": "acc_norm",
    "leaderboard_mmlu_pro": "acc",
}


def normalize(raw: Any, lower_bound: Any) -> np.ndarray:
    """Open LLM Leaderboard v2 normalization: ``max(0, raw - lb) / (1 - lb)``, in [0, 1].

    Source: Hugging Face, "Open LLM Leaderboard - Scores Normalization"
    (https://huggingface.co/docs/leaderboards/open_llm_leaderboard/normalization) and the
    maintainers' answer in open_llm_leaderboard discussion #825: the lower bound is the random
    baseline ``1/num_choices`` (GPQA: 4 choices -> 0.25; MMLU-Pro: 10 -> 0.1; MuSR murder
    mysteries 0.5, object placements 0.2, team allocation 1/3); a raw score below the bound is 0;
    tasks with subtasks (BBH, MuSR) are the unweighted mean of normalized subtasks. The page
    scales to 0-100 for display; mergebench keeps [0, 1] like the store's raw values.
    """
    raw = np.asarray(raw, dtype=np.float64)
    lb = np.asarray(lower_bound, dtype=np.float64)
    if np.any((lb < 0) | (lb >= 1)):
        raise ValueError("lower bounds must lie in [0, 1)")
    return np.maximum(0.0, raw - lb) / (1.0 - lb)


def leaderboard_lower_bound(task: str) -> float:
    """Random-guess lower bound of a leaderboard subtask (``1 / num_choices``)."""
    try:
        return 1.0 / LEADERBOARD_NUM_CHOICES[task]
    except KeyError:
        raise KeyError(f"{task!r} is not an Open LLM Leaderboard v2 multiple-choice subtask "
                       f"(known: {sorted(LEADERBOARD_NUM_CHOICES)})") from None


def normalize_leaderboard(df: pd.DataFrame, *, value_col: str = "value", task_col: str = "task",
                          num_choices: Mapping[str, int] | None = None) -> pd.Series:
    """Per-row normalized value; NaN for tasks without a known number of choices.

    `num_choices` adds or overrides entries (e.g. ``{"hellaswag": 4}``).
    """
    table = {**LEADERBOARD_NUM_CHOICES, **(num_choices or {})}
    k = df[task_col].map(table).astype("float64")
    lb = 1.0 / k
    out = np.maximum(0.0, df[value_col].to_numpy(np.float64) - lb.to_numpy()) / (1.0 - lb.to_numpy())
    return pd.Series(out, index=df.index, name="normalized_value")


def add_normalized(df: pd.DataFrame, **kw) -> pd.DataFrame:
    """Copy of `df` with ``normalized_value`` filled where it is missing and the task is known."""
    out = df.copy()
    norm = normalize_leaderboard(out, **kw)
    if "normalized_value" in out:
        out["normalized_value"] = out["normalized_value"].astype("float64").fillna(norm)
    else:
        out["normalized_value"] = norm
    return out


def leaderboard_scores(df: pd.DataFrame, *, keys: Sequence[str] = ("unit_id",),
                       num_choices: Mapping[str, int] | None = None) -> pd.DataFrame:
    """Normalized benchmark scores in tidy form: one row per (keys, benchmark).

    Uses each benchmark's leaderboard metric (acc_norm; acc for MMLU-Pro), normalizes each
    subtask, and averages subtasks without weights (BBH, MuSR). Returns `keys` + ``task``
    (benchmark name), ``metric`` ('leaderboard_normalized'), ``value`` and ``n_subtasks``.
    """
    table = {**LEADERBOARD_NUM_CHOICES, **(num_choices or {})}
    keys = list(keys)
    d = df.loc[df["task"].isin(table.keys()), keys + ["task", "metric", "value"]]
    bench = d["task"].map(LEADERBOARD_BENCHMARK).fillna(d["task"])
    want = bench.map(LEADERBOARD_METRIC).fillna(d["metric"])
    keep = (d["metric"] == want).to_numpy()
    d = d[keep].assign(benchmark=bench[keep])
    d["norm"] = normalize_leaderboard(d, num_choices=num_choices)
    out = (d.groupby(keys + ["benchmark"], dropna=False, sort=True)
           .agg(value=("norm", "mean"), n_subtasks=("norm", "size")).reset_index()
           .rename(columns={"benchmark": "task"}))
    out.insert(len(keys) + 1, "metric", "leaderboard_normalized")
    return out


# ---------------------------------------------------------------------------- unit scores

UNIT_COLUMNS = ("unit_id", "run_id", "source", "suite", "suite_version", "profile", "pool", "base_model", "method",
                "method_version", "params_json", "seed", "subset", "n", "role")
GROUP_KEYS = ("suite", "suite_version", "profile", "pool", "base_model")


def select_metric(df: pd.DataFrame, metric: str | Mapping[str, str] | None) -> pd.DataFrame:
    """The rows of each task's headline metric: ``metric`` names it (one name, or per task); None
    takes the only metric each task has (an error if a task has several)."""
    if metric is None:
        if df.groupby("task")["metric"].nunique().max() > 1 if len(df) else False:
            raise ValueError("rows hold several metrics per task; pass metric= (a name or {task: metric})")
        return df
    if isinstance(metric, str):
        return df[df["metric"] == metric]
    want = df["task"].map(metric)
    return df[want.notna() & (df["metric"] == want)]


def unit_scores(data: pd.DataFrame | Any, *, metric: str | Mapping[str, str] | None = None,
                tasks: Sequence[str] | None = None, value_col: str = "value", where: str | None = None) -> pd.DataFrame:
    """One row per unit: its unit columns, ``score`` (unweighted mean over tasks) and ``n_tasks``.

    `data` is a DataFrame of result rows, or a DuckDB connection from ``store.connect`` (the
    reduction then runs in DuckDB over the ``results`` view, filtered by the SQL `where`, and
    only one row per unit reaches pandas). With `tasks`, only those tasks count and units
    missing any of them are dropped, so every score averages the same tasks.
    """
    if not isinstance(data, pd.DataFrame):
        return _unit_scores_sql(data, metric=metric, tasks=tasks, value_col=value_col, where=where)
    d = select_metric(data, metric)
    if tasks is not None:
        d = d[d["task"].isin(list(tasks))]
    cols = [c for c in UNIT_COLUMNS if c in d.columns and c != "unit_id"]
    g = d.groupby("unit_id", sort=True)
    out = g[cols].first() if cols else pd.DataFrame(index=g.size().index)
    out["score"] = g[value_col].mean()
    out["n_tasks"] = g["task"].nunique()
    out = out.reset_index()
    if tasks is not None:
        out = out[out["n_tasks"] == len(set(tasks))].reset_index(drop=True)
    return out


def _unit_scores_sql(con, *, metric, tasks, value_col, where) -> pd.DataFrame:
    conds, params = [], []
    if isinstance(metric, str):
        conds.append("metric = ?")
        params.append(metric)
    elif isinstance(metric, Mapping):
        pairs = list(metric.items())
        conds.append("(" + " OR ".join(["(task = ? AND metric = ?)"] * len(pairs)) + ")" if pairs else "FALSE")
        params += [x for p in pairs for x in p]
    if tasks is not None:
        tasks = list(dict.fromkeys(tasks))
        conds.append("task IN (" + ",".join(["?"] * len(tasks)) + ")" if tasks else "FALSE")
        params += tasks
    if where:
        conds.append(f"({where})")
    cols = [c for c in UNIT_COLUMNS if c != "unit_id"]
    q = (f"SELECT unit_id, {', '.join(f'any_value({c}) AS {c}' for c in cols)}, "
         f"avg({value_col}) AS score, count(DISTINCT task) AS n_tasks FROM results "
         + ("WHERE " + " AND ".join(conds) if conds else "") + " GROUP BY unit_id")
    if metric is None:
        q_multi = "SELECT max(c) FROM (SELECT count(DISTINCT metric) c FROM results GROUP BY task)"
        multi = con.execute(q_multi).fetchone()[0]
        if multi and multi > 1:
            raise ValueError("rows hold several metrics per task; pass metric= (a name or {task: metric})")
    if tasks is not None:
        q = f"SELECT * FROM ({q}) WHERE n_tasks = {len(tasks)}"
    out = con.execute(q + " ORDER BY unit_id", params).df()
    out["n_tasks"] = out["n_tasks"].astype("int64")
    return out


# ------------------------------------------------------------------- references and gains


def _keys(df: pd.DataFrame, keys: Sequence[str]) -> list[str]:
    return [k for k in keys if k in df.columns]


def _keyed(df: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Copy whose key columns are strings with a sentinel for nulls, so joins/groupbys keep them."""
    out = df.copy()
    for k in keys:
        if not pd.api.types.is_numeric_dtype(out[k]):
            out[k] = out[k].astype("string").fillna("\x00null")
    return out


def _unkey(df: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    for k in keys:
        if k in df and df[k].dtype == "string":
            df[k] = df[k].replace("\x00null", pd.NA)
    return df


def _first_member(subset: pd.Series) -> pd.Series:
    return subset.map(lambda s: None if s is None or len(s) == 0 else s[0])


def compare_to_references(scores: pd.DataFrame, *, group_keys: Sequence[str] = GROUP_KEYS, scale: float = 100.0,
                          best_expert: str = "pool") -> pd.DataFrame:
    """Merged and expert units with their references: the base model and the best single expert.

    `scores` is :func:`unit_scores` output holding role 'merged' units and the references
    ('base', 'expert') of the same group (`group_keys`: suite, version, profile, pool, base).
    Adds ``base_score``, ``best_expert``, ``best_expert_score``, ``gain_vs_base_pp`` =
    ``scale * (score - base_score)``, ``gain_vs_best_expert_pp``, ``beats_base`` and
    ``beats_best_expert`` (strict >). Following seed 001 Table 2, the best expert is the pool's
    best by average score, one fixed reference for all merges (``best_expert='pool'``);
    ``'subset'`` uses the best expert among each merge's own members instead.
    """
    if best_expert not in ("pool", "subset"):
        raise ValueError("best_expert must be 'pool' or 'subset'")
    keys = _keys(scores, group_keys)
    s = _keyed(scores, keys)
    if not keys:  # one group: a constant key keeps the joins below uniform
        keys = ["_group"]
        s["_group"] = ""
    base = s[s["role"] == "base"].groupby(keys, sort=False)["score"].mean().rename("base_score").reset_index()
    ex = s[s["role"] == "expert"].assign(expert=lambda x: _first_member(x["subset"]))
    ex = ex.groupby(keys + ["expert"], sort=True)["score"].mean().rename("expert_score").reset_index()
    out = s[s["role"].isin(["merged", "expert"])].merge(base, on=keys, how="left")
    if best_expert == "pool" or out.empty:
        top = ex.sort_values(keys + ["expert_score", "expert"], ascending=[True] * len(keys) + [False, True])
        top = top.drop_duplicates(keys).rename(columns={"expert": "best_expert", "expert_score": "best_expert_score"})
        out = out.merge(top, on=keys, how="left")
    else:
        mem = out[["unit_id", *keys, "subset"]].explode("subset").rename(columns={"subset": "expert"})
        mem = mem.merge(ex, on=keys + ["expert"], how="inner")
        mem = mem.sort_values(["unit_id", "expert_score", "expert"], ascending=[True, False, True])
        mem = mem.drop_duplicates("unit_id")
        out = out.merge(mem[["unit_id", "expert", "expert_score"]].rename(
            columns={"expert": "best_expert", "expert_score": "best_expert_score"}), on="unit_id", how="left")
    out["gain_vs_base_pp"] = scale * (out["score"] - out["base_score"])
    out["gain_vs_best_expert_pp"] = scale * (out["score"] - out["best_expert_score"])
    out["beats_base"] = (out["score"] > out["base_score"]).where(out["base_score"].notna())
    out["beats_best_expert"] = (out["score"] > out["best_expert_score"]).where(out["best_expert_score"].notna())
    return _unkey(out.drop(columns=["_group"], errors="ignore"), keys)


def summary_by_n(compared: pd.DataFrame, *, group_keys: Sequence[str] = GROUP_KEYS,
                 by: Sequence[str] = ("method", "params_json")) -> pd.DataFrame:
    """The per-size summary of seed 001 Tables 1-3 from :func:`compare_to_references` output.

    One row per (group, method, params, n); experts appear as method NaN at n = 1 (the tables'
    n = 1 column). Columns: ``n_units``, ``mean`` and ``std`` (ddof=1) of the score,
    ``p_gt_base`` and ``p_gt_best_expert`` (fractions of units strictly above the reference),
    ``gain_vs_base_pp`` and ``gain_vs_best_expert_pp`` (means over units, percentage points).
    """
    keys = _keys(compared, group_keys) + _keys(compared, by) + ["role", "n"]
    c = _keyed(compared, keys)
    c["_gt_base"] = c["beats_base"].astype("float64")  # NaN where the reference is missing
    c["_gt_best"] = c["beats_best_expert"].astype("float64")
    out = c.groupby(keys, sort=True).agg(
        n_units=("score", "size"), mean=("score", "mean"), std=("score", "std"),
        p_gt_base=("_gt_base", "mean"), gain_vs_base_pp=("gain_vs_base_pp", "mean"),
        p_gt_best_expert=("_gt_best", "mean"), gain_vs_best_expert_pp=("gain_vs_best_expert_pp", "mean"))
    return _unkey(out.reset_index(), keys)


# -------------------------------------------------------------------------- merging loss


def merging_loss(merged_rows: pd.DataFrame, expert_rows: pd.DataFrame, task_expert: Mapping[str, str], *,
                 value_col: str = "value", join_keys: Sequence[str] = GROUP_KEYS) -> pd.DataFrame:
    """Seed 004 eq. 1 per (merged unit, task): ``L = (P(merged, T_i) / P(expert_i, T_i) - 1) * 100``.

    ``expert_i`` is the expert fine-tuned on task ``T_i`` (`task_expert` maps task -> expert
    name). Only tasks whose expert is a member of the merged subset count, so a pairwise merge
    is scored on its two tasks. `merged_rows`/`expert_rows` are result rows (one metric per task);
    an expert row's model is ``subset[0]``. Returns unit_id, task, expert, merged_value,
    expert_value and ``merging_loss_pct`` (<= 0 when merging hurts; +inf/NaN if the expert scores 0).
    """
    keys = [k for k in join_keys if k in merged_rows.columns and k in expert_rows.columns]
    m = _keyed(merged_rows, keys)
    m = m.assign(expert=m["task"].map(dict(task_expert)))
    m = m[m["expert"].notna()]
    members = m[["unit_id", "subset"]].drop_duplicates("unit_id").explode("subset")
    members = members.rename(columns={"subset": "expert"}).dropna()
    m = m.merge(members, on=["unit_id", "expert"], how="inner")
    e = _keyed(expert_rows, keys)
    e = e.assign(expert=_first_member(e["subset"]))[[*keys, "expert", "task", value_col]]
    e = e.rename(columns={value_col: "expert_value"})
    out = m[["unit_id", *keys, "method", "n", "task", "expert", value_col]].rename(columns={value_col: "merged_value"})
    out = out.merge(e, on=[*keys, "expert", "task"], how="inner")
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = out["merged_value"].to_numpy(np.float64) / out["expert_value"].to_numpy(np.float64)
        out["merging_loss_pct"] = (ratio - 1.0) * 100.0
    return _unkey(out, keys).sort_values(["unit_id", "task"]).reset_index(drop=True)


def average_merging_loss(losses: pd.DataFrame) -> pd.DataFrame:
    """Per merged unit: mean and population std (ddof=0, as seed 004 Table 1) of the task losses."""
    g = losses.groupby("unit_id", sort=True)["merging_loss_pct"]
    out = pd.DataFrame({"merging_loss_pct": g.mean(), "merging_loss_std": g.std(ddof=0), "n_tasks": g.size()})
    extra = [c for c in ("method", "n") if c in losses.columns]
    if extra:
        out = out.join(losses.groupby("unit_id", sort=True)[extra].first())
    return out.reset_index()


# ------------------------------------------------------------------------------- bootstrap

_MAX_BOOT_CELLS = 4_000_000  # index-matrix cells per chunk, bounds memory at ~32 MB

#: Ranks and ties compare values rounded to this many decimals: two means of the same numbers
#: summed in a different order differ in the last bits and must still tie.
TIE_DECIMALS = 12


class BootstrapError(MergebenchError, ValueError):
    """A bootstrap asked for without an explicit integer seed or with a bad number of resamples."""


def bootstrap_rng(seed: int) -> np.random.Generator:
    """The generator of every bootstrap here: ``Generator(PCG64(seed))`` with an explicit integer seed
    (None, i.e. fresh OS entropy, is refused: every reported interval must be reproducible)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise BootstrapError(f"bootstrap seed must be a non-negative integer, got {seed!r}")
    return np.random.Generator(np.random.PCG64(int(seed)))


def _check_n_boot(n_boot: int) -> int:
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise BootstrapError(f"number of bootstrap resamples (n_boot) must be a positive integer, got {n_boot!r}")
    return int(n_boot)


def _boot_means(x: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Means of `n_boot` resamples (with replacement) of the rows of `x` (shape k or k x m)."""
    k = x.shape[0]
    out = np.empty((n_boot,) + x.shape[1:], dtype=np.float64)
    step = max(1, _MAX_BOOT_CELLS // max(k, 1))
    for a in range(0, n_boot, step):
        b = min(n_boot, a + step)
        idx = rng.integers(0, k, size=(b - a, k))
        out[a:b] = x[idx].mean(axis=1)
    return out


def bootstrap_ci(values: Sequence[float] | np.ndarray, *, n_boot: int = 10_000, ci: float = 0.95,
                 seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap interval of the mean, seeded and vectorized.

    The values are sorted before resampling, so the interval depends on the values, `n_boot` and
    `seed` only, never on the order the rows arrived in (a store query returns them in any order)."""
    rng = bootstrap_rng(seed)
    n_boot = _check_n_boot(n_boot)
    x = np.asarray(values, dtype=np.float64)
    x = np.sort(x[~np.isnan(x)])
    if x.size == 0:
        return (math.nan, math.nan, math.nan)
    means = _boot_means(x, n_boot, rng)
    a = (1.0 - ci) / 2.0
    lo, hi = np.quantile(means, [a, 1.0 - a])
    return float(x.mean()), float(lo), float(hi)


def bootstrap_ci_by(scores: pd.DataFrame, by: Sequence[str] = ("method",), *, value: str = "score",
                    n_boot: int = 10_000, ci: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """:func:`bootstrap_ci` of each group's mean score (units resampled within the group)."""
    rows = []
    for key, grp in scores.groupby(list(by), sort=True, dropna=False):
        mean, lo, hi = bootstrap_ci(grp[value].to_numpy(), n_boot=n_boot, ci=ci, seed=seed)
        key = key if isinstance(key, tuple) else (key,)
        rows.append((*key, int(grp[value].notna().sum()), mean, lo, hi))
    return pd.DataFrame(rows, columns=[*by, "n_units", "mean", "ci_low", "ci_high"])


def pair_key(subset: pd.Series) -> pd.Series:
    """Order-free identity of a subset ('a|b|c'), to match identical subsets across methods."""
    return subset.map(lambda s: "|".join(sorted(s)) if s is not None else None)


PAIR_KEYS = ("suite", "suite_version", "profile", "pool", "base_model", "n", "subset_key")


def _pivot(scores: pd.DataFrame, method_col: str, value: str, pair_on: Sequence[str]) -> pd.DataFrame:
    s = scores.copy()
    if "subset_key" in pair_on and "subset_key" not in s:
        s["subset_key"] = pair_key(s["subset"])
    keys = _keys(s, pair_on)
    s = _keyed(s, keys)
    return s.pivot_table(index=keys, columns=method_col, values=value, aggfunc="mean")


def rank_intervals(scores: pd.DataFrame, *, method_col: str = "method", value: str = "score",
                   pair_on: Sequence[str] = PAIR_KEYS, n_boot: int = 2_000, ci: float = 0.95, seed: int = 0,
                   higher_is_better: bool = True) -> pd.DataFrame:
    """Bootstrap rank intervals of methods (rank 1 = best; ties share the better rank).

    When every method was evaluated on the same subsets (the sampler guarantees it) the subsets
    are resampled jointly, so ranks reflect paired differences; otherwise each method's units are
    resampled independently (each method's values sorted first, so the result never depends on
    row order). Values equal to :data:`TIE_DECIMALS` decimals tie. Returns method, n_units, mean,
    rank, ``tied`` (another method has the same point estimate), rank_low, rank_high, p_best (the
    share of resamples in which the method ranks first, a tie for first splitting that resample
    evenly, so p_best sums to 1 over methods) and paired.
    """
    rng = bootstrap_rng(seed)
    n_boot = _check_n_boot(n_boot)
    piv = _pivot(scores, method_col, value, pair_on)
    methods = list(piv.columns)
    if len(methods) == 0:
        cols = [method_col, "n_units", "mean", "rank", "tied", "rank_low", "rank_high", "p_best", "paired"]
        return pd.DataFrame(columns=cols)
    complete = piv.dropna()
    paired = len(complete) == len(piv) and len(piv) > 0
    if paired:
        x = complete.to_numpy(np.float64)
        boot = _boot_means(x, n_boot, rng)  # (B, M)
        point = x.mean(axis=0)
        n_units = np.full(len(methods), x.shape[0])
    else:
        cols = [np.sort(piv[m].dropna().to_numpy(np.float64)) for m in methods]
        boot = np.stack([_boot_means(c, n_boot, rng) for c in cols], axis=1)
        point = np.array([c.mean() for c in cols])
        n_units = np.array([c.size for c in cols])
    sign = 1.0 if higher_is_better else -1.0

    def ranks(v: np.ndarray) -> np.ndarray:  # competition ranking along the last axis
        v = np.round(sign * v, TIE_DECIMALS)
        return (v[..., None, :] > v[..., :, None]).sum(axis=-1) + 1

    r = ranks(boot)
    first = (r == 1).astype(np.float64)
    p_best = (first / first.sum(axis=1, keepdims=True)).mean(axis=0)  # a k-way tie for first: 1/k each
    a = (1.0 - ci) / 2.0
    lo, hi = np.quantile(r, [a, 1.0 - a], axis=0, method="inverted_cdf")
    rank = ranks(point)
    tied = (rank[:, None] == rank[None, :]).sum(axis=1) > 1
    return pd.DataFrame({method_col: methods, "n_units": n_units, "mean": point, "rank": rank, "tied": tied,
                         "rank_low": lo.astype(int), "rank_high": hi.astype(int), "p_best": p_best,
                         "paired": paired}).sort_values(["rank", method_col]).reset_index(drop=True)


def _sign_test_p(n_pos: int, n_neg: int) -> float:
    n = n_pos + n_neg
    if n == 0:
        return math.nan
    try:
        from scipy.stats import binomtest

        return float(binomtest(n_pos, n, 0.5).pvalue)
    except ImportError:  # exact two-sided binomial, as binomtest computes it for p = 0.5
        k = min(n_pos, n_neg)
        return min(1.0, 2.0 * sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n)


def _wilcoxon_p(d: np.ndarray) -> float:
    if np.count_nonzero(d) == 0:
        return math.nan
    try:
        from scipy.stats import wilcoxon
    except ImportError:
        return math.nan
    return float(wilcoxon(d, zero_method="wilcox").pvalue)


def paired_comparison(scores: pd.DataFrame, method_a: str, method_b: str, *, method_col: str = "method",
                      value: str = "score", pair_on: Sequence[str] = PAIR_KEYS, n_boot: int = 10_000,
                      ci: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Method A minus method B on the subsets both were evaluated on.

    Returns n_pairs, mean_diff, its percentile bootstrap CI, counts of wins/losses/ties, the
    two-sided sign-test p-value (exact binomial on non-tied pairs) and the Wilcoxon signed-rank
    p-value (zeros dropped; NaN without scipy or without non-zero differences).
    """
    return _paired(_pivot(scores, method_col, value, pair_on), method_a, method_b, n_boot=n_boot, ci=ci, seed=seed)


def _paired(piv: pd.DataFrame, method_a: str, method_b: str, *, n_boot: int, ci: float, seed: int) -> dict[str, Any]:
    for m in (method_a, method_b):
        if m not in piv.columns:
            raise KeyError(f"no scores for method {m!r} (have {list(piv.columns)})")
    both = piv[[method_a, method_b]].dropna()
    d = (both[method_a] - both[method_b]).to_numpy(np.float64)
    mean, lo, hi = bootstrap_ci(d, n_boot=n_boot, ci=ci, seed=seed)
    n_pos, n_neg = int((d > 0).sum()), int((d < 0).sum())
    return {"method_a": method_a, "method_b": method_b, "n_pairs": int(d.size), "mean_diff": mean, "ci_low": lo,
            "ci_high": hi, "wins": n_pos, "losses": n_neg, "ties": int(d.size - n_pos - n_neg),
            "sign_test_p": _sign_test_p(n_pos, n_neg), "wilcoxon_p": _wilcoxon_p(d)}


def paired_comparisons(scores: pd.DataFrame, methods: Sequence[str] | None = None, *, method_col: str = "method",
                       value: str = "score", pair_on: Sequence[str] = PAIR_KEYS, n_boot: int = 10_000,
                       ci: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """:func:`paired_comparison` for every pair of `methods` (default: all, by name), pivoting once."""
    piv = _pivot(scores, method_col, value, pair_on)
    methods = sorted(piv.columns) if methods is None else list(methods)
    rows = [_paired(piv, a, b, n_boot=n_boot, ci=ci, seed=seed) for i, a in enumerate(methods) for b in methods[i + 1:]]
    return pd.DataFrame(rows, columns=["method_a", "method_b", "n_pairs", "mean_diff", "ci_low", "ci_high", "wins",
                                       "losses", "ties", "sign_test_p", "wilcoxon_p"])


def paired_doc_gap(samples: pd.DataFrame, method_a: str, method_b: str, *, method_col: str = "method",
                   n_boot: int = 2_000, ci: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Paired gap of two methods over the same subsets *and* documents, bootstrapped over both.

    ``samples``: per-document outcomes of merged units (columns ``method``, ``subset_key``,
    ``task``, ``doc_id``, ``value``; one metric per task, e.g. the suite's headline). A unit's
    score is the mean over tasks of its per-task document means (the battery average), so the gap
    is mean_s mean_t mean_d [a(s, t, d) - b(s, t, d)] over the subsets and documents both methods
    share. Each resample draws subsets with replacement and, independently, each task's documents
    with replacement, the same draw for both methods: the interval reflects both sources of
    sampling error, paired, which is far narrower than one over the subset means alone when
    documents vary more than subsets do. Also returned: ``subsets_ci_low/high``, the interval with
    the documents held fixed (what :func:`paired_comparison` over unit scores gives), for contrast.
    """
    rng = bootstrap_rng(seed)
    n_boot = _check_n_boot(n_boot)
    cols = ["subset_key", "task", "doc_id"]
    both = samples[samples[method_col].isin([method_a, method_b])]
    wide = both.pivot_table(index=cols, columns=method_col, values="value", aggfunc="mean")
    for m in (method_a, method_b):
        if m not in wide.columns:
            raise KeyError(f"no per-document outcomes for method {m!r} (have {sorted(samples[method_col].unique())})")
    diff = (wide[method_a] - wide[method_b]).dropna().rename("d").reset_index()
    subsets = sorted(diff.subset_key.unique())
    tasks = sorted(diff.task.unique())
    # one (subsets x documents) matrix per task, over the documents every shared subset has
    mats = []
    for t in tasks:
        m = diff[diff.task == t].pivot(index="subset_key", columns="doc_id", values="d").reindex(subsets)
        mats.append(m.dropna(axis=1).sort_index(axis=1).to_numpy(np.float64))
    mats = [m for m in mats if m.shape[1] > 0]
    n_docs = sum(m.shape[1] for m in mats)
    if not subsets or not mats:
        return {"method_a": method_a, "method_b": method_b, "n_subsets": 0, "n_docs": 0, "mean_diff": math.nan,
                "ci_low": math.nan, "ci_high": math.nan, "p_a_better": math.nan, "subsets_ci_low": math.nan,
                "subsets_ci_high": math.nan}
    s = len(subsets)
    point = float(np.mean([m.mean() for m in mats]))
    w = rng.multinomial(s, np.full(s, 1.0 / s), size=n_boot) / s  # subset weights per resample
    joint = np.zeros(n_boot)
    fixed = np.zeros(n_boot)
    for m in mats:
        k = m.shape[1]
        u = rng.multinomial(k, np.full(k, 1.0 / k), size=n_boot) / k  # document weights per resample
        joint += np.einsum("bs,sd,bd->b", w, m, u)
        fixed += w @ m.mean(axis=1)
    joint /= len(mats)
    fixed /= len(mats)
    a = (1.0 - ci) / 2.0
    lo, hi = np.quantile(joint, [a, 1.0 - a])
    flo, fhi = np.quantile(fixed, [a, 1.0 - a])
    return {"method_a": method_a, "method_b": method_b, "n_subsets": s, "n_docs": int(n_docs), "mean_diff": point,
            "ci_low": float(lo), "ci_high": float(hi), "p_a_better": float((joint > 0).mean()),
            "subsets_ci_low": float(flo), "subsets_ci_high": float(fhi)}
