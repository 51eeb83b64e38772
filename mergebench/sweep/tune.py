"""``mergebench sweep --tune``: choose each method's setting on validation documents, then test it.

1. per method, the grid's points under a fixed budget (:func:`~mergebench.sweep.grid.trial_points`:
   all of them, or a seeded random subset of ``trials`` points in grid order);
2. every trial merges every subset of the profile and is scored on the embedded tasks'
   **validation** split (documents drawn by the same seeded sampler, keyed on the split); these
   rows go to a separate store, ``<results>/tuning``, so they never mix with test scores;
3. per method, the trial with the best mean headline score over the merged subsets wins (ties:
   the earlier trial);
4. only that setting is evaluated on the profile's **test** split, with the usual references,
   into ``<results>``. Each of its units records the decision in its provenance
   (``extra_json.tuning``: trials, grid size, validation units and documents, seed, candidates and
   their validation scores); units without that record are default (untuned) rows. The
   leaderboard's Ranking page shows the record as its ``tuned`` column.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from mergebench.evaluation import runner
from mergebench.results import store
from ..methods import ParameterError
from .executors import Executor, SweepStats, run_sweep
from .grid import Point, trial_points
from .plan import SweepPlan, resolve_setup, plan_sweep, validate_points
from .summary import point_scores

__all__ = ["TUNING_DIR", "TuneOutcome", "TuningPlan", "TuningResult", "plan_tuning", "tune", "tuned_label", "tuned_variants"]

TUNING_DIR = "tuning"
"""Sub-folder of the results store holding the validation-split rows of tuning trials."""
VALIDATION_SPLIT = "validation"


@dataclass
class TuningResult:
    """The choice tuning made for one method, and the budget it spent."""

    method: str
    grid_size: int
    trials: list[Point]
    scores: list[float | None]
    best: Point
    best_score: float
    best_params: dict[str, Any]
    validation_units: int
    validation_docs: int
    docs_per_task: dict[str, int]
    seed: int

    def record(self) -> dict[str, Any]:
        """The provenance record (``extra_json.tuning``) of every test unit of the chosen setting."""
        return {
            "tuned": True, "split": VALIDATION_SPLIT, "criterion": "mean headline score over the merged subsets",
            "grid_size": self.grid_size, "trials": len(self.trials), "tune_seed": self.seed,
            "validation_units": self.validation_units, "validation_docs": self.validation_docs,
            "validation_docs_per_task": self.docs_per_task, "selected": self.best, "selected_params": self.best_params,
            "validation_score": self.best_score,
            "candidates": [{"point": p, "score": s} for p, s in zip(self.trials, self.scores)],
        }


@dataclass
class TuneOutcome:
    results: dict[str, TuningResult]
    validation: SweepPlan
    validation_stats: SweepStats
    test: SweepPlan | None = None
    test_stats: SweepStats | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class TuningPlan:
    grid_sizes: dict[str, int]  # per method, after removing duplicate points
    validation: SweepPlan  # the trials of the methods with a choice to make
    untuned: dict[str, list[Point]]  # methods with one setting only: straight to the test split


def plan_tuning(suite: str, points: Mapping[str, Sequence[Point]], *, trials: int, tune_seed: int = 0,
                **kw: Any) -> TuningPlan:
    """Validate the whole grid, then plan the trials on the validation split (merges only).

    A method with a single setting (no grid key fits it) has nothing to choose: it is not tuned
    and goes to the test split with its rows left unmarked (default).
    """
    keep = {k: kw[k] for k in ("pool", "profile", "params", "values", "quick") if k in kw}
    _, prof, _ = resolve_setup(suite, keep.get("pool"), keep.get("profile"), keep.get("quick", False), keep.get("values"))
    if not runner.is_embedded(prof.tasks):
        raise ParameterError(f"profile {prof.name!r} evaluates hub tasks, whose splits mergebench does not choose; "
                             "--tune needs the embedded tasks (their validation split)")
    if prof.docs.split == VALIDATION_SPLIT:
        raise ParameterError(f"profile {prof.name!r} already evaluates the validation split; "
                             "tuning needs a held-out test split (docs.split: test)")
    full = validate_points(suite, points, **keep)
    chosen = {m: trial_points(pts, trials, method=m, seed=tune_seed) for m, pts in full.items() if len(pts) > 1}
    if not chosen:
        raise ParameterError("--tune has nothing to choose: give --grid at least two values of a parameter of "
                             f"one of the methods ({', '.join(full)})")
    val = plan_sweep(suite, chosen, split=VALIDATION_SPLIT, references=False,
                     provenance={"tuning_trial": True}, **kw)
    return TuningPlan({m: len(pts) for m, pts in full.items()}, val,
                      {m: pts for m, pts in full.items() if m not in chosen})


def tune(
    suite: str,
    points: Mapping[str, Sequence[Point]],
    *,
    trials: int,
    results_dir: str | Path = store.DEFAULT_RESULTS_DIR,
    executor: Executor | None = None,
    tune_seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] = print,
    tuning: TuningPlan | None = None,
    **plan_kw: Any,
) -> TuneOutcome:
    """Tune every method on validation documents, then score each one's best setting on test.

    ``plan_kw`` go to :func:`~mergebench.sweep.plan.plan_sweep` (pool, profile, params, values,
    seed, quick); ``tuning`` is :func:`plan_tuning`'s result when the caller planned already.
    Stops after the validation phase (``test`` is None) if a trial unit failed.
    """
    results_dir = Path(results_dir)
    tp = tuning or plan_tuning(suite, points, trials=trials, tune_seed=tune_seed, log=log, **plan_kw)
    sizes, val = tp.grid_sizes, tp.validation
    run_id = store.new_run_id()
    tuning_dir = results_dir / TUNING_DIR
    log(f"tuning on the validation split: {len(val.jobs)} unit(s) in {tuning_dir}")
    vstats = run_sweep(val, tuning_dir, executor=executor, device=device, progress=progress, run_id=run_id, log=log)
    outcome = TuneOutcome({}, val, vstats)
    if vstats.failed:
        outcome.notes.append(f"{len(vstats.failed)} tuning unit(s) failed; no setting was chosen (rerun to retry)")
        return outcome
    table = point_scores(val, tuning_dir)
    best_points: dict[str, list[Point]] = {}
    for method in val.points:
        tried = val.plans_of(method)
        trial_scores = [None if pd.isna(v) else float(v) for v in table.loc[table["method"] == method, "mean"]]
        ranked = [i for i, s in enumerate(trial_scores) if s is not None]
        if not ranked:
            outcome.notes.append(f"{method}: no validation score (no merged unit has rows); not tuned")
            continue
        i = max(ranked, key=lambda k: (trial_scores[k], -k))  # best score, earliest trial on ties
        pt, plan = tried[i]
        docs = {t.name: plan.n_docs([t]) for t in plan.profile.tasks}
        n_docs = sum(p.n_docs(wu.tasks) for _, p in tried for wu in p.merges)
        outcome.results[method] = TuningResult(
            method=method, grid_size=sizes[method], trials=[dict(p) for p, _ in tried], scores=trial_scores,
            best=dict(pt), best_score=trial_scores[i], best_params=dict(plan.merges[0].unit.params) if plan.merges else {},
            validation_units=sum(len(p.merges) for _, p in tried), validation_docs=n_docs, docs_per_task=docs,
            seed=tune_seed)
        best_points[method] = [pt]
    if not best_points:
        return outcome
    records = {m: r.record() for m, r in outcome.results.items()}
    settings = {m: best_points.get(m) or tp.untuned[m] for m in sizes if m in best_points or m in tp.untuned}
    test = plan_sweep(suite, settings, log=log, **plan_kw,
                      provenance=lambda m, pt: {"tuning": records[m]} if m in records else {})
    log(f"testing the chosen setting(s) on the {test.split} split")
    tstats = run_sweep(test, results_dir, executor=executor, device=device, progress=progress, run_id=run_id, log=log)
    # units of a chosen setting that this run did not write (stored earlier, e.g. by an untuned
    # sweep, or by a concurrent one) get the tuning record as an extra provenance row of this run
    for job in test.merges:
        if "tuning" in job.provenance and tstats.outcomes.get(job.unit_id) in (None, "skipped"):
            mine = (results_dir / "provenance").glob(f"suite=*/method=*/prov-{run_id}-{job.unit_id}.parquet")
            if not any(mine):  # a retried attempt of this run may have written it (with timings) already
                store.write_provenance(dict(job.provenance), run_id=run_id, unit=job.unit.unit, results_dir=results_dir)
    outcome.test, outcome.test_stats = test, tstats
    return outcome


# ------------------------------------------------------------------------------ reading it back


def tuned_label(record: Mapping[str, Any]) -> str:
    """Short marker for a tuning record, e.g. ``tuned (4/6 trials, 120 val docs)``."""
    return f"tuned ({record.get('trials')}/{record.get('grid_size')} trials, {record.get('validation_docs')} val docs)"


def tuned_variants(con, where: str = "TRUE", params: Sequence[Any] = ()) -> pd.DataFrame:
    """(method, params, tuned) for every merged variant (method + params JSON) in the ``results``
    rows matching ``where``: ``tuned`` is the marker of its tuning record(s), or ``default``."""
    from ..report import df

    q = f"""
        SELECT r.method, r.params_json AS params, list(DISTINCT p.extra_json) AS records
        FROM (SELECT DISTINCT unit_id, method, params_json FROM results WHERE role = 'merged' AND {where}) r
        LEFT JOIN provenance p ON p.unit_id = r.unit_id AND p.extra_json LIKE '%"tuning"%'
        GROUP BY ALL"""
    d = df(con, q, params)  # serialized: the leaderboard shares one connection between threads
    labels = []
    for recs in d["records"]:
        records = [json.loads(r).get("tuning") for r in (recs if recs is not None else []) if r]
        found = sorted({tuned_label(t) for t in records if isinstance(t, dict)})
        labels.append("; ".join(found) if found else "default")
    return pd.DataFrame({"method": d["method"], "params": d["params"], "tuned": labels})
