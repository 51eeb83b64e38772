"""What a sweep will cost before it starts (``mergebench sweep --dry-run``), and how much memory a
unit should reserve on Ray.

Seconds per evaluated document and per merge come from :mod:`mergebench.evaluation.pace` (the provenance
of units already stored for the same pool, this CPU first; assumed only without any).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mergebench.evaluation.pace import ASSUMED_SECONDS_PER_DOC, ASSUMED_SECONDS_PER_MERGE, Rates, format_duration, measured_rates
from .plan import Job, SweepPlan

__all__ = ["ASSUMED_SECONDS_PER_DOC", "ASSUMED_SECONDS_PER_MERGE", "CostEstimate", "Rates", "estimate",
           "measured_rates", "unit_memory"]

GiB = 2**30


def _docs(sweep: SweepPlan, job: Job) -> int:
    """Documents a job scores (a group task counts the sampled documents of its leaf tasks)."""
    return sweep.plans[job.plan_index].n_docs(job.unit.tasks)


@dataclass(frozen=True)
class CostEstimate:
    units: int
    cached: int
    merges: int
    references: int
    docs: int
    rates: Rates
    merge_seconds: float = 0.0  # the pending merges, each at its method's measured rate for its size

    @property
    def seconds(self) -> float:
        """Unit-seconds of the work still to do (one unit at a time)."""
        return (self.docs * self.rates.seconds_per_doc + self.merge_seconds
                + (self.units - self.cached) * self.rates.seconds_per_unit)

    def describe(self) -> str:
        t = format_duration(self.seconds)
        return (f"{self.units - self.cached} of {self.units} unit(s) to run ({self.merges} merge(s), "
                f"{self.references} reference(s), {self.docs} documents): ~{t} one unit at a time "
                f"({self.rates.seconds_per_doc:.3g} s/document, {self.merge_seconds:.0f} s of merges, "
                f"{self.rates.seconds_per_unit:.3g} s/unit besides; "
                f"{self.rates.basis}). Local executor: ~{t}; Ray: ~{t} / k for k units running at once "
                "(cluster CPUs / --cpus-per-unit, or GPUs / --gpus-per-unit), plus start-up.")


def estimate(plans: Sequence[tuple[SweepPlan, str | os.PathLike]], rates: Rates) -> CostEstimate:
    """Cost of running each (plan, store) pair's pending jobs at ``rates``."""
    units = cached = merges = refs = docs = 0
    merge_s = 0.0
    for sweep, results_dir in plans:
        todo = sweep.pending(results_dir)
        units += len(sweep.jobs)
        cached += len(sweep.jobs) - len(todo)
        merges += sum(j.method is not None for j in todo)
        refs += sum(j.method is None for j in todo)
        docs += sum(_docs(sweep, j) for j in todo)
        merge_s += sum(rates.merge_seconds(j.method, len(j.unit.members)) for j in todo if j.method is not None)
    return CostEstimate(units, cached, merges, refs, docs, rates, merge_s)


def unit_memory(sweep: SweepPlan, rates: Rates) -> int:
    """Bytes a unit should reserve: 1.25 x the largest measured merge peak RSS of the pool, else
    1 GiB + 3 x the base checkpoint (merged weights, the evaluated model and streamed inputs)."""
    if rates.peak_rss_bytes:
        return int(rates.peak_rss_bytes * 1.25)
    base = Path(sweep.plans[0].paths[sweep.pool.base.name])
    size = sum(f.stat().st_size for f in base.glob("*.safetensors")) if base.is_dir() else 0
    return GiB + 3 * size
