"""Sweeps: methods x hyperparameter grid x a suite's subsets, run locally or on Ray.

| module | one job |
|---|---|
| :mod:`.grid` | ``--grid key=v1,v2`` parsing, per-method cross products, the seeded trial subset |
| :mod:`.plan` | validated, deduplicated jobs (one per content-keyed unit), split derivation |
| :mod:`.unit` | the self-contained, idempotent unit of work (merge -> evaluate -> store once) |
| :mod:`.executors` | local and Ray executors, progress, :func:`run_sweep` |
| :mod:`.tune` | validation-split tuning under a trial budget, then the test split |
| :mod:`.estimate` | cost estimate from stored timings, memory a unit reserves |

See ``docs/sweeps.md``.
"""

from .estimate import CostEstimate, estimate, measured_rates, unit_memory
from .executors import LocalExecutor, RayExecutor, SweepStats, UnitResources, run_sweep
from .grid import expand_grid, parse_grid, trial_points
from .plan import Job, SweepPlan, plan_sweep, validate_points, with_split
from .tune import TUNING_DIR, TuneOutcome, TuningPlan, TuningResult, plan_tuning, tune, tuned_variants
from .unit import UnitOutcome, run_job

__all__ = [
    "TUNING_DIR", "CostEstimate", "Job", "LocalExecutor", "RayExecutor", "SweepPlan", "SweepStats", "TuneOutcome",
    "TuningPlan", "TuningResult", "UnitOutcome", "UnitResources", "estimate", "expand_grid", "measured_rates", "parse_grid",
    "plan_sweep", "plan_tuning", "run_job", "run_sweep", "trial_points", "tune", "tuned_variants", "unit_memory",
    "validate_points", "with_split",
]
