"""Executors: run a sweep's pending jobs in this process (``local``) or on a Ray cluster (``ray``).

Both call the same :func:`mergebench.sweep.unit.run_job`, which writes each unit's rows itself
(one atomic, content-named file per unit), so the two produce the same rows and a sweep
interrupted under either resumes under either. What differs is only where a job runs:

* :class:`LocalExecutor` runs jobs one after another in the driver (no extra dependency);
* :class:`RayExecutor` submits every job as a Ray task that declares its CPUs, GPUs and memory
  (so Ray packs as many units on a node as fit) and is retried after a worker or node dies
  (``max_retries``); an exception inside a unit is not retried (it would fail again) but
  reported, and the other units go on.
"""

from __future__ import annotations

import dataclasses
import os
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from mergebench.results import store
from ..errors import MergebenchError
from .estimate import measured_rates, unit_memory
from .plan import Job, SweepPlan
from .unit import UnitOutcome, run_job

__all__ = ["Executor", "LocalExecutor", "RayExecutor", "RayMissingError", "SweepError", "SweepStats", "UnitResources",
           "run_sweep"]

Report = Callable[[Job, "UnitOutcome | None", "str | None"], None]

#: Environment a worker needs from the driver: where suites, models and caches are, and offline flags.
FORWARDED_ENV = ("MERGEBENCH_SUITES", "MERGEBENCH_CACHE", "HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE")
WORKER_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}



class SweepError(MergebenchError, ValueError):
    """A sweep option that cannot work (executor, address, resources, methods)."""


class RayMissingError(MergebenchError, ImportError):
    """``--executor ray`` (or ``--workers`` > 1) without Ray installed."""

@dataclass(frozen=True)
class UnitResources:
    """What one unit reserves on a Ray node; memory in bytes, None = estimated from the pool
    (:func:`mergebench.sweep.estimate.unit_memory`)."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory: int | None = None

    def __post_init__(self):
        if self.num_cpus <= 0 or self.num_gpus < 0 or (self.memory is not None and self.memory <= 0):
            raise SweepError(f"unit resources must be positive: {self}")


class Executor(Protocol):
    name: str

    def run(self, sweep: SweepPlan, jobs: Sequence[Job], *, results_dir: Path, run_id: str, device: str,
            report: Report) -> None: ...


def _error(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()[-1]


class LocalExecutor:
    """One unit after another in this process (the default; no cluster needed)."""

    name = "local"

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def run(self, sweep: SweepPlan, jobs: Sequence[Job], *, results_dir: Path, run_id: str, device: str,
            report: Report) -> None:
        for job in jobs:
            try:
                outcome = run_job(sweep.plans[job.plan_index], job.unit, job.provenance, results_dir=str(results_dir),
                                  run_id=run_id, device=device)
            except Exception as exc:  # noqa: BLE001 - one broken unit must not stop the sweep
                report(job, None, _error(exc))
            else:
                report(job, outcome, None)


class RayExecutor:
    """Jobs as Ray tasks on the cluster at ``address`` (None: a Ray instance on this machine).

    Model files: the driver has materialized and checked the pool before submitting; a unit that
    lands on a node where those paths do not exist resolves the pool there, once per worker
    process and under a node-wide lock (:func:`mergebench.sweep.unit.node_plan`). Results: every
    worker writes its unit's file into ``results_dir``, which must be the same shared folder on
    every node (the driver's path).

    Used as a context manager, one Ray connection serves several runs (``--tune`` runs two) and a
    Ray instance it started is shut down on exit; outside one, each run connects and disconnects.
    """

    name = "ray"

    def __init__(self, address: str | None = None, *, resources: UnitResources | None = None, max_retries: int = 3,
                 num_cpus: int | None = None, log: Callable[[str], None] = lambda m: None):
        self.address = address
        self.resources = resources or UnitResources()
        self.max_retries = max_retries
        self.num_cpus = num_cpus  # only for a Ray instance started here
        self.log = log
        self._started = self._managed = False

    def _connect(self) -> bool:
        """Connect (or start a local instance) unless connected; True if this call connected."""
        try:
            import ray
        except ImportError:
            raise RayMissingError("the ray executor needs Ray: pip install 'mergebench[ray]'") from None
        if ray.is_initialized():
            return False
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # mergebench works offline
        kw = dict(address=self.address, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        if self.address is None and self.num_cpus is not None:
            kw["num_cpus"] = self.num_cpus
        ray.init(**kw)
        self._started = True
        return True

    def close(self) -> None:
        """Disconnect from Ray if this executor connected (a local instance it started stops)."""
        if self._started:
            import ray

            ray.shutdown()
            self._started = False

    def __enter__(self):
        self._connect()
        self._managed = True
        return self

    def __exit__(self, *exc) -> None:
        self._managed = False
        self.close()

    def run(self, sweep: SweepPlan, jobs: Sequence[Job], *, results_dir: Path, run_id: str, device: str,
            report: Report) -> None:
        res = self.resources
        if device.startswith("cuda") and res.num_gpus <= 0:
            raise SweepError("--device cuda on Ray needs --gpus-per-unit > 0 (Ray assigns each unit its GPUs)")
        import ray

        connected_here = self._connect()
        try:
            env = {**{k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}, **WORKER_ENV}
            opts = dict(num_cpus=res.num_cpus, num_gpus=res.num_gpus, max_retries=self.max_retries,
                        retry_exceptions=False, name="mergebench-unit")
            opts["memory"] = int(res.memory if res.memory is not None
                                 else unit_memory(sweep, measured_rates([results_dir], sweep.pool.name, device)))
            nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
            need = {"CPU": res.num_cpus, "GPU": res.num_gpus, "memory": opts["memory"]}
            self.log(f"Ray at {self.address or 'a local instance'}: {len(nodes)} node(s), "
                     f"{sum(n.get('CPU', 0) for n in nodes):g} CPU(s), {sum(n.get('GPU', 0) for n in nodes):g} GPU(s); "
                     f"each unit reserves {res.num_cpus:g} CPU(s), {res.num_gpus:g} GPU(s), "
                     f"{opts['memory'] / 2**30:.1f} GiB")
            if not any(all(n.get(k, 0) >= v for k, v in need.items() if v) for n in nodes):
                self.log("warning: no node has room for one unit; Ray waits for one (autoscaling). Otherwise stop "
                         "and lower --cpus-per-unit / --gpus-per-unit / --memory-per-unit")
            task = ray.remote(run_job).options(**opts)
            # one copy of each plan in the object store, shared by its units; the task manager
            # (lm-eval objects) is rebuilt once per worker process instead of being shipped
            plans = {i: ray.put(dataclasses.replace(sweep.plans[i], task_manager=None))
                     for i in sorted({j.plan_index for j in jobs})}
            ray_device = "cuda" if device.startswith("cuda") else device  # Ray sets CUDA_VISIBLE_DEVICES
            pending = {
                task.remote(plans[j.plan_index], j.unit, j.provenance, results_dir=str(results_dir), run_id=run_id,
                            device=ray_device, env=env, threads=max(1, int(res.num_cpus))): j
                for j in jobs
            }
            try:
                while pending:
                    # everything finished within the next second (not one at a time: O(pending) per call)
                    ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=1.0)
                    for ref in ready:
                        job = pending.pop(ref)
                        try:
                            outcome = ray.get(ref)
                        except Exception as exc:  # noqa: BLE001 - reported per unit
                            report(job, None, _error(getattr(exc, "cause", None) or exc))
                        else:
                            report(job, outcome, None)
                    if not ready:
                        report(None, None, None)  # refresh the ETA
            except BaseException:
                for ref in pending:
                    ray.cancel(ref, force=True)
                raise
        finally:
            if connected_here and not self._managed:
                self.close()



@dataclass
class SweepStats:
    """Counts of one sweep invocation; ``outcomes`` maps unit id -> done / skipped / failed."""

    run_id: str
    units: int
    cached: int
    done: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    outcomes: dict[str, str] = field(default_factory=dict)
    wall_s: float = 0.0


class _Progress:
    """rich progress: units done / failed / remaining, elapsed time and ETA."""

    def __init__(self, total: int, title: str, enabled: bool):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(),
                            TextColumn("{task.fields[done]} done · {task.fields[failed]} failed · "
                                       "{task.fields[remaining]} remaining"),
                            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), disable=not enabled)
        self.total = total
        self.task = self.bar.add_task(title, total=total, done=0, failed=0, remaining=total)

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def update(self, done: int, failed: int) -> None:
        self.bar.update(self.task, completed=done + failed, done=done, failed=failed,
                        remaining=self.total - done - failed)


def run_sweep(
    sweep: SweepPlan,
    results_dir: str | os.PathLike = store.DEFAULT_RESULTS_DIR,
    *,
    executor: Executor | None = None,
    device: str = "cpu",
    progress: bool = True,
    run_id: str | None = None,
    log: Callable[[str], None] = print,
) -> SweepStats:
    """Run every job of ``sweep`` whose unit is not in ``results_dir`` yet; a unit that fails is
    reported in ``SweepStats.failed`` and the others go on (rerun the sweep to retry it)."""
    executor = executor or LocalExecutor()
    results_dir = Path(results_dir).resolve()
    todo = sweep.pending(results_dir)
    stats = SweepStats(run_id or store.new_run_id(), units=len(sweep.jobs), cached=len(sweep.jobs) - len(todo))
    t0 = time.perf_counter()
    title = f"sweep on {sweep.suite}:{sweep.profile.name} ({sweep.split}, {executor.name})"
    with _Progress(len(todo), title, progress) as bar:

        def report(job: Job | None, outcome: UnitOutcome | None, error: str | None) -> None:
            if job is not None:
                if error is not None:
                    stats.failed[job.unit_id] = error
                    stats.outcomes[job.unit_id] = "failed"
                    log(f"FAILED {job.label}: {error}")
                else:
                    stats.outcomes[job.unit_id] = outcome.status
                    if outcome.status == "done":
                        stats.done += 1
                        score = "" if outcome.score is None else f"score {outcome.score:.4f}  "
                        log(f"{job.label:<48} {score}({outcome.seconds:.0f} s, {outcome.host})")
                    else:
                        stats.skipped += 1
                        if outcome.note:  # claimed by a concurrent run: it stores the unit
                            log(f"skipped {job.label}: {outcome.note}")
            bar.update(stats.done + stats.skipped, len(stats.failed))

        if todo:
            executor.run(sweep, todo, results_dir=results_dir, run_id=stats.run_id, device=device, report=report)
    stats.wall_s = time.perf_counter() - t0
    return stats
