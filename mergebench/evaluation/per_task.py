"""What the runner needs for data-dependent and per-task methods, kept out of the runner itself.

* :func:`unit_calibration`: the validation-split calibration texts of one merge (None for a
  data-free method), one group per merged model in merge order.
* :func:`task_assignment`: for a per-task method (``spec.outputs == "per_task"``, EMR-Merging),
  which merged model scores which task: each task goes to the first member fine-tuned for it (its
  ``task`` tag); tasks no member was fine-tuned for go to the unified model (``task=None``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mergebench.config.pools import Pool
from mergebench.config.sampling import SAMPLER_VERSION
from mergebench.config.suites import Profile, TaskSpec
from mergebench.engine.calibration import CalibrationData, calibration_cost
from mergebench.evaluation.calibration_data import calibration_for_members, calibration_tasks
from mergebench.methods import MethodSpec
from mergebench.methods.calibration import calibration_of

__all__ = ["calibration_cost_line", "task_assignment", "unit_calibration", "unit_identity"]


def unit_calibration(profile: Profile, pool: Pool, spec: MethodSpec, models: Sequence[str],
                     params: Mapping[str, Any]) -> CalibrationData | None:
    """Calibration texts for merging ``models`` (pool names, in the order the engine receives them;
    the base's name where the base is merged as an expert) with ``spec``; None if data-free."""
    need = calibration_of(spec)
    if need is None:
        return None
    return calibration_for_members(profile, pool, models, need, params)


def task_assignment(profile: Profile, pool: Pool, models: Sequence[str],
                    tasks: Sequence[TaskSpec]) -> list[tuple[int | None, list[TaskSpec]]]:
    """``[(expert index or None, tasks it scores)]`` covering ``tasks`` once each, in expert order
    (``None``: the unified model, for tasks no merged expert was fine-tuned for)."""
    left = list(tasks)
    out: list[tuple[int | None, list[TaskSpec]]] = []
    for k, m in enumerate(models):
        if m == pool.base.name:
            continue
        own = {t.name for t in calibration_tasks(profile, pool, m)}
        if len(own) == len(profile.tasks) and len(profile.tasks) > 1:
            continue  # an untagged expert: it has no task of its own
        mine = [t for t in left if t.name in own]
        if mine:
            out.append((k, mine))
            left = [t for t in left if t not in mine]
    if left:
        out.append((None, left))
    return out


def unit_identity(spec: MethodSpec, params: Mapping[str, Any]) -> dict[str, Any]:
    """What a data-dependent or per-task method adds to a merged unit's cache key: the calibration
    declaration and budget (and the split and sampler version), the per-task outputs. Empty for
    data-free single-output methods, so their unit ids do not change."""
    out: dict[str, Any] = {}
    need = calibration_of(spec)
    if need is not None:
        out["calibration"] = {**need.describe(), "budget": need.resolve_budget(params).describe(),
                              "split": "validation", "sampler_version": SAMPLER_VERSION}
    if spec.outputs != "merged":
        out["outputs"] = spec.outputs
    return out


def calibration_cost_line(spec: MethodSpec, merges: Sequence[tuple[Mapping[str, Any], Sequence[int]]]) -> str | None:
    """One line for ``mergebench plan``: documents and forward/backward document passes the
    calibration of ``merges`` costs, each given as ``(params, documents per merged model)``
    (:func:`unit_calibration` gives the documents); None for a data-free method."""
    need = calibration_of(spec)
    if need is None or not merges:
        return None
    costs = [calibration_cost(need, p, len(docs), docs) for p, docs in merges]
    docs = sum(c["documents"] for c in costs)
    fwd = sum(c["forward_docs"] for c in costs)
    bwd = sum(c["backward_docs"] for c in costs)
    what = ", ".join([*need.statistics, *(["model step"] if need.model_step is not None else [])])
    return (f"calibration ({what}): {len(merges)} merge(s), {docs} validation documents "
            f"(<= {costs[0]['max_tokens']} tokens each), {fwd} forward and {bwd} backward document passes "
            "(measured seconds land in each unit's calibration_s)")
