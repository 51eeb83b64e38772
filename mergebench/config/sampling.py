"""Seeded choice of which experts to merge and which evaluation documents to score.

Everything here is a pure function of its arguments, so that every method in a comparison sees
**the same subsets and the same documents** (paired comparisons, seed 001 §3.2: "The same
subsets are used across methods"). Nothing depends on the method, on the process, on the
Python version or on the global RNG: draws come from a counter-mode BLAKE2b stream keyed by a
purpose string, the seed and the sizes (:class:`_Stream`), never from :mod:`random`, whose
algorithms may change between Python releases.

Subsets (expert names, always listed in pool order):

* :func:`uniform_subsets` -- seed 001: for each size ``n`` draw ``per_size`` distinct subsets
  uniformly among all ``C(N, n)``, or take all of them when there are no more than that
  (``n = N`` is the single full set). The draws for one size do not depend on which other
  sizes are asked for, and a smaller ``per_size`` gives a prefix of a larger one's draws
  (so a ``quick`` profile's subsets are among the full profile's).
* :func:`progressive_subsets` -- seed 000: models are *added* one at a time: the subset of size
  ``m + 1`` is the subset of size ``m`` plus one model (prefixes of one ordering, a "chain").
* :func:`group_subsets` -- fixed, named subsets (seed 001 App. E: math-only, medical-only, all).

With ``count_base=True`` a size counts the base model as one of the merged models (seed 000
counts it: Model Stock and SCE, which need two fine-tuned inputs, start at m = 3 in its Tables
3-5), so a subset of size ``m`` holds ``m - 1`` experts; a method that takes no base model must
then receive the base as one more input.

Documents: :func:`doc_sample` picks a seeded, sorted list of document indices of a given budget
for one task, to pass to lm-eval's ``samples=`` (``limit=`` would take the first N documents).
Samples are **nested**: every document has a fixed pseudo-random priority
``BLAKE2b(seed, task, split, index)`` and a budget ``k`` keeps the ``k`` documents of lowest
priority, so the sample of budget ``k`` is contained in the sample of any budget ``K >= k``
(scores cached for a small budget are reused when it grows), and a document's priority does not
depend on how many documents the task has. lm-eval looks ``samples=`` up by leaf task, so a group
(``mmlu``) is sampled once per leaf, each with the full budget (like lm-eval's ``limit``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from math import comb
from typing import Literal

from mergebench.errors import MergebenchError

__all__ = [
    "SAMPLER_VERSION",
    "DocSample",
    "SamplingError",
    "Subset",
    "doc_order",
    "doc_sample",
    "doc_sample_hash",
    "group_subsets",
    "progressive_subsets",
    "resolve_sizes",
    "samples_argument",
    "seeded_permutation",
    "uniform_subsets",
]

SAMPLER_VERSION = 1
"""Bumped whenever a change would alter any draw (stored with results)."""

MAX_SUBSETS_PER_SIZE = 10_000

Size = int | Literal["all"]


class SamplingError(MergebenchError, ValueError):
    """Impossible sampling request (size larger than the pool, duplicate experts, ...)."""


class _Stream:
    """Deterministic unsigned 64-bit integers: BLAKE2b(key || counter), 8 words per block."""

    def __init__(self, *key: object):
        self._key = "\x1f".join(str(k) for k in key).encode()
        self._counter = 0
        self._words: list[int] = []

    def _next64(self) -> int:
        if not self._words:
            block = hashlib.blake2b(self._key + b"\x00" + self._counter.to_bytes(8, "little"), digest_size=64).digest()
            self._counter += 1
            self._words = [int.from_bytes(block[i : i + 8], "little") for i in range(56, -8, -8)]
        return self._words.pop()

    def below(self, n: int) -> int:
        """Uniform integer in [0, n) (rejection sampling: no modulo bias)."""
        if n <= 0:
            raise ValueError("n must be positive")
        limit = (1 << 64) - ((1 << 64) % n)
        while True:
            x = self._next64()
            if x < limit:
                return x % n


def _partial_shuffle(n: int, k: int, stream: _Stream) -> list[int]:
    """The first ``k`` entries of a uniformly random permutation of ``range(n)`` (Fisher-Yates)."""
    items = list(range(n))
    for i in range(k):
        j = i + stream.below(n - i)
        items[i], items[j] = items[j], items[i]
    return items[:k]


def seeded_permutation(n: int, *key: object) -> list[int]:
    """A uniformly random permutation of ``range(n)`` determined by ``key`` alone."""
    return _partial_shuffle(n, n, _Stream("permutation", SAMPLER_VERSION, n, *key))


@dataclass(frozen=True)
class Subset:
    """One set of experts to merge.

    ``size`` is the merge size as the paper counts it (it includes the base when
    ``base_counted``); ``members`` are expert names in pool order; ``index`` numbers the subsets
    of one size (draw order); ``label`` names a fixed group; ``chain`` is the progressive
    ordering the subset is a prefix of.
    """

    size: int
    members: tuple[str, ...]
    index: int
    kind: Literal["uniform", "progressive", "group"]
    label: str | None = None
    chain: int | None = None
    base_counted: bool = False

    @property
    def n_experts(self) -> int:
        return len(self.members)

    @property
    def key(self) -> str:
        """Content hash of the member list (what is merged), independent of how it was drawn."""
        payload = json.dumps({"members": list(self.members), "base_counted": self.base_counted}, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @property
    def id(self) -> str:
        """Short readable id: ``math-only``, ``n4-0``, ``n4-c1`` (progressive chain 1)."""
        if self.kind == "group":
            return str(self.label)
        if self.kind == "progressive":
            return f"n{self.size}-c{self.chain}"
        return f"n{self.size}-{self.index}"

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "key": self.key,
            "size": self.size,
            "n_experts": self.n_experts,
            "members": list(self.members),
            "kind": self.kind,
            "index": self.index,
            "label": self.label,
            "chain": self.chain,
            "base_counted": self.base_counted,
        }


def _check_experts(experts: Sequence[str]) -> list[str]:
    experts = list(experts)
    if not experts:
        raise SamplingError("the pool has no experts to sample from")
    dup = sorted({e for e in experts if experts.count(e) > 1})
    if dup:
        raise SamplingError(f"expert names must be unique; repeated: {', '.join(dup)}")
    return experts


def resolve_sizes(sizes: Iterable[Size], n_experts: int, count_base: bool = False) -> list[tuple[int, int]]:
    """``[(size, experts_per_subset), ...]`` for the requested sizes, checked against the pool.

    ``"all"`` means every expert (size ``N``, or ``N + 1`` when the base is counted).
    """
    offset = 1 if count_base else 0
    out: list[tuple[int, int]] = []
    for s in sizes:
        size = n_experts + offset if s == "all" else s
        if not isinstance(size, int) or isinstance(size, bool):
            raise SamplingError(f"merge size must be an integer or 'all', got {s!r}")
        k = size - offset
        if k < 1:
            what = "the base plus at least one expert" if count_base else "at least one expert"
            raise SamplingError(f"merge size {size} is too small: a merge needs {what}")
        if k > n_experts:
            extra = " (the base counts as one of them)" if count_base else ""
            raise SamplingError(f"merge size {size} needs {k} experts{extra} but the pool has only {n_experts}")
        if any(size == done for done, _ in out):
            raise SamplingError(f"merge size {size} is listed twice")
        out.append((size, k))
    if not out:
        raise SamplingError("no merge sizes given")
    return out


def uniform_subsets(
    experts: Sequence[str],
    sizes: Iterable[Size],
    per_size: int | Literal["all"] | None,
    seed: int = 0,
    *,
    count_base: bool = False,
) -> list[Subset]:
    """Distinct subsets drawn uniformly for each size (seed 001 §3.2).

    For each size with ``k`` experts: if ``C(N, k) <= per_size`` (or ``per_size`` is ``"all"``/
    None) every combination is returned, in lexicographic pool order; otherwise ``per_size``
    distinct combinations are drawn uniformly without replacement. The draw for a size is keyed
    by ``(seed, N, k)`` only.
    """
    experts = _check_experts(experts)
    n = len(experts)
    if per_size is not None and per_size != "all":
        if not isinstance(per_size, int) or isinstance(per_size, bool) or per_size < 1:
            raise SamplingError(f"subsets per size must be a positive integer or 'all', got {per_size!r}")
        if per_size > MAX_SUBSETS_PER_SIZE:
            raise SamplingError(f"subsets per size is capped at {MAX_SUBSETS_PER_SIZE}, got {per_size}")
    out: list[Subset] = []
    for size, k in resolve_sizes(sizes, n, count_base):
        total = comb(n, k)
        if per_size is None or per_size == "all" or total <= per_size:
            if total > MAX_SUBSETS_PER_SIZE:
                raise SamplingError(f"size {size} has {total} combinations; give a number of subsets per size")
            from itertools import combinations

            picks = list(combinations(range(n), k))
        else:
            stream = _Stream("uniform", SAMPLER_VERSION, seed, n, k)
            seen: set[tuple[int, ...]] = set()
            picks = []
            while len(picks) < per_size:
                combo = tuple(sorted(_partial_shuffle(n, k, stream)))
                if combo not in seen:
                    seen.add(combo)
                    picks.append(combo)
        for i, combo in enumerate(picks):
            out.append(Subset(size, tuple(experts[j] for j in combo), i, "uniform", base_counted=count_base))
    return out


def progressive_subsets(
    experts: Sequence[str],
    sizes: Iterable[Size],
    chains: int = 1,
    seed: int = 0,
    *,
    order: Literal["pool", "seeded"] = "seeded",
    count_base: bool = False,
) -> list[Subset]:
    """Nested subsets: within a chain, each size adds experts to the previous one (seed 000 §4.1).

    Chain ``c`` is an ordering of the experts: the pool order itself for chain 0 when
    ``order="pool"``, otherwise a seeded permutation keyed by ``(seed, N, c)``. The subset of
    size ``m`` is the first ``m`` (``m - 1`` with ``count_base``) experts of the ordering.
    """
    experts = _check_experts(experts)
    n = len(experts)
    if not isinstance(chains, int) or isinstance(chains, bool) or chains < 1:
        raise SamplingError(f"the number of progressive chains must be a positive integer, got {chains!r}")
    resolved = sorted(resolve_sizes(sizes, n, count_base))
    out: list[Subset] = []
    for c in range(chains):
        if order == "pool" and c == 0:
            perm = list(range(n))
        else:
            perm = _partial_shuffle(n, n, _Stream("progressive", SAMPLER_VERSION, seed, n, c))
        for size, k in resolved:
            members = tuple(experts[j] for j in sorted(perm[:k]))
            out.append(Subset(size, members, c, "progressive", chain=c, base_counted=count_base))
    return out


def group_subsets(
    experts: Sequence[str], groups: Mapping[str, Iterable[str]], *, count_base: bool = False
) -> list[Subset]:
    """Fixed, named subsets (seed 001 App. E), members put in pool order and checked."""
    experts = _check_experts(experts)
    rank = {e: i for i, e in enumerate(experts)}
    out: list[Subset] = []
    for i, (label, members) in enumerate(groups.items()):
        members = list(members)
        unknown = [m for m in members if m not in rank]
        if unknown:
            raise SamplingError(f"group {label!r}: not in the pool: {', '.join(unknown)}")
        if len(set(members)) != len(members):
            raise SamplingError(f"group {label!r} lists an expert twice")
        if not members:
            raise SamplingError(f"group {label!r} selects no experts")
        ordered = tuple(sorted(members, key=rank.__getitem__))
        size = len(ordered) + (1 if count_base else 0)
        out.append(Subset(size, ordered, i, "group", label=label, base_counted=count_base))
    return out


# --------------------------------------------------------------------------- documents


def _priority(seed: int, task: str, split: str, i: int) -> bytes:
    return hashlib.blake2b(f"{SAMPLER_VERSION}\x1f{seed}\x1f{task}\x1f{split}\x1f{i}".encode(), digest_size=8).digest()


def doc_order(task: str, n_docs: int, seed: int = 0, split: str = "test") -> list[int]:
    """Every document index of ``task`` by increasing priority; a budget keeps a prefix."""
    if n_docs < 0:
        raise SamplingError(f"{task}: number of documents must be >= 0, got {n_docs}")
    return sorted(range(n_docs), key=lambda i: _priority(seed, task, split, i))


def doc_sample_hash(task: str, split: str, indices: Sequence[int]) -> str:
    """SHA-256 of ``(task, split, indices)``: the cache key of the evaluated documents."""
    payload = json.dumps({"task": task, "split": split, "indices": [int(i) for i in indices]}, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(frozen=True)
class DocSample:
    """The documents of one task to evaluate: pass ``indices`` to lm-eval's ``samples=``."""

    task: str
    split: str
    seed: int
    budget: int | None
    n_docs: int
    indices: tuple[int, ...]
    hash: str

    @property
    def complete(self) -> bool:
        """True when every document of the task is evaluated."""
        return len(self.indices) == self.n_docs

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "split": self.split,
            "seed": self.seed,
            "budget": self.budget,
            "n_docs": self.n_docs,
            "indices": list(self.indices),
            "hash": self.hash,
        }


def doc_sample(task: str, n_docs: int, budget: int | None, seed: int = 0, split: str = "test") -> DocSample:
    """Seeded sorted document indices of at most ``budget`` documents (all when None or larger)."""
    if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 1):
        raise SamplingError(f"{task}: document budget must be a positive integer or None, got {budget!r}")
    if budget is None or budget >= n_docs:
        if n_docs < 0:
            raise SamplingError(f"{task}: number of documents must be >= 0, got {n_docs}")
        indices = tuple(range(n_docs))
    else:
        indices = tuple(sorted(doc_order(task, n_docs, seed, split)[:budget]))
    return DocSample(task, split, seed, budget, n_docs, indices, doc_sample_hash(task, split, indices))


def samples_argument(samples: Iterable[DocSample]) -> dict[str, list[int]]:
    """``{task: [indices]}`` for ``lm_eval.simple_evaluate(samples=...)``."""
    out: dict[str, list[int]] = {}
    for s in samples:
        if s.task in out:
            raise SamplingError(f"task {s.task!r} sampled twice")
        out[s.task] = list(s.indices)
    return out
