"""Per-document outcomes of one scored model: lm-eval's per-sample metrics, read back from the tasks.

A ranking over a handful of merged subsets has little power; comparing two methods *paired* on
the same documents of the same subsets has far more (:func:`mergebench.results.metrics.paired_gap`).
That needs each document's outcome, which lm-eval computes (``Task.process_results``) and then
only averages. After ``simple_evaluate`` the tasks still hold every request's filtered response,
so the outcomes are recomputed here exactly as lm-eval computes them, without ``log_samples``
(which would also keep every prompt and document).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

__all__ = ["doc_outcomes"]


def doc_outcomes(tasks: Iterable, samples: Mapping[str, Sequence[int]] | None = None) -> list[dict]:
    """One row per (task, document, metric) of lm-eval leaf ``tasks`` that have just been scored:
    ``task``, ``doc_id`` (the index in the task's evaluation split, as ``samples`` gives it),
    ``metric``, ``value`` (this document's value; lm-eval's reported score is their mean) and
    ``gold_loglik`` (the log-likelihood of the gold choice of a multiple-choice document, else NaN).
    Only the first filter of a task is kept (the embedded and paper tasks have one)."""
    rows: list[dict] = []
    for task in tasks:
        if not task.instances or not task.instances[0].filtered_resps:
            continue
        by_doc: dict[int, list] = defaultdict(list)
        for inst in task.instances:
            by_doc[inst.doc_id].append(inst)
        key = next(iter(task.instances[0].filtered_resps))
        indices = (samples or {}).get(task.config.task)
        choice = task.OUTPUT_TYPE == "multiple_choice"
        for pos in sorted(by_doc):
            requests = sorted(by_doc[pos], key=lambda inst: inst.idx)
            doc = requests[0].doc
            resps = [inst.filtered_resps[key] for inst in requests]
            gold = _gold_loglik(task, doc, resps) if choice else math.nan
            doc_id = int(indices[pos]) if indices else int(pos)
            for metric, value in task.process_results(doc, resps).items():
                if isinstance(value, bool | int | float):
                    rows.append({"task": task.config.task, "doc_id": doc_id, "metric": metric,
                                 "value": float(value), "gold_loglik": gold})
    return rows


def _gold_loglik(task, doc, resps) -> float:
    """The gold choice's log-likelihood (the first gold when a document has several)."""
    gold = task.doc_to_target(doc)
    if isinstance(gold, str):
        choices = task.doc_to_choice(doc)
        gold = choices.index(gold) if gold in choices else None
    elif isinstance(gold, list):
        gold = gold[0] if gold else None
    if not isinstance(gold, int) or not 0 <= gold < len(resps):
        return math.nan
    loglik = resps[gold]
    return float(loglik[0] if isinstance(loglik, tuple | list) else loglik)
