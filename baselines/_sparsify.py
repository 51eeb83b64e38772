"""Sparsification and sign-election helpers for the task-vector family (pure tensor code).

Conventions shared by every helper:

* "Top-k by magnitude" is exact: ties at the threshold are broken by flat index (lower
  index first), so exactly ``k`` elements are selected even for bf16 deltas, where equal
  magnitudes are common. The threshold comes from a linear-time selection
  (:func:`kth_largest`), never a full sort.
* Functions whose name ends in ``_`` work in place on a tensor the caller owns (a freshly
  computed task vector), never on a kernel input.
* Masks are applied as 0/1 tensors of the data's dtype: on CPU, mixing bool and float
  operands was measured 3-5x slower than same-dtype arithmetic.
* Random draws (DARE, DELLA) come only from the generator passed in. Draw protocol, relied
  on by the tests: each call with ``0 < p < 1`` draws exactly one
  ``torch.rand(delta.shape, dtype=float32)`` from it; calls with ``p <= 0`` or ``p >= 1``
  draw nothing. An element is kept when its uniform draw ``u < p`` (so ``P(keep) = p``).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "KEEP_EPS",
    "dare_",
    "della_",
    "della_keep_probs",
    "elect_sign",
    "keep_count",
    "kth_largest",
    "l1_rescale_",
    "magnitude_trim_",
    "magnitude_window_",
    "top_k_mask",
]

KEEP_EPS = 1e-6
"""Slack when turning a fraction into a count: ``floor(f * n + KEEP_EPS)``, so that e.g.
``0.57 * 100 = 56.999...`` keeps 57 elements (mergekit's plain ``int()`` keeps 56)."""

_DIRECT = 1 << 20  # up to this many elements, kthvalue on everything
_SAMPLE = 1 << 16  # sample size used to bracket the threshold of larger tensors


def keep_count(fraction: float, n: int, at_least_one: bool = False) -> int:
    """``floor(fraction * n)`` (with float slack), clipped to ``[0, n]``.

    ``at_least_one`` keeps one element of a non-empty tensor for any positive fraction
    (mergekit's TIES trim does this so tiny 1-D tensors are not wiped out).
    """
    if fraction <= 0 or n == 0:
        return 0
    k = min(n, int(math.floor(fraction * n + KEEP_EPS)))
    return max(k, 1) if at_least_one else k


def _count(mask: torch.Tensor) -> int:
    return int(torch.count_nonzero(mask))  # ~10x faster than bool .sum() on CPU


def kth_largest(a: torch.Tensor, k: int, *, direct: int = _DIRECT, sample: int = _SAMPLE) -> torch.Tensor:
    """The k-th largest value of the flattened ``a`` (1 <= k <= numel), as a 0-d tensor. Exact.

    Small tensors: ``torch.kthvalue``. Larger ones: a fixed pseudo-random sample brackets
    the answer, one counting pass confirms the bracket and ``kthvalue`` runs only on the
    elements inside it (about 2x faster than ``kthvalue`` on 16M floats here); if the
    bracket misses (possible only for adversarial data) it falls back to ``kthvalue``.
    """
    flat = a.reshape(-1)
    n = flat.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} out of range for a tensor with {n} elements")
    if n <= max(direct, sample):
        return torch.kthvalue(flat, n - k + 1).values
    # Deterministic sample: its own fixed-seed CPU generator, not the caller's, not the global RNG.
    idx = torch.randint(n, (sample,), generator=torch.Generator().manual_seed(0x5EED)).to(flat.device)
    s = torch.sort(flat[idx], descending=True).values
    q = k / n
    j = int(q * sample)
    margin = int(6.0 * math.sqrt(q * (1.0 - q) * sample)) + 4
    hi_i, lo_i = j - margin, j + margin
    above = 0
    inside = None
    if hi_i >= 0:  # answer <= hi iff fewer than k elements exceed hi
        hi = s[hi_i]
        inside = flat > hi
        above = _count(inside)
        if above >= k:
            return torch.kthvalue(flat, n - k + 1).values
        inside.logical_not_()  # flat <= hi
    if lo_i < sample:  # answer >= lo iff at least k elements are >= lo
        lo = s[lo_i]
        ge = flat >= lo
        if _count(ge) < k:
            return torch.kthvalue(flat, n - k + 1).values
        inside = ge if inside is None else inside.logical_and_(ge)
        del ge
    cand = flat if inside is None else flat[inside]
    r = k - above  # rank of the answer among the candidates, from the top
    return torch.kthvalue(cand, cand.numel() - r + 1).values


def top_k_mask(a: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly ``k`` largest elements of ``a`` (ties: lower flat index first)."""
    n = a.numel()
    if k >= n:
        return torch.ones_like(a, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(a, dtype=torch.bool)
    t = kth_largest(a, k)
    mask = a > t
    missing = k - _count(mask)
    if missing > 0:
        _set_first_ties(mask, a, t, missing, True)
    return mask


def _set_first_ties(out: torch.Tensor, a: torch.Tensor, t: torch.Tensor, count: int, value) -> None:
    """Set ``out`` to ``value`` at the first ``count`` elements of ``a`` equal to ``t``, in
    row-major (logical) index order, whatever the memory layout of ``a`` and ``out``
    (transposed views and strided slices included: ``view(-1)`` would fail on those)."""
    flat = torch.nonzero((a == t).reshape(-1))[:count, 0]
    out[torch.unravel_index(flat, out.shape)] = value


def l1_rescale_(masked: torch.Tensor, l1_before: torch.Tensor) -> torch.Tensor:
    """Scale ``masked`` in place so its L1 norm equals ``l1_before`` (mergekit's ``rescale``).

    Nothing is done when nothing survived (or the original was zero): there is no scale to
    restore.
    """
    after = masked.abs().sum(dtype=torch.float64)
    before = l1_before.to(torch.float64)
    if after > 0 and before > 0:
        masked.mul_((before / after).to(masked.dtype))
    return masked


def _l1(delta: torch.Tensor, rescale: str | None) -> torch.Tensor | None:
    return delta.abs().sum(dtype=torch.float64) if rescale == "l1" else None


def magnitude_trim_(delta: torch.Tensor, density: float, rescale: str | None = None) -> torch.Tensor:
    """TIES trim: keep the top ``density`` fraction of ``delta`` by magnitude, zero the rest.

    ``k = max(1, floor(density * numel))`` for ``density > 0`` (mergekit's rule); the whole
    tensor is one pool, including 1-D tensors and embeddings. ``rescale='l1'`` restores the
    L1 norm afterwards.
    """
    if density >= 1:
        return delta
    n = delta.numel()
    k = keep_count(density, n, at_least_one=True)
    if k == 0:
        return delta.zero_()
    a = delta.abs()
    t = kth_largest(a, k)
    if float(t) == 0:  # fewer than k nonzero entries: nothing to drop
        return delta
    before = _l1(delta, rescale)
    keep = a.gt_(t)  # in place: 1.0 where |delta| > t, exactly k unless there are ties at t
    missing = k - _count(keep)
    if missing > 0:  # also keep the first `missing` entries with |delta| == t
        _set_first_ties(keep, delta.abs(), t, missing, 1)
    delta.mul_(keep)
    if before is not None:
        l1_rescale_(delta, before)
    return delta


def magnitude_window_(delta: torch.Tensor, density: float, gamma: float, rescale: str | None = None) -> torch.Tensor:
    """Model Breadcrumbs mask: drop the top ``gamma`` fraction by magnitude, keep the next
    ``density`` fraction, drop the rest.

    Counts are ``floor(gamma * n)`` and ``floor(density * n)``; when they add up to more
    than ``n`` the outlier cut shrinks so that ``density`` is honoured (mergekit's rule), and
    ``density >= 1`` keeps everything.
    """
    if density >= 1:
        return delta
    n = delta.numel()
    keep = keep_count(density, n)
    top = min(keep_count(gamma, n), n - keep)
    if keep == 0:
        return delta.zero_()
    before = _l1(delta, rescale)
    a = delta.abs()
    mask = top_k_mask(a, top + keep)
    if top > 0:
        mask.logical_and_(top_k_mask(a, top).logical_not_())
    del a
    delta.mul_(mask.to(delta.dtype))
    if before is not None:
        l1_rescale_(delta, before)
    return delta


def _need(gen: torch.Generator | None, what: str) -> torch.Generator:
    if gen is None:
        raise ValueError(f"{what} draws random masks and needs ctx.generator (declare the method stochastic)")
    return gen


def _uniform(delta: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(delta.shape, generator=gen, dtype=torch.float32, device=delta.device)


def dare_(delta: torch.Tensor, p: float, gen: torch.Generator | None, rescale: str | None = "paper") -> torch.Tensor:
    """DARE: keep each element with probability ``p`` (drop with ``1 - p``), then rescale.

    ``rescale``: ``"paper"`` multiplies survivors by ``1/p`` (Yu et al., so the expectation
    equals the undropped delta); ``"l1"`` restores the tensor's L1 norm (mergekit);
    ``None`` leaves survivors as they are.
    """
    if p >= 1:
        return delta
    if p <= 0:
        return delta.zero_()
    u = _uniform(delta, _need(gen, "DARE"))
    keep = u.lt_(p)  # in place: 1.0 where kept, 0.0 where dropped
    if keep.dtype != delta.dtype:
        keep = keep.to(delta.dtype)
    if rescale == "paper":
        keep.mul_(1.0 / p)
    before = _l1(delta, rescale)
    delta.mul_(keep)
    if before is not None:
        l1_rescale_(delta, before)
    return delta


def _rows(t: torch.Tensor) -> torch.Tensor:
    """View of ``t`` as (rows, cols): one row for 1-D tensors, first axis as rows otherwise."""
    if t.dim() <= 1:
        return t.reshape(1, -1)
    return t.reshape(t.shape[0], -1)


def della_keep_probs(delta: torch.Tensor, p: float, eps: float, row_block: int | None = None) -> torch.Tensor:
    """MagPrune keep probabilities shaped like ``_rows(delta)`` (float64 for float64
    deltas, float32 otherwise).

    Within each row, elements are ranked by magnitude (ascending, ties by index) and the
    rank ``r`` in ``0..n-1`` maps linearly onto ``[p - eps, p + eps]``:
    ``p_r = p - eps + 2 eps r / (n - 1)`` (a one-element row gets ``p``). Larger
    magnitudes are kept more often. Rows are sorted in blocks of about 4M elements to
    bound the sort's temporaries.
    """
    rows = _rows(delta)
    nr, nc = rows.shape
    dtype = torch.float64 if delta.dtype == torch.float64 else torch.float32
    probs = torch.empty((nr, nc), dtype=dtype, device=delta.device)
    if nc == 1:
        return probs.fill_(p)
    ladder = torch.linspace(p - eps, p + eps, nc, dtype=torch.float64, device=delta.device).to(dtype)
    block = row_block or max(1, (1 << 22) // nc)
    for r0 in range(0, nr, block):
        order = torch.sort(rows[r0 : r0 + block].abs(), dim=1, stable=True).indices
        probs[r0 : r0 + block].scatter_(1, order, ladder.expand(order.shape[0], nc))
    return probs


def della_(delta: torch.Tensor, p: float, eps: float, gen: torch.Generator | None, rescale: str | None = "paper") -> torch.Tensor:
    """DELLA MagPrune: drop by magnitude-ranked keep probabilities, rescale survivors.

    ``rescale``: ``"paper"`` divides each survivor by its own keep probability ``p_i``
    (Deep et al.); ``"l1"`` restores the tensor's L1 norm (mergekit); ``None``: no rescaling.
    Ranking is per row (first axis); 1-D tensors are one row. ``p >= 1`` keeps everything
    and ``p <= 0`` drops everything (no draws in either case).
    """
    if p >= 1:
        return delta
    if p <= 0:
        return delta.zero_()
    u = _rows(_uniform(delta, _need(gen, "DELLA")))
    probs = della_keep_probs(delta, p, eps)
    keep = u.lt_(probs)  # in place: 1.0 where kept
    if rescale == "paper":
        # survivors get 1/p_i; a p_i == 0 entry is never kept, so its inf is zeroed by keep
        keep = probs.reciprocal_().mul_(keep)
        if p - eps <= 0:
            keep.nan_to_num_(nan=0.0, posinf=0.0)  # inf * 0 where p_i == 0
    del probs
    before = _l1(delta, rescale)
    _rows(delta).mul_(keep if keep.dtype == delta.dtype else keep.to(delta.dtype))
    if before is not None:
        l1_rescale_(delta, before)
    return delta


def elect_sign(stack: torch.Tensor, coeffs: list[float], method: str) -> torch.Tensor:
    """TIES sign election over the weighted task vectors ``coeffs[i] * stack[i]``.

    Returns the elected sign (+1 or -1) per element in the stack's dtype. ``"sum"``: sign
    of the weighted sum (magnitude-weighted vote, the TIES paper); ``"count"``: majority
    of the signs. A tie (zero total) elects +1, as in mergekit.
    """
    acc = torch.zeros_like(stack[0])
    if method == "sum":
        for d, c in zip(stack, coeffs):
            if c != 0:
                acc.add_(d, alpha=c)
    elif method == "count":
        tmp = torch.empty_like(stack[0])
        for d, c in zip(stack, coeffs):
            if c != 0:
                torch.sign(d, out=tmp)
                acc.add_(tmp, alpha=1.0 if c > 0 else -1.0)
    else:
        raise ValueError(f"unknown sign election {method!r} (use 'sum' or 'count')")
    return acc.ge_(0).mul_(2).sub_(1)
