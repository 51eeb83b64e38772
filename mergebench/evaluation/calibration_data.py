"""Calibration documents for data-dependent methods: validation split only, seeded, budgeted.

Each expert of a merge gets the validation documents of the task(s) it was fine-tuned for
(its ``task`` tag; an expert without one, e.g. the base counted as a model, gets every task of
the profile). Documents are chosen by :func:`mergebench.config.sampling.doc_sample` on the
``validation`` split with the method's declared budget and seed, so every method and every run
sees the same documents, and none of them is ever a test document. The returned
:class:`~mergebench.engine.calibration.CalibrationData` records the split, the tasks, the
sampled indices' hash and the sampler version (it goes into the unit's provenance).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mergebench.config.pools import Pool, tag_values
from mergebench.config.sampling import SAMPLER_VERSION, doc_sample
from mergebench.config.suites import Profile, TaskSpec
from mergebench.engine.calibration import CalibrationData, CalibrationDoc, CalibrationError
from mergebench.methods.calibration import CalibrationBudget, CalibrationNeed
from mergebench.zoo.tasks import PREFIX, load_split

__all__ = ["CALIBRATION_SPLIT", "calibration_for_members", "calibration_tasks", "validation_docs"]

CALIBRATION_SPLIT = "validation"


def validation_docs(task: str, budget: CalibrationBudget) -> tuple[list[CalibrationDoc], dict[str, Any]]:
    """The seeded ``budget.documents`` validation documents of one embedded task, and their record."""
    if not task.startswith(PREFIX):
        raise CalibrationError(
            f"task {task!r}: calibration data are drawn from validation splits of the embedded tasks (mb_*) only; "
            "hub tasks are not supported yet (their evaluation split is often the validation split)"
        )
    rows = load_split(task, CALIBRATION_SPLIT)
    sample = doc_sample(task, len(rows), budget.documents, budget.seed, CALIBRATION_SPLIT)
    docs = []
    for i in sample.indices:
        row = rows[i]
        if "query" in row:
            docs.append(CalibrationDoc(row["query"], " " + row["choices"][row["gold"]]))
        else:
            docs.append(CalibrationDoc(row["text"]))
    return docs, {"task": task, "split": CALIBRATION_SPLIT, "n": len(docs), "of": len(rows), "hash": sample.hash}


def calibration_tasks(profile: Profile, pool: Pool, expert: str | None) -> list[TaskSpec]:
    """The profile's tasks an expert was fine-tuned for (by its ``task``/``tasks`` tag); every
    task of the profile for the base or an untagged expert."""
    if expert is None or expert == pool.base.name:
        return list(profile.tasks)
    ref = pool.expert(expert)
    tagged = tag_values(ref.tags.get("task", ref.tags.get("tasks")))
    own = [t for t in profile.tasks if any(x in t.aliases for x in tagged)]
    return own or list(profile.tasks)


def calibration_for_members(
    profile: Profile,
    pool: Pool,
    members: Sequence[str],
    need: CalibrationNeed,
    params: Mapping[str, Any],
) -> CalibrationData:
    """One group of validation documents per merged model (``members`` in merge order; the base's
    name stands for the base counted as an expert). Raises before any model is loaded."""
    budget = need.resolve_budget(params)
    groups, records = [], []
    for m in members:
        docs: list[CalibrationDoc] = []
        tasks = []
        for t in calibration_tasks(profile, pool, m):
            got, rec = validation_docs(t.name, budget)
            docs += got
            tasks.append(rec)
        groups.append(tuple(docs))
        records.append({"model": m, "tasks": tasks})
    source = {
        "kind": "validation split", "split": CALIBRATION_SPLIT, "sampler": "mergebench.config.sampling.doc_sample",
        "sampler_version": SAMPLER_VERSION, "budget": budget.describe(), "labels": need.labels, "groups": records,
    }
    return CalibrationData(tuple(groups), source)
