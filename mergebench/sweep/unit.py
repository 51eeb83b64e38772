"""The unit of work, as run by any executor: merge -> evaluate -> store, once.

:func:`run_job` is self-contained (it receives the plan, the unit and where to write) and
idempotent: it returns at once when the unit's rows are already stored, and it writes with
``store.write_unit(..., exclusive=True)``, whose file is named by the unit's content hash alone,
so a retried attempt, a duplicated task or a second sweep racing on the same unit can never store
its rows twice; and it computes a unit only under its :func:`mergebench.results.store.claim_unit`, so a
unit that another live process is computing is skipped (reported) instead of computed twice. It
runs in the driver (local executor) or in a Ray worker on any node.

On a node where the driver's model paths do not exist (another machine), :func:`node_plan`
resolves the pool there once per worker process: the embedded pool is materialized under a
node-wide file lock (so concurrent workers of a node build it once), other models must be in the
node's local cache, and every model's content identity must equal the driver's.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import socket
import time
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mergebench.results import metrics, store
from mergebench.evaluation import runner
from mergebench.evaluation.runner import EvalPlan, WorkUnit
from .plan import task_manager

__all__ = ["UnitOutcome", "node_plan", "run_job"]


@dataclass(frozen=True)
class UnitOutcome:
    """What a worker reports back: ``done`` (rows written by this call) or ``skipped`` (already
    stored, or ``note``: being computed by another process, which holds its claim)."""

    unit_id: str
    status: Literal["done", "skipped"]
    seconds: float
    host: str
    pid: int
    score: float | None = None
    note: str | None = None


_NODE_PATHS: dict[tuple, dict[str, str]] = {}


@contextmanager
def _node_lock():
    """An exclusive lock shared by every process of this machine (in the model cache folder)."""
    import fcntl

    from ..zoo.base import default_cache_dir

    root = default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".mergebench-node.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _node_paths(plan: EvalPlan) -> dict[str, str]:
    """This node's folders of the plan's models (materializing the embedded pool once per node)."""
    from mergebench.config.pools import validate_pool_compatibility

    key = (plan.pool.name, tuple(sorted(plan.identities.items())))
    if key not in _NODE_PATHS:
        with _node_lock():
            runner.ensure_zoo(plan.pool, log=lambda m: None)
        report = validate_pool_compatibility(plan.pool)
        ident = {n: runner.model_identity(plan.pool, n, fp) for n, fp in report.fingerprints.items()}
        differ = sorted(n for n in plan.identities if ident.get(n) != plan.identities[n])
        if differ:
            raise RuntimeError(
                f"node {socket.gethostname()}: model(s) {', '.join(differ)} of pool {plan.pool.name!r} differ from "
                "the driver's copies (content fingerprints); every node needs the same checkpoints"
            )
        _NODE_PATHS[key] = {n: str(p) for n, p in report.paths.items()}
    return _NODE_PATHS[key]


def node_plan(plan: EvalPlan) -> EvalPlan:
    """``plan`` with model paths valid on this node and a task manager for its split (cached per process)."""
    paths = plan.paths
    if not all(Path(p).exists() for p in paths.values()):
        paths = _node_paths(plan)
    tm = plan.task_manager if plan.task_manager is not None else task_manager(plan.profile)
    return dataclasses.replace(plan, paths=paths, task_manager=tm)


@functools.lru_cache(maxsize=4)
def _environment(device: str) -> tuple[tuple[str, Any], ...]:
    return tuple(store.collect_environment(device).items())  # git sha etc.: once per process


def run_job(
    plan: EvalPlan,
    wu: WorkUnit,
    provenance: Mapping[str, Any],
    *,
    results_dir: str,
    run_id: str,
    device: str = "cpu",
    env: Mapping[str, str] | None = None,
    threads: int | None = None,
) -> UnitOutcome:
    """Merge (for a merged unit), evaluate and store one unit unless it is stored already.

    ``env`` is applied to this process first (suites root, caches, offline flags: a worker started
    elsewhere does not inherit the driver's environment); ``threads`` caps torch's CPU threads at
    the CPUs the unit reserved.
    """
    t0 = time.perf_counter()
    if env:
        os.environ.update(env)
    host, pid = socket.gethostname(), os.getpid()
    uid = wu.unit.unit_id
    if store.has_unit(uid, results_dir):
        return UnitOutcome(uid, "skipped", time.perf_counter() - t0, host, pid)
    with store.claim_unit(uid, results_dir, run_id=run_id) as claim:  # no second process computes it meanwhile
        if not claim:
            return UnitOutcome(uid, "skipped", time.perf_counter() - t0, host, pid,
                               note=f"being computed by {claim.holder}")
        if store.has_unit(uid, results_dir):  # finished by another process since the check above
            return UnitOutcome(uid, "skipped", time.perf_counter() - t0, host, pid)
        frame, record, outcomes = _compute(plan, wu, provenance, device=device, threads=threads, host=host, pid=pid)
        res = store.write_unit(wu.unit, frame, run_id=run_id, results_dir=results_dir, provenance=record,
                               exclusive=True, samples=outcomes)
    score = runner.headline_score(frame, wu.tasks)
    return UnitOutcome(uid, "done" if res.written else "skipped", time.perf_counter() - t0, host, pid,
                       None if math.isnan(score) else float(score))


def _compute(plan: EvalPlan, wu: WorkUnit, provenance: Mapping[str, Any], *, device: str, threads: int | None,
             host: str, pid: int):
    """Merge and evaluate one unit: (rows frame, provenance record, per-document outcomes)."""
    import pandas as pd
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    plan = node_plan(plan)
    t0 = time.perf_counter()
    with torch.inference_mode():
        rows, prov, outcomes = runner.run_unit(plan, wu, device=device, batch_size=plan.profile.eval.batch_size,
                                      quiet=True)
    frame = metrics.add_normalized(pd.DataFrame(rows))
    prov["unit_wall_s"] = time.perf_counter() - t0  # what sweep estimates are calibrated on (mergebench.evaluation.pace)
    return frame, {**dict(_environment(device)), **prov, "host": host, "pid": pid, **dict(provenance)}, outcomes
