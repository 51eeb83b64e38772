"""The joint subset x document paired bootstrap (metrics.paired_doc_gap) against a float64
reference written from its definition, and its statistical properties."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mergebench.results.metrics import paired_doc_gap


def _samples(rng, n_subsets=6, tasks=(("t1", 40), ("t2", 25)), gap=0.05, subset_sd=0.02, p=0.6):
    """Accuracy-like 0/1 outcomes: method a is better by `gap` in probability, subsets shift both."""
    rows = []
    for s in range(n_subsets):
        shift = rng.normal(0, subset_sd)
        for t, k in tasks:
            ease = rng.uniform(-0.2, 0.2, size=k)  # documents differ in difficulty, for both methods
            for d in range(k):
                for m, g in (("a", gap), ("b", 0.0)):
                    prob = np.clip(p + ease[d] + shift + g, 0, 1)
                    rows.append({"method": m, "subset_key": f"s{s}", "task": t, "doc_id": 3 * d, "value":
                                 float(rng.random() < prob)})
    return pd.DataFrame(rows)


def _reference(df, n_boot, seed, ci=0.95):
    """Explicit index resampling, loop by loop, in float64."""
    rng = np.random.default_rng(seed + 1)
    subsets = sorted(df.subset_key.unique())
    tasks = sorted(df.task.unique())
    d = {(s, t): (df[(df.method == "a") & (df.subset_key == s) & (df.task == t)].sort_values("doc_id").value.to_numpy()
                  - df[(df.method == "b") & (df.subset_key == s) & (df.task == t)].sort_values("doc_id").value.to_numpy())
         for s in subsets for t in tasks}
    point = np.mean([np.mean([d[s, t].mean() for s in subsets]) for t in tasks])
    stats = []
    for _ in range(n_boot):
        ss = rng.integers(0, len(subsets), len(subsets))
        per_task = []
        for t in tasks:
            k = len(d[subsets[0], t])
            dd = rng.integers(0, k, k)
            per_task.append(np.mean([d[subsets[i], t][dd].mean() for i in ss]))
        stats.append(np.mean(per_task))
    a = (1 - ci) / 2
    return point, *np.quantile(stats, [a, 1 - a])


def test_matches_the_loop_reference():
    df = _samples(np.random.default_rng(0))
    got = paired_doc_gap(df, "a", "b", n_boot=4000, seed=3)
    point, lo, hi = _reference(df, 4000, seed=3)
    assert got["mean_diff"] == pytest.approx(point, abs=1e-12)
    width = hi - lo
    assert got["ci_low"] == pytest.approx(lo, abs=0.08 * width)  # two Monte Carlo estimates of one interval
    assert got["ci_high"] == pytest.approx(hi, abs=0.08 * width)
    assert got["n_subsets"] == 6 and got["n_docs"] == 65


def test_is_seeded_and_independent_of_row_order():
    df = _samples(np.random.default_rng(1))
    a = paired_doc_gap(df, "a", "b", seed=7)
    b = paired_doc_gap(df.sample(frac=1.0, random_state=5), "a", "b", seed=7)
    assert a == b
    assert paired_doc_gap(df, "a", "b", seed=8) != a


def test_identical_subsets_leave_only_document_uncertainty():
    """Every subset has the same per-document outcomes: resampling subsets alone changes nothing,
    resampling documents still does."""
    one = _samples(np.random.default_rng(2), n_subsets=1)
    df = pd.concat([one.assign(subset_key=f"s{i}") for i in range(5)])
    got = paired_doc_gap(df, "a", "b", seed=0)
    assert got["subsets_ci_low"] == pytest.approx(got["subsets_ci_high"], abs=1e-12)
    assert got["ci_high"] - got["ci_low"] > 0.02


def test_covers_the_true_gap_about_95_percent_of_the_time():
    rng = np.random.default_rng(11)
    covered = 0
    trials = 120
    for _ in range(trials):
        df = _samples(rng, gap=0.1, subset_sd=0.0, p=0.45)
        got = paired_doc_gap(df, "a", "b", n_boot=600, seed=0)
        covered += got["ci_low"] <= 0.1 <= got["ci_high"]
    assert 0.85 <= covered / trials <= 1.0


def test_unknown_method_is_named():
    df = _samples(np.random.default_rng(3))
    with pytest.raises(KeyError, match="'karcher'"):
        paired_doc_gap(df, "a", "karcher")
