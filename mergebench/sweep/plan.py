"""Sweep planning: methods x grid points x the suite's subsets -> a deduplicated list of jobs.

Every (method, grid point) is planned by :func:`mergebench.evaluation.runner.plan_eval`, the same code
``mergebench eval`` uses, so a sweep unit and an eval unit with the same settings have the same
content hash and share their stored rows. Before that (and before any model is touched), every
point of every method is validated for every merge size the profile uses; an error names the
method, the parameter and the offending value.

A :class:`Job` is one self-contained unit of work (a reference model, or one merged subset with one
parameter setting) plus the provenance the sweep records with it; references are shared by all
methods and points and appear once.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergebench.evaluation import runner
from mergebench.results import store
from ..methods import ParameterError, get_method
from mergebench.config.pools import Pool, load_pool
from mergebench.evaluation.runner import EvalPlan, WorkUnit, plan_eval
from mergebench.config.suites import Profile, SuiteError, load_suite
from .grid import Point

__all__ = ["Job", "SweepPlan", "plan_sweep", "validate_points", "with_split"]


@dataclass(frozen=True)
class Job:
    """One unit of work of a sweep: ``unit`` planned in ``SweepPlan.plans[plan_index]``."""

    plan_index: int
    unit: WorkUnit
    method: str | None  # None for a reference (base / expert)
    point: Point
    provenance: Mapping[str, Any] = field(default_factory=dict)

    @property
    def unit_id(self) -> str:
        return self.unit.unit.unit_id

    @property
    def label(self) -> str:
        if self.method is None:
            return f"{self.unit.role} {self.unit.label}"
        pt = ",".join(f"{k}={v}" for k, v in self.point.items())
        return f"{self.method}{'[' + pt + ']' if pt else ''} {self.unit.label}"


@dataclass
class SweepPlan:
    """Everything a sweep will run, validated; nothing loaded or evaluated yet."""

    suite: str
    profile: Profile
    pool: Pool
    split: str
    points: dict[str, list[Point]]
    plans: list[EvalPlan]
    keys: list[tuple[str, Point]]  # (method, point) of each plan
    jobs: list[Job]
    notes: list[str] = field(default_factory=list)

    def pending(self, results_dir: str | Path) -> list[Job]:
        done = store.completed_units(results_dir)
        return [j for j in self.jobs if j.unit_id not in done]

    def plans_of(self, method: str) -> list[tuple[Point, EvalPlan]]:
        return [(pt, p) for (m, pt), p in zip(self.keys, self.plans) if m == method]

    @property
    def merges(self) -> list[Job]:
        return [j for j in self.jobs if j.method is not None]


def resolve_setup(suite: str, pool: str | None, profile: str | None, quick: bool, values):
    """(suite, profile, pool) objects a sweep or its tuning phase runs on: the profile's first pool by default."""
    suite_obj = load_suite(suite)
    prof = suite_obj.profile("quick" if quick and profile is None else profile, pool=pool)
    return suite_obj, prof, load_pool(pool or prof.pools[0], values)


def validate_points(
    suite: str,
    points: Mapping[str, Sequence[Point]],
    *,
    pool: str | None = None,
    profile: str | None = None,
    params: Mapping[str, Any] | None = None,
    values: Mapping[str, Any] | None = None,
    quick: bool = False,
) -> dict[str, list[Point]]:
    """Check every point of every method for every merge size of the profile (no model is read).

    ``params`` are fixed settings, each applied to the methods that have that parameter. Returns
    the points with duplicates removed: two points that validate to the same parameters for every
    size (``0.5`` and ``0.50``) are one unit of work.
    """
    suite_obj, prof, pool_obj = resolve_setup(suite, pool, profile, quick, values)
    subsets = prof.subsets(pool_obj)
    specs = {m: get_method(m) for m in points}
    fixed = dict(params or {})
    unknown = [k for k in fixed if not any(k in s.param_names for s in specs.values())]
    if unknown:
        raise ParameterError(f"--set {', '.join(map(repr, unknown))} is a parameter of none of the methods "
                             f"{', '.join(specs)}")
    out: dict[str, list[Point]] = {}
    for name, spec in specs.items():
        sizes = sorted({len(s.members) + runner.base_as_expert(spec, s) for s in subsets})
        own_fixed = {k: v for k, v in fixed.items() if k in spec.param_names}
        seen: set[str] = set()
        out[name] = []
        for point in points[name]:
            given = {**suite_obj.method_params(name, prof), **own_fixed, **point}
            signature = []
            for n in sizes:
                spec.contract.check(spec.name, has_base=True, n_experts=n)
                try:
                    signature.append(spec.validate_params(given, n_experts=n))
                except ParameterError as exc:
                    where = f" (grid point {', '.join(f'{k}={v}' for k, v in point.items())})" if point else ""
                    raise ParameterError(f"{exc}{where}") from None
            key = store.canonical_json(signature)
            if key not in seen:
                seen.add(key)
                out[name].append(dict(point))
    return out


_TASK_MANAGERS: dict[tuple, Any] = {}


def task_manager(profile: Profile):
    """The lm-eval task manager of ``profile``'s tasks and split, built once per process."""
    key = (os.environ.get("MERGEBENCH_SUITES"), profile.docs.split, tuple(t.name for t in profile.tasks))
    if key not in _TASK_MANAGERS:
        _TASK_MANAGERS[key] = runner.task_manager_for(profile)
    return _TASK_MANAGERS[key]


def with_split(plan: EvalPlan, split: str) -> EvalPlan:
    """``plan`` evaluated on another split of the embedded tasks (tuning uses ``validation``).

    Documents are drawn afresh for that split (the seeded sampler keys on the split), and the split
    is part of every unit's key, so validation rows can never be taken for test rows.
    """
    if split == plan.profile.docs.split:
        return plan
    if not runner.is_embedded(plan.profile.tasks):
        raise SuiteError(
            f"profile {plan.profile.name!r} evaluates hub tasks, whose splits mergebench does not choose; "
            "tuning on a validation split needs the embedded tasks"
        )
    prof = plan.profile.model_copy(update={"docs": plan.profile.docs.model_copy(update={"split": split})})
    tm = task_manager(prof)
    samples = runner.doc_samples(prof, tm)
    doc_hash = store.doc_index_hash(samples)

    def move(wu: WorkUnit) -> WorkUnit:
        unit = dataclasses.replace(wu.unit, doc_index_hash=doc_hash, extra={**wu.unit.extra, "split": split})
        return WorkUnit(unit, wu.label, wu.members, wu.tasks)

    return dataclasses.replace(plan, profile=prof, samples=samples, doc_hash=doc_hash, task_manager=tm,
                               references=[move(u) for u in plan.references], merges=[move(u) for u in plan.merges])


def plan_sweep(
    suite: str,
    points: Mapping[str, Sequence[Point]],
    *,
    pool: str | None = None,
    profile: str | None = None,
    params: Mapping[str, Any] | None = None,
    values: Mapping[str, Any] | None = None,
    seed: int | None = None,
    quick: bool = False,
    split: str | None = None,
    references: bool = True,
    materialize: bool = True,
    provenance: Mapping[str, Any] | Callable[[str, Point], Mapping[str, Any]] | None = None,
    log: Callable[[str], None] = print,
) -> SweepPlan:
    """Plan methods x points x subsets (plus the shared references unless ``references=False``).

    ``points`` maps each method to its parameter points (:func:`mergebench.sweep.grid.expand_grid`);
    ``split`` evaluates another split than the profile's (embedded tasks only). ``provenance`` is
    recorded with each merged unit (a mapping, or a function of method and point).
    """
    points = validate_points(suite, points, pool=pool, profile=profile, params=params, values=values, quick=quick)
    fixed = dict(params or {})
    plans: list[EvalPlan] = []
    keys: list[tuple[str, Point]] = []
    for method, pts in points.items():
        spec = get_method(method)
        own_fixed = {k: v for k, v in fixed.items() if k in spec.param_names}
        for point in pts:
            plan = plan_eval(method, suite, pool=pool, profile=profile, params={**own_fixed, **point}, seed=seed,
                             quick=quick, values=values, materialize=materialize, log=log)
            plans.append(plan if split is None else with_split(plan, split))
            keys.append((method, dict(point)))
    if not plans:
        raise ParameterError("a sweep needs at least one method")
    first = plans[0]
    use_split = first.profile.docs.split
    jobs: list[Job] = []
    seen: set[str] = set()
    base_prov = {"sweep": {"split": use_split}}
    if references:
        for wu in first.references:
            jobs.append(Job(0, wu, None, {}, base_prov))
            seen.add(wu.unit.unit_id)
    for i, ((method, point), plan) in enumerate(zip(keys, plans)):
        extra = provenance(method, point) if callable(provenance) else dict(provenance or {})
        prov = {"sweep": {"split": use_split, "grid_point": dict(point)}, **extra}
        for wu in plan.merges:
            if wu.unit.unit_id not in seen:
                seen.add(wu.unit.unit_id)
                jobs.append(Job(i, wu, method, dict(point), prov))
    return SweepPlan(suite=first.suite.name, profile=first.profile, pool=first.pool, split=use_split, points=points,
                     plans=plans, keys=keys, jobs=jobs, notes=list(first.notes))
