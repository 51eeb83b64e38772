"""`mergebench eval`: merge every subset of a suite with one method and score it.

The flow (nothing expensive before everything cheap has been checked):

1. resolve suite, profile, pool and method; validate the method's parameters for every
   merge size; check that every model is on this machine and the pool is mergeable (headers);
2. plan units of work: one per reference model (base, each expert) and one per merged
   subset, each keyed by content (:class:`mergebench.results.store.Unit`), so an interrupted run
   resumes where it stopped and a reference evaluated once is reused by every method;
3. run the units not yet in the store: merge in memory with the engine, evaluate the
   in-memory model with lm-eval on seeded document indices, write the rows atomically;
4. summarize from the stored rows (:mod:`mergebench.results.metrics`).
"""

from __future__ import annotations

import contextlib

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergebench.results import metrics, store
from mergebench.methods import MethodSpec, ParameterError, get_method
from mergebench.config.pools import Pool, load_pool, validate_pool_compatibility
from mergebench.config.sampling import DocSample, Subset, samples_argument
from mergebench.config.suites import Profile, Suite, TaskSpec, load_suite
from mergebench.evaluation.per_task import task_assignment, unit_calibration, unit_identity

# Besides the command's own entry points, the pieces a sweep (mergebench.sweep) reuses to plan and
# run the very same units: public, so no other room reaches into this module's private names.
__all__ = ["EvalPlan", "WorkUnit", "backfill_task_vector_norms", "base_as_expert", "doc_samples", "ensure_zoo",
           "expected_seconds", "headline_score", "is_embedded", "load_model", "merged_models", "model_identity", "plan_eval", "run_eval", "run_unit",
           "summarize", "task_manager_for", "untimed_calibration_seconds"]


@dataclass
class WorkUnit:
    """One model to evaluate: a reference (base / one expert) or a merge of ``subset``."""

    unit: store.Unit
    label: str
    members: tuple[str, ...]
    tasks: list[TaskSpec]

    @property
    def role(self) -> str:
        return self.unit.role


@dataclass
class EvalPlan:
    suite: Suite
    profile: Profile
    pool: Pool
    method: MethodSpec
    params: dict[str, Any]
    seed: int
    paths: dict[str, str]
    identities: dict[str, str]
    samples: dict[str, list[int]]
    doc_hash: str
    task_manager: Any
    references: list[WorkUnit] = field(default_factory=list)
    merges: list[WorkUnit] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    task_leaves: dict[str, list[str]] = field(default_factory=dict)  # suite task -> lm-eval tasks sampled
    batteries: dict[tuple[str, ...], Any] = field(default_factory=dict, repr=False)

    def battery(self, tasks: list[TaskSpec]):
        """The :class:`mergebench.evaluation.battery.Battery` of ``tasks``: built for the first unit that
        scores them, then reused by every model of the run (references and merges alike)."""
        key = tuple(t.name for t in tasks)
        if key not in self.batteries:
            from mergebench.evaluation.battery import Battery

            self.batteries[key] = Battery(
                list(key), self.task_manager, samples=self.samples,
                fewshot={t.name: t.fewshot for t in tasks if t.fewshot},
            )
        return self.batteries[key]

    def n_docs(self, tasks: list[TaskSpec]) -> int:
        """Documents scored for ``tasks`` (a group task counts the sampled documents of its leaves)."""
        return sum(len(self.samples.get(leaf, [])) for t in tasks for leaf in self.task_leaves.get(t.name, [t.name]))

    @property
    def units(self) -> list[WorkUnit]:
        return self.references + self.merges

    def pending(self, results_dir: Path) -> list[WorkUnit]:
        done = store.completed_units(results_dir)
        return [u for u in self.units if u.unit.unit_id not in done]


def is_embedded(tasks: list[TaskSpec]) -> bool:
    return all(t.name.startswith("mb_") for t in tasks)


def task_manager_for(profile: Profile):
    """Embedded tasks read their data from suites/ (offline); others come from lm-eval."""
    from mergebench.zoo import tasks as embedded

    if is_embedded(profile.tasks):
        return embedded.task_manager(profile.docs.split)
    from lm_eval.tasks import TaskManager

    groups = embedded.embedded_dir().parent / "lm_eval"  # groups the suites define over lm-eval tasks
    return TaskManager(include_path=[str(embedded.yaml_dir(profile.docs.split)), str(groups)])


def _task_leaves(profile: Profile, tm) -> dict[str, dict[str, int]]:
    """Per suite task, the number of documents of each lm-eval task it scores: the task itself, or
    every leaf of a group (lm-eval looks ``samples=`` up by leaf task name, never by group)."""
    if is_embedded(profile.tasks):
        from mergebench.zoo.tasks import task_info

        info = task_info()
        return {t.name: {t.name: info[t.name]["counts"][profile.docs.split]} for t in profile.tasks}
    out = {}
    for t in profile.tasks:
        loaded = tm.load([t.name])
        group = loaded["groups"].get(t.name)
        if t.name not in loaded["tasks"] and group is None:
            raise ParameterError(
                f"task {t.name!r} is a tag of {', '.join(sorted(loaded['tasks']))}, not a group: lm-eval reports "
                "no score under that name; list those tasks instead, or a group that aggregates them"
            )
        if group is not None and not group.has_aggregation:
            raise ParameterError(
                f"group {t.name!r} has no aggregate_metric_list, so lm-eval reports no score for it; list its "
                "subtasks instead"
            )
        out[t.name] = {leaf: len(task.eval_docs) for leaf, task in loaded["tasks"].items()}
    return out


def _doc_counts(profile: Profile, tm) -> dict[str, int]:
    """Number of evaluation documents per lm-eval task to sample: each plain suite task and each
    leaf of a group task (a group itself has no entry: its documents are drawn per leaf)."""
    return {leaf: n for leaves in _task_leaves(profile, tm).values() for leaf, n in leaves.items()}


def doc_samples(profile: Profile, tm, leaves: dict[str, dict[str, int]] | None = None) -> dict[str, list[int]]:
    """``samples=`` for lm-eval: seeded indices per plain task and per leaf of a group task.

    A document budget applies to each leaf on its own (lm-eval's ``limit`` does the same), and a
    leaf's indices are those it would get as a plain task. A leaf scored by two suite tasks must
    get the same documents from both.
    """
    chosen: dict[str, tuple[str, DocSample]] = {}
    for t, by_leaf in (leaves if leaves is not None else _task_leaves(profile, tm)).items():
        for leaf, n in by_leaf.items():
            sample = profile.doc_sample(t, n, subtask=leaf)
            owner, prev = chosen.setdefault(leaf, (t, sample))
            if prev.indices != sample.indices:
                raise ParameterError(
                    f"task {leaf!r} is scored by both {owner!r} and {t!r} with different document budgets; "
                    "give them the same budget"
                )
    return samples_argument(s for _, s in chosen.values())


def model_identity(pool: Pool, name: str, fingerprint: str) -> str:
    """What a model *is*, for cache keys: zoo models by their committed adapter sha256s (stable
    across machines), everything else by the checkpoint's content fingerprint."""
    ref = pool.base if name == pool.base.name else pool.expert(name)
    if ref.source == "zoo":
        from mergebench.zoo import pool as zoo_pool

        entry = zoo_pool.committed_entry(ref.zoo)
        return "zoo:" + hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()[:20]
    return fingerprint


def ensure_zoo(pool: Pool, log: Callable[[str], None]) -> None:
    missing = [m.zoo for m in [pool.base, *pool.experts] if m.source == "zoo" and m.locate() is None]
    if missing:
        from mergebench.zoo import pool as zoo_pool

        log("materializing the embedded pool (once per machine) ...")
        zoo_pool.materialize_members(missing, log=log)


def plan_eval(
    method: str,
    suite: str,
    *,
    pool: str | None = None,
    profile: str | None = None,
    params: Mapping[str, Any] | None = None,
    seed: int | None = None,
    quick: bool = False,
    values: Mapping[str, Any] | None = None,
    materialize: bool = True,
    log: Callable[[str], None] = print,
) -> EvalPlan:
    """Everything a run will do, validated; no model is loaded and no tensor is read."""
    import lm_eval

    suite_obj = load_suite(suite)
    prof = suite_obj.profile("quick" if quick and profile is None else profile, pool=pool)
    pool_obj = load_pool(pool or prof.pools[0], values)
    spec = get_method(method)
    given = {**suite_obj.method_params(method, prof), **(params or {})}
    subsets = prof.subsets(pool_obj)

    def n_merged(s) -> int:  # the models the kernel receives (the base too where it counts as an expert)
        return len(s.members) + (1 if base_as_expert(spec, s) else 0)

    cap = spec.contract.max_experts
    if cap is not None:  # a two-model method (SLERP) on a profile that also merges all at once
        kept = [s for s in subsets if n_merged(s) <= cap]
        if kept and len(kept) < len(subsets):
            big = sorted({n_merged(s) for s in subsets} - {n_merged(s) for s in kept})
            log(f"{spec.name} merges at most {cap} experts: the profile's {len(subsets) - len(kept)} subset(s) of "
                f"n = {', '.join(map(str, big))} are skipped")
            subsets = kept
    for n in sorted({n_merged(s) for s in subsets}):
        spec.contract.check(spec.name, has_base=True, n_experts=n)
        spec.validate_params(given, n_experts=n)
    from mergebench.config.suites import check_task_metrics

    tm = task_manager_for(prof)
    check_task_metrics(suite_obj, prof, tm)  # an unknown task or metric fails before any model is touched
    if materialize:
        ensure_zoo(pool_obj, log)
    report = validate_pool_compatibility(pool_obj, values=values)
    run_seed = prof.sampler.seed if seed is None else seed
    leaves = _task_leaves(prof, tm)
    samples = doc_samples(prof, tm, leaves)
    doc_hash = store.doc_index_hash(samples)
    identities = {name: model_identity(pool_obj, name, fp) for name, fp in report.fingerprints.items()}
    common = dict(
        suite=suite_obj.name, suite_version=str(suite_obj.version), profile=prof.name, pool=pool_obj.name,
        base_model=pool_obj.base.spec, doc_index_hash=doc_hash,
    )
    lm_eval_version = getattr(lm_eval, "__version__", None) or store.package_version("lm_eval")

    def task_key(tasks: list[TaskSpec]) -> list:
        return [t.model_dump(exclude={"note"}) for t in tasks]

    plan = EvalPlan(
        suite=suite_obj, profile=prof, pool=pool_obj, method=spec, params=dict(given), seed=run_seed,
        paths=report.paths, identities=identities, samples=samples, doc_hash=doc_hash, task_manager=tm,
        task_leaves={t: list(by_leaf) for t, by_leaf in leaves.items()},
        notes=list(report.notes),
    )
    refs = [("base", None)] if prof.references.base else []
    refs += [(e, e) for e in prof.experts(pool_obj)] if prof.references.experts else []
    for name, expert in refs:
        tasks = prof.reference_tasks(pool_obj, expert)
        if not tasks:
            continue
        model = pool_obj.base.name if expert is None else expert
        unit = store.Unit(
            role="base" if expert is None else "expert", subset=(model,),
            extra={"model": identities[model], "tasks": task_key(tasks), "lm_eval": lm_eval_version,
                   "dtype": prof.eval.dtype},
            **common,
        )
        plan.references.append(WorkUnit(unit, name, (model,), tasks))
    for s in subsets:
        tasks = prof.tasks_for(s, pool_obj)
        # the Fisher–Rao merging paper counts the base among the m merged models: keep it in the stored subset too
        members = ((pool_obj.base.name,) if s.base_counted else ()) + tuple(s.members)
        unit = store.Unit(
            role="merged", subset=members, method=spec.name, method_version=spec.version,
            params=spec.validate_params(given, n_experts=n_merged(s)), seed=run_seed,
            extra={"models": [identities[m] for m in s.members], "base": identities[pool_obj.base.name],
                   "tasks": task_key(tasks), "lm_eval": lm_eval_version, "dtype": prof.eval.dtype,
                   "base_counted": s.base_counted,
                   **unit_identity(spec, spec.validate_params(given, n_experts=n_merged(s)))},
            **common,
        )
        label = s.label or f"n={s.size} #{s.index}"
        plan.merges.append(WorkUnit(unit, label, s.members, tasks))
    return plan


def base_as_expert(spec: MethodSpec, subset: Subset) -> bool:
    """The Fisher–Rao merging paper counts the base as one of the m merged models; a method that takes no base
    input then gets it as one more expert."""
    return subset.base_counted and spec.contract.base == "unused"


def _rows(scores, tasks: list[TaskSpec]) -> list[dict]:
    wanted = {t.name for t in tasks}
    return [
        {"task": s.task, "metric": s.metric, "value": s.value,
         "stderr": None if s.stderr != s.stderr else s.stderr, "n_docs": s.n_docs}
        for s in scores if s.task in wanted
    ]


def load_model(path: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    return model, AutoTokenizer.from_pretrained(path)


def merged_models(plan: EvalPlan, wu: WorkUnit) -> list[str]:
    """Pool names of the models the engine merges as experts, in order (the base first when counted)."""
    models = list(wu.members)
    if wu.unit.extra.get("base_counted") and plan.method.contract.base == "unused":
        models = [plan.pool.base.name, *models]
    return models


def _merge_unit(plan: EvalPlan, wu: WorkUnit, device: str, task: int | None = None):
    """The merged model of a ``merged`` work unit, in memory (a MergeResult with ``state_dict``);
    ``task``: which task's model of a per-task method (None: its unified model). Data-dependent
    methods get their validation-split calibration texts (mergebench.evaluation.per_task)."""
    from mergebench.engine import merge
    from mergebench.engine.request import MergeRequest

    base_path = plan.paths[plan.pool.base.name]
    models = merged_models(plan, wu)
    params = dict(wu.unit.params) if task is None else {**wu.unit.params, "task": task}
    request = MergeRequest(
        method=plan.method.name, base=base_path, experts=[plan.paths[m] for m in models], params=params,
        seed=plan.seed, device=device, dtype="float32", out_dtype=plan.profile.eval.dtype,
    )
    calibration = unit_calibration(plan.profile, plan.pool, plan.method, models, params)
    return merge(request, None, progress=False, calibration=calibration)


def _norm(plan: EvalPlan, wu: WorkUnit, merged=None) -> float:
    """``task_vector_norm`` of a unit's model: 0 for the base, the expert's or the merge's."""
    from mergebench.diagnostics import task_vector_norm

    if wu.role == "base":
        return 0.0
    model = merged.state_dict if wu.role == "merged" else plan.paths[wu.members[0]]
    return task_vector_norm(plan.paths[plan.pool.base.name], model)


def run_unit(plan: EvalPlan, wu: WorkUnit, *, device: str, batch_size, quiet: bool = False,
              scorer: str = "shared") -> tuple[list[dict], dict, list[dict]]:
    """Merge (or load) one unit's model and score it: (result rows, provenance, per-document outcomes)."""
    from mergebench.evaluation.battery import quiet_progress_bars

    with quiet_progress_bars() if quiet else contextlib.nullcontext():
        return _score_unit(plan, wu, device=device, batch_size=batch_size, quiet=quiet, scorer=scorer)


def _score_unit(plan: EvalPlan, wu: WorkUnit, *, device: str, batch_size, quiet: bool, scorer: str = "shared"):
    import torch

    from mergebench.engine import load_merged_model

    prov: dict[str, Any] = {}
    prof = plan.profile
    if wu.role == "merged" and plan.method.outputs == "per_task":
        return _score_per_task(plan, wu, device=device, batch_size=batch_size, quiet=quiet, scorer=scorer)
    if wu.role == "merged":
        with store.measure("merge", prov, device):
            result = _merge_unit(plan, wu, device)
        prov["task_vector_norm"] = _norm(plan, wu, result)
        if result.calibration is not None:
            prov["calibration"] = result.calibration
            prov["calibration_s"] = result.timings.get("calibration_s")
        model, tok = load_merged_model(result, plan.paths[plan.pool.base.name])
        del result
    else:
        prov["task_vector_norm"] = _norm(plan, wu)
        model, tok = load_model(plan.paths[wu.members[0]], prof.eval.dtype)
    _check_finite(model, plan.paths[wu.members[0]] if wu.role != "merged" else f"the {plan.method.name} merge "
                  f"of {', '.join(wu.members)}")
    model.to(device)
    battery = plan.battery(wu.tasks)  # built once per run: only the forward passes are per model
    with store.measure("eval", prov, device):
        scores, stats = battery.score(model, tok, batch_size=batch_size, device=device, quiet=quiet, scorer=scorer)
    docs = plan.n_docs(wu.tasks)
    prov.update(
        eval_docs=docs, eval_requests=stats.get("requests_total"), eval_tokens=stats.get("tokens_fed"),
        eval_docs_per_s=docs / prov["eval_wall_s"] if prov["eval_wall_s"] > 0 else None, scorer=scorer,
        threads=torch.get_num_threads(),
    )
    return _rows(scores, wu.tasks), prov, battery.outcomes


def _score_per_task(plan: EvalPlan, wu: WorkUnit, *, device: str, batch_size, quiet: bool, scorer: str):
    """A per-task method (EMR-Merging): each task scored with its own task's model, one model in
    memory at a time; provenance records which model scored which task (``per_task``)."""
    import torch

    from mergebench.engine import load_merged_model

    models = merged_models(plan, wu)
    rows: list[dict] = []
    outcomes: list[dict] = []
    norms: list[float] = []
    prov: dict[str, Any] = {"per_task": {}, "merge_wall_s": 0.0, "eval_wall_s": 0.0}
    for task, tasks in task_assignment(plan.profile, plan.pool, models, wu.tasks):
        part: dict[str, Any] = {}
        with store.measure("merge", part, device):
            result = _merge_unit(plan, wu, device, task)
        norms.append(_norm(plan, wu, result))
        model, tok = load_merged_model(result, plan.paths[plan.pool.base.name])
        del result
        _check_finite(model, f"the {plan.method.name} merge of {', '.join(wu.members)} (task {task})")
        model.to(device)
        battery = plan.battery(tasks)
        with store.measure("eval", part, device):
            scores, stats = battery.score(model, tok, batch_size=batch_size, device=device, quiet=quiet, scorer=scorer)
        del model
        rows += _rows(scores, tasks)
        outcomes += battery.outcomes
        prov["merge_wall_s"] += part["merge_wall_s"]
        prov["eval_wall_s"] += part["eval_wall_s"]
        prov["merge_peak_rss_bytes"] = max(prov.get("merge_peak_rss_bytes") or 0, part.get("merge_peak_rss_bytes") or 0)
        for t in tasks:
            prov["per_task"][t.name] = None if task is None else models[task]
    docs = plan.n_docs(wu.tasks)
    prov.update(eval_docs=docs, eval_docs_per_s=docs / prov["eval_wall_s"] if prov["eval_wall_s"] > 0 else None,
                scorer=scorer, threads=torch.get_num_threads(),
                task_vector_norm=sum(norms) / len(norms), task_vector_norms=norms)  # the mean over the task models
    return rows, prov, outcomes


def _check_finite(model, what: str) -> None:
    """An evaluated model with NaN/inf weights scores chance silently: refuse it, naming the tensor."""
    from mergebench.engine import NonFiniteInputError, all_finite

    for name, t in model.state_dict().items():
        if not all_finite(t):
            raise NonFiniteInputError(f"{what}: tensor {name!r} holds NaN/inf values; it would be scored at chance "
                                      "without a warning (fix or rebuild the checkpoint)")


def run_eval(
    plan: EvalPlan,
    results_dir: str | Path = store.DEFAULT_RESULTS_DIR,
    *,
    device: str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] = print,
    threads: int | None = None,
    scorer: str = "shared",
) -> dict[str, Any]:
    """Run every unit of ``plan`` not yet in ``results_dir``; returns counts and the run id.

    ``threads``: torch's CPU threads (default :func:`mergebench.threads.resolve_threads`).
    Each finished unit logs one line with its score, time and the run's ETA (from
    :class:`mergebench.evaluation.pace.Pace`: this machine's stored rates, then this run's own), so the
    progress reads the same in a terminal and in a log file."""
    import pandas as pd
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from mergebench.evaluation.pace import Pace, format_duration, measured_rates
    from mergebench.threads import apply_threads, resolve_threads

    results_dir = Path(results_dir)
    store.check_results_dir(results_dir)  # a file, or a folder under one: before any unit is computed
    apply_threads(resolve_threads(threads))
    run_id = store.new_run_id()
    env = store.collect_environment(device)
    todo = plan.pending(results_dir)
    batch_size = plan.profile.eval.batch_size
    stats = {"run_id": run_id, "units": len(plan.units), "cached": len(plan.units) - len(todo), "done": 0}
    pace = Pace(measured_rates([results_dir], plan.pool.name, device, scorer=scorer))

    def eta(units) -> str:
        return format_duration(expected_seconds(plan, units, pace))

    expected = eta(todo)  # once: an untimed calibration's estimate reads every merge's texts
    if todo:
        log(f"{len(todo)} unit(s) to run, {stats['cached']} stored; expected ~{expected} "
            f"({pace.prior.basis})")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA {task.fields[eta]}"))
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task(f"{plan.method.name} on {plan.suite.id}:{plan.profile.name}", total=len(todo),
                            eta=expected)
        for k, wu in enumerate(todo, 1):
            bar.update(task, description=f"{'merging + ' if wu.role == 'merged' else ''}scoring {wu.label}")
            t0 = time.perf_counter()
            # a concurrent eval or sweep on the same store computes each unit once: claim it first
            with store.claim_unit(wu.unit, results_dir, run_id=run_id) as claim:
                if not claim or store.has_unit(wu.unit, results_dir):
                    stats["cached"] += 1
                    log(f"[{k}/{len(todo)}] skipped {wu.label}: "
                        + (f"being computed by {claim.holder}" if not claim else "stored meanwhile by another run"))
                    bar.update(task, advance=1)
                    continue
                with torch.inference_mode():
                    rows, prov, outcomes = run_unit(plan, wu, device=device, batch_size=batch_size, quiet=progress,
                                                     scorer=scorer)
                rows = metrics.add_normalized(pd.DataFrame(rows))
                prov["unit_wall_s"] = time.perf_counter() - t0
                store.write_unit(wu.unit, rows, run_id=run_id, results_dir=results_dir, provenance={**env, **prov},
                                 samples=outcomes)
            pace.observe(prov["eval_docs"], prov["eval_wall_s"], prov["unit_wall_s"], prov.get("merge_wall_s"),
                         wu.unit.method, len(wu.members))
            stats["done"] += 1
            head = headline_score(rows, wu.tasks)
            left = eta(todo[k:]) if k < len(todo) else "done"
            log(f"[{k}/{len(todo)}] {wu.role:>6} {wu.label:<10} {_members(wu.members, 44):<44} score {head:.4f}  "
                f"{prov['unit_wall_s']:.0f} s ({prov['eval_docs_per_s']:.1f} doc/s)  ETA {left}")
            bar.update(task, advance=1, eta=left)
    return stats


def expected_seconds(plan: EvalPlan, units: list[WorkUnit], pace, calibration_s: float | None = None) -> float:
    """Seconds ``units`` of ``plan`` should take at ``pace`` (a :class:`mergebench.evaluation.pace.Pace`):
    their documents, their merges (per method and size), the per-unit overhead and, for a
    data-dependent method nothing has timed yet, its calibration at the assumed rates
    (``calibration_s``: that part, when the caller has computed it)."""
    if calibration_s is None:
        calibration_s = untimed_calibration_seconds(plan, units, pace)
    return sum(pace.unit_seconds(plan.n_docs(u.tasks), u.role == "merged", u.unit.method, len(u.members))
               for u in units) + calibration_s


def untimed_calibration_seconds(plan: EvalPlan, units: list[WorkUnit], pace, data: list | None = None) -> float:
    """Assumed calibration seconds of the merged ``units`` when neither the store nor this run has
    timed a merge of the plan's (data-dependent) method; 0 once one has (a merge's measured time
    includes its calibration). ``data``: the merged units' calibration texts, in order, when the
    caller has read them (:func:`mergebench.evaluation.per_task.unit_calibration`)."""
    from mergebench.engine.calibration import calibration_cost
    from mergebench.evaluation.pace import calibration_seconds
    from mergebench.evaluation.per_task import unit_calibration
    from mergebench.methods.calibration import calibration_of

    need = calibration_of(plan.method)
    if need is None or pace.timed(plan.method.name):
        return 0.0
    merged = [u for u in units if u.role == "merged"]
    if data is None:
        data = [unit_calibration(plan.profile, plan.pool, plan.method, merged_models(plan, u), u.unit.params)
                for u in merged]
    return sum(calibration_seconds(calibration_cost(need, u.unit.params, len(d.groups), [len(g) for g in d.groups])["passes"])
               for u, d in zip(merged, data))


def _members(members: tuple[str, ...], width: int) -> str:
    text = ", ".join(members)
    return text if len(text) <= width else text[: width - 1] + "…"


def backfill_task_vector_norms(plan: EvalPlan, results_dir: str | Path = store.DEFAULT_RESULTS_DIR, *,
                               device: str = "cpu", log: Callable[[str], None] = print) -> int:
    """Record ``task_vector_norm`` in the provenance of the plan's stored units that lack it
    (units evaluated before mergebench measured it). Merges are recomputed, nothing is
    re-evaluated; returns the number of units updated."""
    import torch

    done = store.completed_units(results_dir)
    updated = 0
    for wu in plan.units:
        if wu.unit.unit_id not in done:
            continue
        records = store.read_unit_provenance(wu.unit, results_dir)
        if not records or all(r.get("task_vector_norm") is not None for r in records):
            continue
        with torch.inference_mode():
            value = _norm(plan, wu, _merge_unit(plan, wu, device) if wu.role == "merged" else None)
        store.update_provenance(wu.unit, {"task_vector_norm": value}, results_dir)
        log(f"{wu.role:>6} {wu.label:<14} task-vector norm {value:.4f}")
        updated += 1
    return updated


def headline_score(rows, tasks: list[TaskSpec]) -> float:
    metric = {t.name: t.metric for t in tasks}
    vals = [r["value"] for r in rows.to_dict("records") if metric.get(r["task"]) == r["metric"]]
    return sum(vals) / len(vals) if vals else float("nan")


def summarize(plan: EvalPlan, results_dir: str | Path = store.DEFAULT_RESULTS_DIR):
    """Per merge size: mean ± std score, P(merged > base), gains vs base and vs the best expert
    (in-the-wild merging study, Tables 1-3), from the stored rows of this plan's units; plus the merging loss
    (merging-collapse study, eq. 1) when the profile reports it."""
    import pandas as pd

    ids = [u.unit.unit_id for u in plan.units]
    with store.connect(results_dir) as con:
        rows = con.execute("SELECT * FROM results WHERE unit_id IN (SELECT unnest(?))", [ids]).df()
    metric = {t.name: t.metric for t in plan.profile.tasks}
    scores = metrics.unit_scores(rows, metric=metric)
    # Each unit averages the tasks it was scored on; in 'members' scope merges are compared on
    # their own tasks in the merging loss instead.
    compared = metrics.compare_to_references(scores)
    table = metrics.summary_by_n(compared)
    table = table[table["role"] == "merged"].sort_values("n").reset_index(drop=True)
    loss = None
    if "merging_loss" in plan.profile.report:
        task_expert = {}
        for e in plan.profile.experts(plan.pool):
            for t in plan.profile.reference_tasks(plan.pool, e):
                task_expert.setdefault(t.name, e)
        sel = metrics.select_metric(rows, metric)
        loss = metrics.merging_loss(sel[sel["role"] == "merged"], sel[sel["role"] == "expert"], task_expert)
        loss = metrics.average_merging_loss(loss)
    return table, (loss if loss is not None else pd.DataFrame())
