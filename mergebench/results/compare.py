"""Two methods compared paired on identical subsets and documents, per merge size, from the store.

The store keeps every unit's per-document outcomes (the ``samples`` view); this reads those of
two methods' merged units on one suite profile, keeps each task's headline metric, and runs
:func:`mergebench.results.metrics.paired_doc_gap` for every merge size both methods share.
"""

from __future__ import annotations

import os
from collections import Counter

import pandas as pd

from mergebench.config.suites import load_suite
from mergebench.errors import MergebenchError
from mergebench.results import metrics, store

__all__ = ["CompareError", "compare_methods"]


class CompareError(MergebenchError, ValueError):
    """The store holds no per-document outcomes for what was asked; the message says what is missing."""


def compare_methods(results_dir: str | os.PathLike, suite: str, method_a: str, method_b: str, *,
                    profile: str | None = None, n_boot: int = 2_000, seed: int = 0) -> pd.DataFrame:
    """Per merge size n: the paired gap ``method_a - method_b`` of the battery average, with its
    joint subset x document interval and, for contrast, the interval over subsets alone.

    Each task counts with its headline metric from the suite file; a leaf of a task group counts
    as a task of its own, with the metric most of the suite's tasks use."""
    suite_obj = load_suite(suite)
    prof = suite_obj.profile(profile)
    headline = {t.name: t.metric for t in prof.tasks}
    fallback = Counter(headline.values()).most_common(1)[0][0]
    with store.connect(results_dir) as con:
        df = con.execute(
            """SELECT r.method, r.n, r.subset, s.task, s.doc_id, s.metric, s.value
               FROM samples s JOIN (SELECT DISTINCT unit_id, run_id, method, n, subset FROM results
                                    WHERE role = 'merged' AND suite = ? AND profile = ? AND method IN (?, ?)) r
               USING (unit_id, run_id)""", [suite, prof.name, method_a, method_b]).df()
    if df.empty:
        raise CompareError(f"no per-document outcomes of {method_a!r} or {method_b!r} on {suite}:{prof.name} in "
                           f"{results_dir} (units stored before outcomes were kept have none: rerun them with "
                           f"`mergebench eval --method M --suite {suite}` on a fresh results folder)")
    for m in (method_a, method_b):
        if not (df.method == m).any():
            raise CompareError(f"no per-document outcomes of {m!r} on {suite}:{prof.name} in {results_dir}: "
                               f"run `mergebench eval --method {m} --suite {suite}` first")
    df = df[df.metric == df.task.map(headline).fillna(fallback)]
    df["subset_key"] = metrics.pair_key(df["subset"])
    rows = []
    for n, grp in df.groupby("n", sort=True):
        if grp.method.nunique() < 2:
            continue
        rows.append({"n": int(n), **metrics.paired_doc_gap(grp, method_a, method_b, n_boot=n_boot, seed=seed)})
    if not rows:
        raise CompareError(f"{method_a!r} and {method_b!r} share no merge size with outcomes on {suite}:{prof.name}")
    return pd.DataFrame(rows)
