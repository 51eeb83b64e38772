"""The shared subset and document sampler (mergebench.config.sampling): determinism, independence from
anything but its arguments, counts, uniformity, progressive nesting and document-budget nesting."""

import hashlib
import itertools
import json
import random
import subprocess
import sys
from collections import Counter
from math import comb

import pytest
import torch

from mergebench.config.sampling import (
    SAMPLER_VERSION,
    SamplingError,
    doc_order,
    doc_sample,
    doc_sample_hash,
    group_subsets,
    progressive_subsets,
    resolve_sizes,
    samples_argument,
    seeded_permutation,
    uniform_subsets,
)

EXPERTS = [f"expert-{c}" for c in "abcdefghijkl"]  # 12, like seed 001's pools
PAPER_SIZES = [2, 4, 6, 8, 10, 12]


def by_size(subsets):
    out = {}
    for s in subsets:
        out.setdefault(s.size, []).append(s.members)
    return out


# --------------------------------------------------------------------------- uniform (seed 001)


def test_seed001_counts_15_per_size_and_one_full_set():
    subs = uniform_subsets(EXPERTS, PAPER_SIZES, 15, seed=0)
    counts = {n: len(m) for n, m in by_size(subs).items()}
    # seed 001 Table 1 header: n=2 (15) ... n=10 (15), n=12 (1)
    assert counts == {2: 15, 4: 15, 6: 15, 8: 15, 10: 15, 12: 1}
    assert by_size(subs)[12] == [tuple(EXPERTS)]


def test_uniform_subsets_are_distinct_valid_and_in_pool_order():
    rank = {e: i for i, e in enumerate(EXPERTS)}
    for n, members in by_size(uniform_subsets(EXPERTS, PAPER_SIZES, 15, seed=3)).items():
        assert len(set(members)) == len(members), f"size {n}: repeated subset"
        for m in members:
            assert len(m) == n and len(set(m)) == n
            assert [rank[e] for e in m] == sorted(rank[e] for e in m)


def test_all_combinations_when_there_are_no_more_than_asked():
    five = EXPERTS[:5]
    subs = by_size(uniform_subsets(five, [4, 5], 15, seed=0))
    assert sorted(subs[4]) == sorted(itertools.combinations(five, 4))  # C(5,4) = 5 < 15
    assert subs[5] == [tuple(five)]
    pairs = by_size(uniform_subsets(EXPERTS[:8], [2], "all"))[2]
    assert len(pairs) == 28 == comb(8, 2) and len(set(pairs)) == 28  # seed 004: all 28 pairs


def test_uniform_is_deterministic_and_depends_on_the_seed():
    a = uniform_subsets(EXPERTS, PAPER_SIZES, 15, seed=7)
    assert a == uniform_subsets(list(EXPERTS), PAPER_SIZES, 15, seed=7)
    assert by_size(a)[4] != by_size(uniform_subsets(EXPERTS, PAPER_SIZES, 15, seed=8))[4]


def test_draws_ignore_global_rngs_and_leave_them_untouched():
    """Subsets cannot depend on what a method (or anything else) did with the global RNGs."""
    random.seed(1)
    torch.manual_seed(1)
    a = uniform_subsets(EXPERTS, PAPER_SIZES, 15, seed=0)
    state_py, state_torch = random.getstate(), torch.get_rng_state()
    random.seed(999)
    torch.manual_seed(999)
    random.random()
    b = uniform_subsets(EXPERTS, PAPER_SIZES, 15, seed=0)
    assert a == b
    random.seed(1)
    torch.manual_seed(1)
    uniform_subsets(EXPERTS, PAPER_SIZES, 15, seed=0)
    progressive_subsets(EXPERTS, [2, 5], 3, seed=0)
    doc_sample("t", 500, 50)
    assert random.getstate() == state_py and torch.equal(torch.get_rng_state(), state_torch)


def test_same_subsets_in_another_process_with_another_hash_seed():
    code = (
        "import json; from mergebench.config.sampling import uniform_subsets, progressive_subsets, doc_sample;"
        f"e={EXPERTS!r};"
        "u=[s.members for s in uniform_subsets(e,[2,4,6],15,seed=5)];"
        "p=[s.members for s in progressive_subsets(e,[2,4,8],2,seed=5)];"
        "d=list(doc_sample('mb_capitals',120,60,seed=5).indices);"
        "print(json.dumps([u,p,d]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"},
    ).stdout
    u, p, d = json.loads(out)
    assert [list(m) for m in (s.members for s in uniform_subsets(EXPERTS, [2, 4, 6], 15, seed=5))] == u
    assert [list(s.members) for s in progressive_subsets(EXPERTS, [2, 4, 8], 2, seed=5)] == p
    assert list(doc_sample("mb_capitals", 120, 60, seed=5).indices) == d


def test_a_size_draw_does_not_depend_on_the_other_sizes_requested():
    alone = by_size(uniform_subsets(EXPERTS, [6], 15, seed=2))[6]
    assert by_size(uniform_subsets(EXPERTS, PAPER_SIZES, 15, seed=2))[6] == alone
    assert by_size(uniform_subsets(EXPERTS, [8, 6], 15, seed=2))[6] == alone


def test_fewer_subsets_per_size_is_a_prefix_of_more():
    big = by_size(uniform_subsets(EXPERTS, [2, 4, 8], 15, seed=0))
    small = by_size(uniform_subsets(EXPERTS, [2, 4, 8], 2, seed=0))
    for n in (2, 4, 8):
        assert small[n] == big[n][:2]


def test_uniform_subsets_are_uniform_over_combinations():
    """Chi-square over all C(5,2) = 10 pairs, first draw of 3000 seeds (fixed seeds: not flaky)."""
    five = EXPERTS[:5]
    counts = Counter(uniform_subsets(five, [2], 1, seed=s)[0].members for s in range(3000))
    assert set(counts) == set(itertools.combinations(five, 2))
    expected = 3000 / 10
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 27.9  # 9 degrees of freedom, p = 0.001


def test_distinct_draws_cover_without_replacement_uniformly():
    """4 distinct pairs out of 10 per draw: every pair is included with probability 0.4."""
    five = EXPERTS[:5]
    counts = Counter()
    n_draws = 1500
    for s in range(n_draws):
        members = [x.members for x in uniform_subsets(five, [2], 4, seed=s)]
        assert len(set(members)) == 4
        counts.update(members)
    expected = n_draws * 0.4
    chi2 = sum((counts[c] - expected) ** 2 / expected for c in itertools.combinations(five, 2))
    assert chi2 < 27.9


def test_seeded_permutation_is_a_permutation_and_uniform_in_first_position():
    first = Counter()
    for s in range(2000):
        p = seeded_permutation(6, "test", s)
        assert sorted(p) == list(range(6))
        first[p[0]] += 1
    chi2 = sum((c - 2000 / 6) ** 2 / (2000 / 6) for c in first.values())
    assert len(first) == 6 and chi2 < 20.5  # 5 dof, p = 0.001


# --------------------------------------------------------------------------- progressive (seed 000)


def test_progressive_adds_one_model_at_a_time_within_each_chain():
    sizes = list(range(2, 12))  # seed 000: m = 2..11
    ten = EXPERTS[:10]
    subs = progressive_subsets(ten, sizes, chains=3, seed=0, count_base=True)
    for c in range(3):
        chain = sorted((s for s in subs if s.chain == c), key=lambda s: s.size)
        assert [s.size for s in chain] == sizes
        for small, big in zip(chain, chain[1:]):
            assert set(small.members) < set(big.members)
            assert len(big.members) == len(small.members) + 1
        assert [len(s.members) for s in chain] == [m - 1 for m in sizes]  # the base counts as one model
        assert set(chain[-1].members) == set(ten)
    orders = {tuple(s.members for s in subs if s.chain == c) for c in range(3)}
    assert len(orders) == 3


def test_progressive_pool_order_for_the_first_chain():
    subs = progressive_subsets(EXPERTS[:10], [2, 3, 11], chains=2, seed=0, order="pool", count_base=True)
    chain0 = {s.size: s.members for s in subs if s.chain == 0}
    assert chain0[2] == tuple(EXPERTS[:1])
    assert chain0[3] == tuple(EXPERTS[:2])
    assert chain0[11] == tuple(EXPERTS[:10])
    assert progressive_subsets(EXPERTS[:10], [2, 3, 11], 2, seed=0, order="pool", count_base=True) == subs


def test_progressive_prefix_when_fewer_chains_or_sizes():
    big = progressive_subsets(EXPERTS, [2, 4, 8], chains=3, seed=4)
    small = progressive_subsets(EXPERTS, [2, 4], chains=1, seed=4)
    assert [s.members for s in small] == [s.members for s in big if s.chain == 0 and s.size in (2, 4)]


# --------------------------------------------------------------------------- groups, sizes, errors


def test_group_subsets_keep_pool_order_and_check_names():
    subs = group_subsets(EXPERTS, {"math-only": ["expert-c", "expert-a"], "all": EXPERTS[::-1]})
    assert subs[0].members == ("expert-a", "expert-c") and subs[0].id == "math-only" and subs[0].size == 2
    assert subs[1].members == tuple(EXPERTS)
    with pytest.raises(SamplingError, match="not in the pool: nobody"):
        group_subsets(EXPERTS, {"g": ["nobody"]})
    with pytest.raises(SamplingError, match="twice"):
        group_subsets(EXPERTS, {"g": ["expert-a", "expert-a"]})


def test_size_resolution_and_errors():
    assert resolve_sizes([2, "all"], 8) == [(2, 2), (8, 8)]
    assert resolve_sizes([2, "all"], 10, count_base=True) == [(2, 1), (11, 10)]
    with pytest.raises(SamplingError, match="needs 13 experts but the pool has only 12"):
        uniform_subsets(EXPERTS, [13], 15)
    with pytest.raises(SamplingError, match="too small"):
        uniform_subsets(EXPERTS, [1], 1, count_base=True)
    with pytest.raises(SamplingError, match="twice"):
        uniform_subsets(EXPERTS, [2, 2], 1)
    with pytest.raises(SamplingError, match="unique"):
        uniform_subsets(["a", "b", "a"], [2], 1)
    with pytest.raises(SamplingError, match="positive integer"):
        uniform_subsets(EXPERTS, [2], 0)


def test_subset_keys_identify_members():
    a, b = uniform_subsets(EXPERTS, [3], 2, seed=0)
    assert a.key != b.key
    same = group_subsets(EXPERTS, {"x": list(a.members)})[0]
    assert same.key == a.key  # content, not draw history
    assert json.loads(json.dumps(a.to_dict()))["members"] == list(a.members)


# --------------------------------------------------------------------------- documents


def test_doc_sample_is_sorted_in_range_and_deterministic():
    s = doc_sample("mb_capitals", 120, 60, seed=0)
    assert len(s.indices) == 60 == len(set(s.indices))
    assert list(s.indices) == sorted(s.indices) and 0 <= s.indices[0] and s.indices[-1] < 120
    assert s == doc_sample("mb_capitals", 120, 60, seed=0)
    assert s.indices != doc_sample("mb_capitals", 120, 60, seed=1).indices
    assert s.indices != doc_sample("mb_elements", 120, 60, seed=0).indices
    assert s.indices != doc_sample("mb_capitals", 120, 60, seed=0, split="validation").indices


def test_doc_budgets_are_nested():
    order = doc_order("mb_gsm8k_mc", 250, seed=3)
    assert sorted(order) == list(range(250))
    previous: set[int] = set()
    for budget in (1, 5, 20, 60, 100, 249, 250, 1000, None):
        cur = set(doc_sample("mb_gsm8k_mc", 250, budget, seed=3).indices)
        assert previous <= cur
        k = 250 if budget is None else min(budget, 250)
        assert cur == set(order[:k])
        previous = cur
    assert previous == set(range(250))


def test_doc_priorities_do_not_depend_on_the_number_of_documents():
    small, large = doc_order("t", 300, seed=2), doc_order("t", 1000, seed=2)
    assert [i for i in large if i < 300] == small


def test_doc_order_follows_the_documented_priority():
    """Recomputed from the module docstring: BLAKE2b-64 of (version, seed, task, split, index)."""

    def prio(i):
        key = f"{SAMPLER_VERSION}\x1f4\x1fmb_sentiment\x1ftest\x1f{i}".encode()
        return hashlib.blake2b(key, digest_size=8).digest()

    assert doc_order("mb_sentiment", 100, seed=4) == sorted(range(100), key=prio)


def test_every_document_is_equally_likely():
    counts = Counter()
    for s in range(2000):
        counts.update(doc_sample("t", 20, 5, seed=s).indices)
    expected = 2000 * 5 / 20
    chi2 = sum((counts[i] - expected) ** 2 / expected for i in range(20))
    assert chi2 < 43.8  # 19 dof, p = 0.001 (inclusions are slightly negatively correlated: conservative)


def test_doc_hash_is_sha256_of_task_split_indices():
    s = doc_sample("mb_capitals", 120, 10, seed=0)
    payload = json.dumps({"task": "mb_capitals", "split": "test", "indices": list(s.indices)}, separators=(",", ":"))
    assert s.hash == hashlib.sha256(payload.encode()).hexdigest() == doc_sample_hash("mb_capitals", "test", s.indices)
    assert s.hash != doc_sample("mb_capitals", 120, 10, seed=0, split="validation").hash
    full = doc_sample("mb_capitals", 120, None)
    assert full.complete and full.indices == tuple(range(120))
    assert doc_sample("x", 50, 80).indices == tuple(range(50))


def test_samples_argument_for_lm_eval():
    a, b = doc_sample("a", 30, 3), doc_sample("b", 30, 4)
    assert samples_argument([a, b]) == {"a": list(a.indices), "b": list(b.indices)}
    with pytest.raises(SamplingError, match="twice"):
        samples_argument([a, a])
    with pytest.raises(SamplingError, match="budget"):
        doc_sample("a", 30, 0)
