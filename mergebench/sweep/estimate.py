"""What a sweep will cost before it starts (``mergebench sweep --dry-run``), and how much memory a
unit should reserve on Ray.

Seconds per evaluated document and per merge are measured from the provenance of units already
in the store(s) for the same pool on the same kind of device (``eval_wall_s`` over the units'
``n_docs``, the median ``merge_wall_s``); without such units they are assumed from the embedded
135M pool on 2 CPU cores (the figures ``mergebench plan`` uses), which larger models exceed.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import store
from .plan import Job, SweepPlan

__all__ = ["ASSUMED_SECONDS_PER_DOC", "ASSUMED_SECONDS_PER_MERGE", "CostEstimate", "Rates", "estimate",
           "measured_rates", "unit_memory"]

ASSUMED_SECONDS_PER_DOC = 0.11
ASSUMED_SECONDS_PER_MERGE = 10.0
GiB = 2**30


@dataclass(frozen=True)
class Rates:
    seconds_per_doc: float
    seconds_per_merge: float
    basis: str
    units_measured: int = 0
    peak_rss_bytes: int | None = None


def _device_kind(device: str | None) -> str:
    return "cuda" if (device or "cpu").startswith("cuda") else "cpu"


def measured_rates(results_dirs: Iterable[str | os.PathLike], pool: str, device: str = "cpu") -> Rates:
    """Timing rates of ``pool`` on ``device``'s kind from the stores' provenance (else assumed)."""
    frames = []
    for d in results_dirs:
        if not (Path(d) / "provenance").is_dir():
            continue
        with store.connect(d, include_paper=False) as con, warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=Warning)
            frames.append(con.execute("""
                WITH per_task AS (SELECT unit_id, any_value(pool) AS pool, any_value(role) AS role, task,
                                         max(n_docs) AS n_docs FROM results GROUP BY unit_id, task),
                     units AS (SELECT unit_id, any_value(pool) AS pool, any_value(role) AS role, sum(n_docs) AS docs
                               FROM per_task GROUP BY unit_id)
                SELECT u.unit_id, u.role, u.docs, any_value(p.merge_wall_s) AS merge_s,
                       any_value(p.eval_wall_s) AS eval_s, any_value(p.merge_peak_rss_bytes) AS rss,
                       any_value(p.device) AS device
                FROM units u JOIN provenance p ON p.unit_id = u.unit_id
                WHERE u.pool = ? AND p.eval_wall_s IS NOT NULL AND u.docs > 0
                GROUP BY u.unit_id, u.role, u.docs""", [pool]).df())
    import pandas as pd

    d = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if len(d):
        d = d[d["device"].fillna("cpu").map(_device_kind) == _device_kind(device)].drop_duplicates("unit_id")
    if d.empty:
        return Rates(ASSUMED_SECONDS_PER_DOC, ASSUMED_SECONDS_PER_MERGE,
                     "assumed: embedded 135M pool on 2 CPU cores; no stored timings for this pool and device")
    merges = d[d["role"] == "merged"]["merge_s"].dropna()
    rss = d["rss"].dropna()
    return Rates(
        seconds_per_doc=float(d["eval_s"].sum() / d["docs"].sum()),
        seconds_per_merge=float(merges.median()) if len(merges) else ASSUMED_SECONDS_PER_MERGE,
        basis=f"measured from {len(d)} stored unit(s) of pool {pool!r} on {_device_kind(device)}"
              + ("" if len(merges) else " (merge time assumed)"),
        units_measured=len(d),
        peak_rss_bytes=int(rss.max()) if len(rss) else None,
    )


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

    @property
    def seconds(self) -> float:
        """Unit-seconds of the work still to do (one unit at a time)."""
        return self.docs * self.rates.seconds_per_doc + self.merges * self.rates.seconds_per_merge

    def describe(self) -> str:
        t = _duration(self.seconds)
        return (f"{self.units - self.cached} of {self.units} unit(s) to run ({self.merges} merge(s), "
                f"{self.references} reference(s), {self.docs} documents): ~{t} one unit at a time "
                f"({self.rates.seconds_per_doc:.3g} s/document, {self.rates.seconds_per_merge:.3g} s/merge; "
                f"{self.rates.basis}). Local executor: ~{t}; Ray: ~{t} / k for k units running at once "
                "(cluster CPUs / --cpus-per-unit, or GPUs / --gpus-per-unit), plus start-up.")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def estimate(plans: Sequence[tuple[SweepPlan, str | os.PathLike]], rates: Rates) -> CostEstimate:
    """Cost of running each (plan, store) pair's pending jobs at ``rates``."""
    units = cached = merges = refs = docs = 0
    for sweep, results_dir in plans:
        todo = sweep.pending(results_dir)
        units += len(sweep.jobs)
        cached += len(sweep.jobs) - len(todo)
        merges += sum(j.method is not None for j in todo)
        refs += sum(j.method is None for j in todo)
        docs += sum(_docs(sweep, j) for j in todo)
    return CostEstimate(units, cached, merges, refs, docs, rates)


def unit_memory(sweep: SweepPlan, rates: Rates) -> int:
    """Bytes a unit should reserve: 1.25 x the largest measured merge peak RSS of the pool, else
    1 GiB + 3 x the base checkpoint (merged weights, the evaluated model and streamed inputs)."""
    if rates.peak_rss_bytes:
        return int(rates.peak_rss_bytes * 1.25)
    base = Path(sweep.plans[0].paths[sweep.pool.base.name])
    size = sum(f.stat().st_size for f in base.glob("*.safetensors")) if base.is_dir() else 0
    return GiB + 3 * size
