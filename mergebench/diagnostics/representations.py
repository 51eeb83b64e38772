"""Representation-space diagnostics (seed 004 §3.4): hidden-state distances, HiddenSim, MDS.

Every model runs the same probe set (seed 004: k = 5 documents per task, pooled into one
validation set) and its hidden states at one layer (the last by default) are compared:

    d_ij = Average over probe documents x of  dist(h_i(x), h_j(x))

``pooling="tokens"`` (default) averages, within a document, the distance of each token's hidden
state (the inputs are shared, so tokens align); ``"mean"`` mean-pools the tokens first, ``"last"``
uses the last token. The paper says "normalized L2 distance" without the normaliser;
``normalize="dim"`` (default) divides by sqrt(hidden size), ``"none"`` does not, ``"norm"`` divides
by the mean L2 norm of the two vectors compared. A global factor such as sqrt(d) cancels in
eq. 2, so HiddenSim and MDS are the same under "dim" and "none".

    HiddenSim(i, j) = 1 if i = j, else (max(D) - d_ij) / (max(D) - min(D))      (seed 004 eq. 2)
    MDS_i = 1 / Average_{j != i} HiddenSim(i, j)                                (seed 004 eq. 3)

D is the set of off-diagonal distances of the group. With two models (or all distances equal)
eq. 2 divides 0 by 0: those entries are NaN. MDS is +inf for a model whose similarities to all
others are 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["hidden_distance_matrix", "hidden_sim", "merging_difficulty", "representation_rows"]

_POOLINGS = ("tokens", "mean", "last")
_NORMS = ("dim", "none", "norm")


def _per_doc(h: torch.Tensor, doc_index: torch.Tensor, pooling: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(vectors, doc id per vector): all token rows, or one pooled row per document."""
    if pooling == "tokens":
        return h, doc_index
    docs, inv = torch.unique(doc_index, return_inverse=True)
    if pooling == "mean":
        sums = torch.zeros((len(docs), h.shape[1]), dtype=h.dtype, device=h.device).index_add_(0, inv, h)
        counts = torch.bincount(inv, minlength=len(docs)).to(h.dtype).unsqueeze(1)
        return sums / counts, torch.arange(len(docs))
    pos = torch.arange(h.shape[0], device=h.device)
    last = torch.full((len(docs),), -1, dtype=torch.long).scatter_reduce_(0, inv, pos, "amax")
    return h[last], torch.arange(len(docs))


def hidden_distance_matrix(
    states: Mapping[str, torch.Tensor],
    doc_index: torch.Tensor,
    *,
    pooling: str = "tokens",
    normalize: str = "dim",
) -> tuple[list[str], np.ndarray]:
    """Pairwise average hidden-state distances d_ij of the models in ``states``.

    ``states[name]`` is (rows, d): the hidden states of one model at one layer, rows aligned
    across models (same probe inputs, same tokenizer), ``doc_index`` the document of each row
    (as returned by :func:`~mergebench.diagnostics.activations.collect_hidden_states`).
    Computed in float64. Returns (names, symmetric (n, n) matrix with zero diagonal).
    """
    if pooling not in _POOLINGS:
        raise ValueError(f"pooling must be one of {_POOLINGS}, got {pooling!r}")
    if normalize not in _NORMS:
        raise ValueError(f"normalize must be one of {_NORMS}, got {normalize!r}")
    names = list(states)
    if len(names) < 2:
        raise ValueError("hidden-state distances need at least two models")
    doc_index = doc_index.to(torch.long).cpu()
    shape = tuple(states[names[0]].shape)
    for n in names:
        if tuple(states[n].shape) != shape:
            raise ValueError(f"hidden states of {n!r} have shape {tuple(states[n].shape)}, expected {shape} "
                             "(all models must see the same probe tokens)")
    if shape[0] != doc_index.shape[0]:
        raise ValueError(f"{shape[0]} hidden-state rows but doc_index has {doc_index.shape[0]}")
    vecs = {}
    for n in names:
        v, vdoc = _per_doc(states[n].to(torch.float64), doc_index, pooling)
        vecs[n] = v
    _, inv = torch.unique(vdoc, return_inverse=True)
    n_docs = int(inv.max()) + 1
    per_doc_count = torch.bincount(inv, minlength=n_docs).to(torch.float64)
    d = shape[1]
    D = np.zeros((len(names), len(names)))
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            va, vb = vecs[names[a]], vecs[names[b]]
            dist = torch.linalg.vector_norm(va - vb, dim=1)
            if normalize == "dim":
                dist = dist / d**0.5
            elif normalize == "norm":
                scale = 0.5 * (torch.linalg.vector_norm(va, dim=1) + torch.linalg.vector_norm(vb, dim=1))
                dist = torch.where(scale > 0, dist / torch.where(scale > 0, scale, 1.0), torch.zeros_like(dist))
            per_doc = torch.zeros(n_docs, dtype=torch.float64).index_add_(0, inv, dist) / per_doc_count
            D[a, b] = D[b, a] = float(per_doc.mean())
    return names, D


def hidden_sim(D: np.ndarray) -> np.ndarray:
    """Seed 004 eq. 2 from a symmetric distance matrix (diagonal ignored)."""
    D = np.asarray(D, dtype=np.float64)
    n = D.shape[0]
    if D.shape != (n, n):
        raise ValueError(f"distance matrix must be square, got {D.shape}")
    off = ~np.eye(n, dtype=bool)
    S = np.eye(n)
    if n < 2:
        return S
    lo, hi = D[off].min(), D[off].max()
    S[off] = (hi - D[off]) / (hi - lo) if hi > lo else np.nan
    return S


def merging_difficulty(S: np.ndarray) -> np.ndarray:
    """Seed 004 eq. 3: MDS_i = 1 / mean_{j != i} HiddenSim(i, j)."""
    S = np.asarray(S, dtype=np.float64)
    n = S.shape[0]
    off = ~np.eye(n, dtype=bool)
    avg = np.array([S[i][off[i]].mean() if n > 1 else np.nan for i in range(n)])
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(avg == 0, np.inf, 1.0 / avg)


def representation_rows(
    names: Sequence[str], D: np.ndarray, *, layer: str = "last", tasks: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """Long-format rows (kind='representations'): distances, HiddenSim per pair, MDS per model/task."""
    S = hidden_sim(D)
    mds = merging_difficulty(S)
    rows: list[dict[str, Any]] = []

    def val(x: float) -> float | None:
        return None if np.isnan(x) else float(x)

    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            base = {"kind": "representations", "model": names[i], "model_b": names[j], "layer": layer,
                    "scope": "layer"}
            rows.append({**base, "metric": "hidden_distance", "value": val(D[i, j])})
            rows.append({**base, "metric": "hidden_sim", "value": val(S[i, j])})
    for i, n in enumerate(names):
        rows.append({"kind": "representations", "metric": "mds", "model": n, "layer": layer, "scope": "layer",
                     "task": (tasks or {}).get(n), "value": val(mds[i])})
    return rows
