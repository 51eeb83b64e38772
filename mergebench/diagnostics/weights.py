"""Weight-space diagnostics of a pool: task-vector norms, cosines and parameter-conflict metrics.

Everything is computed in one streaming pass over the checkpoints with the engine's reader
(:func:`mergebench.engine.checkpoint.open_checkpoint`): each tensor is read in row chunks, its
task vectors (``tau = theta - theta_base``) are formed in a preallocated float64 buffer, and
only sufficient statistics are kept (per-tensor Gram matrices of dot products, L1 norms,
pairwise L1 distances and sign-disagreement counts). Peak memory is one chunk per model, never a
whole model, and the sums are accumulated in float64 so the result does not depend on chunking.

Definitions (seed 004 §2 and App. A; tau_i = theta_i - theta_0, sums over every parameter):

* eq. 4  magnitude change ratio(i, j)             = ||theta_i - theta_j||_1 / (||tau_i||_1 + ||tau_j||_1)
* eq. 5  sign change ratio(i, j)                  = #[sign(tau_i) != sign(tau_j)] / #(parameters)
* eq. 6  conflicting magnitude change ratio(i, j) = ||(theta_i - theta_j)[sign(tau_i) != sign(tau_j)]||_1
                                                    / (||tau_i||_1 + ||tau_j||_1)
* eq. 7  average cosine(i, j) = Average over parameter tensors of  tau_i . tau_j / (||tau_i||_2 ||tau_j||_2)

``sign`` is the usual three-valued sign (sign(0) = 0), exactly as eq. 5 is written, so an entry
changed by one expert and left untouched by the other counts as a sign change. In eq. 7 the
paper averages over the models' parameters (tensors); a tensor whose task vector is zero in
either model has no cosine and is left out of the average (``avg_cosine_tensors`` says how many
entered). The global cosine (whole flattened task vectors, seed 001 App. D) and per-layer
cosines are reported as well, with counts of layers of positive / negative / ~zero cosine per
pair, where ~zero means ``|cos| <= zero_tol`` (default 1e-6) or undefined (a zero task vector).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..engine.checkpoint import Checkpoint, CheckpointError, open_checkpoint

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_ZERO_TOL",
    "WeightDiagnostics",
    "block_key",
    "task_vector_norm",
    "weight_diagnostics",
]

DEFAULT_CHUNK_BYTES = 64 * 1024**2
"""float64 bytes of task vectors held at once, over all models (bounds peak memory)."""
DEFAULT_ZERO_TOL = 1e-6
"""|cosine| at or below this counts as ~zero in the per-layer sign counts."""

_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_SUFFIX = re.compile(r"\.(weight|bias)$")


def block_key(name: str) -> str:
    """``layers.<i>`` for a tensor of transformer block i, else the module path (``model.norm``, ``lm_head``)."""
    m = _BLOCK.search(name)
    return f"layers.{int(m.group(1))}" if m else _SUFFIX.sub("", name)


class _StateReader:
    """A state dict behind the two members of Checkpoint the pass uses (``tensors`` shapes, ``read``)."""

    def __init__(self, label: str, state: Mapping[str, torch.Tensor]):
        self.label = label
        self._state = state
        self.tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name].dtype

    def read(self, name: str, r0: int, r1: int) -> torch.Tensor:
        t = self.tensors[name]
        return t[r0:r1] if t.ndim else t.reshape(1)

    def close(self) -> None:
        pass


class _CkptReader:
    def __init__(self, ckpt: Checkpoint, owned: bool):
        self.label = ckpt.label
        self.ckpt = ckpt
        self.owned = owned
        self.tensors = ckpt.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.ckpt.tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.ckpt.tensors[name].dtype

    def read(self, name: str, r0: int, r1: int) -> torch.Tensor:
        if not self.ckpt.tensors[name].shape:
            return self.ckpt.read(name).reshape(1)
        return self.ckpt.read(name, r0, r1)

    def close(self) -> None:
        if self.owned:
            self.ckpt.close()


def _reader(source: Any, label: str):
    if isinstance(source, Checkpoint):
        return _CkptReader(source, owned=False)
    if isinstance(source, Mapping):
        return _StateReader(label, source)
    if isinstance(source, (str, os.PathLike)):
        return _CkptReader(open_checkpoint(source, label), owned=True)
    raise TypeError(f"{label}: expected a checkpoint path, an opened Checkpoint or a state dict, got {type(source).__name__}")


def _safe_cos(gram: np.ndarray) -> np.ndarray:
    """Cosine matrix from a Gram matrix; NaN where a task vector is zero (cosine undefined)."""
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    denom = np.outer(norms, norms)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(denom > 0, gram / np.where(denom > 0, denom, 1.0), np.nan)
    return np.clip(cos, -1.0, 1.0)


@dataclass
class WeightDiagnostics:
    """Sufficient statistics of one pass, and the metrics derived from them.

    ``models`` = experts, then the merged model if one was given (it gets norms and cosines,
    not the pairwise conflict metrics, which are defined between experts). Index matrices with
    positions in ``models`` / ``experts``. All sums are float64 over every compared parameter.
    """

    models: list[str]
    experts: list[str]
    n_params: int
    gram: np.ndarray  # (m, m) global tau_i . tau_j
    tensor_gram: dict[str, np.ndarray]  # per tensor name
    tensor_numel: dict[str, int]
    l1: np.ndarray  # (m,) ||tau_i||_1
    pair_l1: np.ndarray  # (e, e) ||tau_i - tau_j||_1
    sign_diff: np.ndarray  # (e, e) #[sign(tau_i) != sign(tau_j)]
    conflict_l1: np.ndarray  # (e, e) ||(tau_i - tau_j)[sign differs]||_1
    zero_tol: float = DEFAULT_ZERO_TOL
    skipped: list[str] = field(default_factory=list)  # tensors not compared, with the reason

    # ---------------------------------------------------------------- grouping
    def group_gram(self, level: str = "block", key: Callable[[str], str] | None = None) -> dict[str, np.ndarray]:
        """Gram matrices summed per group: ``level`` 'block' (transformer layer) or 'tensor'."""
        if level == "tensor" and key is None:
            return dict(self.tensor_gram)
        if level != "block" and key is None:
            raise ValueError(f"level must be 'block' or 'tensor', got {level!r}")
        key = key or block_key
        out: dict[str, np.ndarray] = {}
        for name, g in self.tensor_gram.items():
            k = key(name)
            out[k] = out[k] + g if k in out else g.copy()
        return out

    # ---------------------------------------------------------------- metrics
    @property
    def norms(self) -> np.ndarray:
        """Global task-vector L2 norm ||theta_k - theta_base||_2 of each model."""
        return np.sqrt(np.clip(np.diag(self.gram), 0.0, None))

    @property
    def cosine(self) -> np.ndarray:
        """Global cosine similarity of the flattened task vectors (NaN for a zero task vector)."""
        return _safe_cos(self.gram)

    def layer_cosines(self, level: str = "block") -> dict[str, np.ndarray]:
        return {k: _safe_cos(g) for k, g in self.group_gram(level).items()}

    def layer_norms(self, level: str = "block") -> dict[str, np.ndarray]:
        return {k: np.sqrt(np.clip(np.diag(g), 0.0, None)) for k, g in self.group_gram(level).items()}

    def layer_sign_counts(self, level: str = "block") -> dict[str, np.ndarray]:
        """(m, m) counts of layers with cosine > tol, < -tol, and ~zero (|cos| <= tol or undefined)."""
        cos = np.stack(list(self.layer_cosines(level).values())) if self.tensor_gram else np.zeros((0,) * 3)
        pos = (cos > self.zero_tol).sum(0)
        neg = (cos < -self.zero_tol).sum(0)
        return {"positive": pos, "negative": neg, "zero": cos.shape[0] - pos - neg}

    def _pair_denominator(self) -> np.ndarray:
        e = len(self.experts)
        return self.l1[:e, None] + self.l1[None, :e]

    @staticmethod
    def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)

    @property
    def magnitude_change_ratio(self) -> np.ndarray:
        """Seed 004 eq. 4, (e, e)."""
        return self._ratio(self.pair_l1, self._pair_denominator())

    @property
    def sign_change_ratio(self) -> np.ndarray:
        """Seed 004 eq. 5, (e, e)."""
        return self.sign_diff / self.n_params if self.n_params else np.full_like(self.sign_diff, np.nan)

    @property
    def conflicting_magnitude_change_ratio(self) -> np.ndarray:
        """Seed 004 eq. 6, (e, e)."""
        return self._ratio(self.conflict_l1, self._pair_denominator())

    def average_cosine(self) -> tuple[np.ndarray, np.ndarray]:
        """Seed 004 eq. 7: (mean over tensors of the per-tensor cosine, number of tensors averaged), (m, m)."""
        m = len(self.models)
        if not self.tensor_gram:
            return np.full((m, m), np.nan), np.zeros((m, m), dtype=np.int64)
        cos = np.stack([_safe_cos(g) for g in self.tensor_gram.values()])
        ok = ~np.isnan(cos)
        count = ok.sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            avg = np.where(count > 0, np.where(ok, cos, 0.0).sum(0) / np.maximum(count, 1), np.nan)
        return avg, count

    def pairs(self) -> list[tuple[int, int]]:
        e = len(self.experts)
        return [(i, j) for i in range(e) for j in range(i + 1, e)]

    def conflict_table(self) -> list[dict[str, Any]]:
        """One dict per expert pair with the four seed-004 metrics, global cosine and layer sign counts."""
        avg, count = self.average_cosine()
        counts = self.layer_sign_counts("block")
        cos = self.cosine
        rows = []
        for i, j in self.pairs():
            rows.append({
                "model_a": self.experts[i], "model_b": self.experts[j],
                "magnitude_change_ratio": float(self.magnitude_change_ratio[i, j]),
                "sign_change_ratio": float(self.sign_change_ratio[i, j]),
                "conflicting_magnitude_change_ratio": float(self.conflicting_magnitude_change_ratio[i, j]),
                "average_cosine": float(avg[i, j]), "avg_cosine_tensors": int(count[i, j]),
                "cosine": float(cos[i, j]),
                "layers_positive": int(counts["positive"][i, j]), "layers_negative": int(counts["negative"][i, j]),
                "layers_zero": int(counts["zero"][i, j]),
            })
        return rows

    def rows(self, *, per_tensor: bool = False) -> list[dict[str, Any]]:
        """Long-format rows for the ``diagnostics`` store table (kind='weights')."""
        out: list[dict[str, Any]] = []

        def add(metric, value, model, model_b=None, layer=None, scope="global", n=None):
            v = float(value)
            out.append({"kind": "weights", "metric": metric, "model": model, "model_b": model_b, "layer": layer,
                        "scope": scope, "value": None if math.isnan(v) else v, "n": n})

        for k, name in enumerate(self.models):
            add("task_vector_l2", self.norms[k], name, n=self.n_params)
            add("task_vector_l1", self.l1[k], name, n=self.n_params)
        levels = ["block"] + (["tensor"] if per_tensor else [])
        for level in levels:
            for layer, nrm in self.layer_norms(level).items():
                for k, name in enumerate(self.models):
                    add("task_vector_l2", nrm[k], name, layer=layer, scope=level)
        cos = self.cosine
        m = len(self.models)
        for i in range(m):
            for j in range(i + 1, m):
                add("cosine", cos[i, j], self.models[i], self.models[j])
        for level in levels:
            for layer, c in self.layer_cosines(level).items():
                for i in range(m):
                    for j in range(i + 1, m):
                        add("cosine", c[i, j], self.models[i], self.models[j], layer=layer, scope=level)
        counts = self.layer_sign_counts("block")
        for i in range(m):
            for j in range(i + 1, m):
                for sign in ("positive", "negative", "zero"):
                    add(f"layers_{sign}_cosine", counts[sign][i, j], self.models[i], self.models[j], scope="block")
        avg, count = self.average_cosine()
        for i, j in self.pairs():
            a, b = self.experts[i], self.experts[j]
            add("magnitude_change_ratio", self.magnitude_change_ratio[i, j], a, b, n=self.n_params)
            add("sign_change_ratio", self.sign_change_ratio[i, j], a, b, n=self.n_params)
            add("conflicting_magnitude_change_ratio", self.conflicting_magnitude_change_ratio[i, j], a, b,
                n=self.n_params)
            add("average_cosine", avg[i, j], a, b, n=int(count[i, j]))
        return out


def weight_diagnostics(
    base: Any,
    experts: Mapping[str, Any] | Sequence[Any],
    merged: Any | None = None,
    *,
    merged_name: str = "merged",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    zero_tol: float = DEFAULT_ZERO_TOL,
    include: Callable[[str], bool] | None = None,
    device: str | torch.device = "cpu",
) -> WeightDiagnostics:
    """One streaming pass over ``base``, the ``experts`` and optionally a ``merged`` model.

    Each model is a checkpoint path (folder, ``.safetensors`` file or cached hub id), an opened
    :class:`Checkpoint`, or a state dict. Compared tensors are the floating-point tensors present
    in every model with the base's shape; others are listed in ``skipped``. ``include`` filters
    tensor names. Work happens in float64 on ``device``.
    """
    if isinstance(experts, Mapping):
        expert_items = list(experts.items())
    else:
        expert_items = [(f"expert_{i}", e) for i, e in enumerate(experts)]
    if len(expert_items) < 1:
        raise ValueError("weight_diagnostics needs at least one expert")
    names = [n for n, _ in expert_items]
    if merged is not None:
        if merged_name in names:
            raise ValueError(f"merged_name {merged_name!r} clashes with an expert name")
        names.append(merged_name)
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}")
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    device = torch.device(device)

    readers = []
    try:
        base_r = _reader(base, "base")
        readers.append(base_r)
        for name, src in expert_items:
            readers.append(_reader(src, f"expert {name}"))
        if merged is not None:
            readers.append(_reader(merged, merged_name))
        models = readers[1:]
        m, e = len(models), len(expert_items)

        skipped: list[str] = []
        tensors: list[str] = []
        for tname in base_r.tensors:
            if include is not None and not include(tname):
                continue
            if not base_r.dtype(tname).is_floating_point:
                skipped.append(f"{tname}: not floating point")
                continue
            missing = [r.label for r in models if tname not in r.tensors]
            if missing:
                skipped.append(f"{tname}: missing in {', '.join(missing)}")
                continue
            shape = base_r.shape(tname)
            bad = [f"{r.label} {r.shape(tname)}" for r in models if r.shape(tname) != shape]
            if bad:
                raise CheckpointError(f"tensor {tname!r}: base has shape {shape} but {'; '.join(bad)}")
            tensors.append(tname)
        for r in models:
            extra = sorted(set(r.tensors) - set(base_r.tensors))
            if extra:
                skipped.append(f"{r.label}: {len(extra)} tensor(s) absent from the base, e.g. {extra[0]}")

        # buffers: m task-vector rows, base, |diff|, e sign rows (+ bool mask): about 2m + 3 float64 rows
        max_chunk = max(1, chunk_bytes // (8 * (2 * m + 3)))
        buf = torch.empty((m, max_chunk), dtype=torch.float64, device=device)
        base_buf = torch.empty(max_chunk, dtype=torch.float64, device=device)
        diff = torch.empty(max_chunk, dtype=torch.float64, device=device)

        gram = np.zeros((m, m))
        l1 = torch.zeros(m, dtype=torch.float64, device=device)
        pair_l1 = torch.zeros((e, e), dtype=torch.float64, device=device)
        sign_diff = torch.zeros((e, e), dtype=torch.int64, device=device)
        conflict_l1 = torch.zeros((e, e), dtype=torch.float64, device=device)
        tensor_gram: dict[str, np.ndarray] = {}
        tensor_numel: dict[str, int] = {}
        n_params = 0
        pairs = [(i, j) for i in range(e) for j in range(i + 1, e)]

        for tname in tensors:
            shape = base_r.shape(tname)
            rows = shape[0] if shape else 1
            row_numel = math.prod(shape[1:]) if len(shape) > 1 else 1
            step = max(1, max_chunk // row_numel)
            if step * row_numel > max_chunk:  # one row exceeds the chunk: grow the buffers for it
                max_chunk = row_numel
                buf = torch.empty((m, max_chunk), dtype=torch.float64, device=device)
                base_buf = torch.empty(max_chunk, dtype=torch.float64, device=device)
                diff = torch.empty(max_chunk, dtype=torch.float64, device=device)
            tg = torch.zeros((m, m), dtype=torch.float64, device=device)
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                n = (r1 - r0) * row_numel
                b = base_buf[:n]
                b.copy_(base_r.read(tname, r0, r1).reshape(-1))
                T = buf[:, :n]
                for k, r in enumerate(models):
                    T[k].copy_(r.read(tname, r0, r1).reshape(-1))
                T.sub_(b)
                tg.add_(T @ T.T)
                l1.add_(torch.linalg.vector_norm(T, ord=1, dim=1))
                if pairs:
                    S = torch.sign(T[:e])
                    d = diff[:n]
                    for i, j in pairs:
                        torch.sub(T[i], T[j], out=d)
                        d.abs_()
                        pair_l1[i, j] += d.sum()
                        mask = S[i] != S[j]
                        sign_diff[i, j] += mask.sum()
                        conflict_l1[i, j] += d.masked_fill_(~mask, 0.0).sum()
                n_params += n
            g = tg.cpu().numpy()
            tensor_gram[tname] = g
            tensor_numel[tname] = rows * row_numel
            gram += g
    finally:
        for r in readers:
            r.close()

    def sym(t: torch.Tensor) -> np.ndarray:
        a = t.cpu().numpy()
        return a + a.T

    return WeightDiagnostics(
        models=names, experts=[n for n, _ in expert_items], n_params=n_params, gram=gram,
        tensor_gram=tensor_gram, tensor_numel=tensor_numel, l1=l1.cpu().numpy(), pair_l1=sym(pair_l1),
        sign_diff=sym(sign_diff), conflict_l1=sym(conflict_l1), zero_tol=zero_tol, skipped=skipped,
    )


def task_vector_norm(base: Any, model: Any, *, device: str | torch.device = "cpu") -> float:
    """``||theta_model - theta_base||_2`` over the floating-point tensors the two share (float64).

    Seed 001 (Fig. 4) plots it against the merge size: how far a merge moves from the base.
    ``base`` and ``model`` are checkpoint paths, opened checkpoints or state dicts.
    """
    return float(weight_diagnostics(base, {"model": model}, device=device).norms[0])

