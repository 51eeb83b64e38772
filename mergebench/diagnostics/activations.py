"""Activation-collapse diagnostics per layer (seed 000 §4.2 Q4, Fig. 2 and Table 7).

For one model and one layer, X (tokens x hidden) holds the hidden states of every non-padding
token of the probe inputs. With X_c = X minus its column means (``center=True``), singular
values s_1 >= s_2 >= ... of X_c, and lambda_k = s_k^2 / (N - 1) the eigenvalues of the
activation covariance C = X_c^T X_c / (N - 1):

* mean            mean of all entries of X (uncentred)
* variance        mean per-feature variance, trace(C) / d
* effective rank  exp(H(p)), p_k = lambda_k / sum(lambda): the entropy of the normalised singular
                  values of the covariance (Roy & Vetterli 2007; seed 000 Fig. 2 computes it "of
                  the activation covariance"). ``spectrum="activations"`` uses p_k = s_k / sum(s)
                  (singular values of X_c itself) instead.
* stable rank     ||X_c||_F^2 / ||X_c||_2^2 = sum(lambda) / max(lambda)
* participation ratio  (sum lambda)^2 / sum(lambda^2)
* numerical rank  #{s_k > tol * s_1}, tol = ``rank_rtol`` or, by default, max(N, d) times the
                  machine epsilon of the dtype the hidden states came in (the ``matrix_rank``
                  convention: below that, singular values are rounding noise of the data).

Seed 000 reports each as mean ± std over bootstrap draws of the probe inputs;
:func:`activation_diagnostics` draws probe documents with replacement (all tokens of a drawn
document enter), from a seeded ``torch.Generator`` so runs repeat exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from .errors import DiagnosticsError

__all__ = [
    "ACTIVATION_METRICS",
    "activation_diagnostics",
    "activation_metrics",
    "activation_rows",
    "collect_hidden_states",
    "tokenize_probes",
]

ACTIVATION_METRICS = ("mean", "variance", "effective_rank", "stable_rank", "participation_ratio", "numerical_rank")


def activation_metrics(
    x: torch.Tensor,
    *,
    center: bool = True,
    spectrum: str = "covariance",
    rank_rtol: float | None = None,
    source_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """The six metrics of one activation matrix ``x`` (rows = tokens, columns = features).

    Computed in float64 (singular values straight from X_c, not from the Gram matrix, whose
    squared condition number would blur the numerical rank). ``source_dtype`` (default: x's
    dtype) sets the default rank tolerance.
    """
    if x.ndim != 2:
        raise ValueError(f"activation matrix must be 2-D (tokens x features), got shape {tuple(x.shape)}")
    if spectrum not in ("covariance", "activations"):
        raise ValueError(f"spectrum must be 'covariance' or 'activations', got {spectrum!r}")
    n, d = x.shape
    if n < 2:
        raise ValueError(f"need at least 2 activation rows, got {n}")
    src = source_dtype or x.dtype
    eps = torch.finfo(src).eps if src.is_floating_point else torch.finfo(torch.float64).eps
    x = x.to(torch.float64)
    mean = x.mean()
    xc = x - x.mean(0, keepdim=True) if center else x
    s = torch.linalg.svdvals(xc)
    lam = s.square()
    total = lam.sum()
    out = {"mean": float(mean), "variance": float(total / ((n - 1) * d))}
    if total <= 0:  # constant activations: no spread, every rank is 0
        out.update(effective_rank=0.0, stable_rank=0.0, participation_ratio=0.0, numerical_rank=0.0)
        return out
    w = lam if spectrum == "covariance" else s
    p = w / w.sum()
    entropy = -torch.special.xlogy(p, p).sum()
    tol = (rank_rtol if rank_rtol is not None else max(n, d) * eps) * s[0]
    out.update(
        effective_rank=float(torch.exp(entropy)),
        stable_rank=float(total / lam[0]),
        participation_ratio=float(total.square() / lam.square().sum()),
        numerical_rank=float((s > tol).sum()),
    )
    return out


def tokenize_probes(tokenizer, texts: Sequence[str], *, max_length: int = 256) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` for the probe texts (truncated to ``max_length``)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@torch.no_grad()
def collect_hidden_states(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    layers: Iterable[int] | None = None,
    batch_size: int = 8,
    out_dtype: torch.dtype = torch.float32,
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Hidden states of every non-padding token, per layer, from a transformers model.

    Runs the model with ``output_hidden_states=True`` in batches; ``hidden_states[0]`` is the
    embedding output and ``hidden_states[L]`` the output of block L (the last one after the final
    norm in HF Llama). Negative layer indices count from the end. Returns ({layer: (rows, d)
    tensor on CPU in ``out_dtype``}, doc_index (rows,) saying which input each row came from).
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks: dict[int, list[torch.Tensor]] = {}
    doc_chunks: list[torch.Tensor] = []
    wanted: list[int] | None = None
    try:
        for b0 in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[b0 : b0 + batch_size].to(device)
            mask = attention_mask[b0 : b0 + batch_size].to(device)
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
            hs = out.hidden_states
            if wanted is None:
                n = len(hs)
                req = range(n) if layers is None else layers
                wanted = []
                for layer in req:
                    k = layer + n if layer < 0 else layer
                    if not 0 <= k < n:
                        raise DiagnosticsError(f"layer {layer} is out of range: the model returns {n} hidden states")
                    if k not in wanted:
                        wanted.append(k)
            keep = mask.bool()
            for k in wanted:
                chunks.setdefault(k, []).append(hs[k][keep].to("cpu", out_dtype))
            rows_doc = torch.arange(b0, b0 + ids.shape[0]).unsqueeze(1).expand_as(keep.cpu())
            doc_chunks.append(rows_doc[keep.cpu()])
            del out, hs
    finally:
        model.train(was_training)
    return {k: torch.cat(v) for k, v in chunks.items()}, torch.cat(doc_chunks)


def activation_diagnostics(
    hidden: Mapping[int, torch.Tensor],
    doc_index: torch.Tensor,
    *,
    n_boot: int = 20,
    seed: int = 0,
    center: bool = True,
    spectrum: str = "covariance",
    rank_rtol: float | None = None,
    device: str | torch.device | None = None,
) -> dict[int, dict[str, dict[str, Any]]]:
    """Per layer and metric: ``{"value": on all probes, "mean", "std", "n_boot"}``.

    Each bootstrap draw samples as many documents as there are, with replacement, and computes
    the metrics on the rows of the drawn documents (a document drawn twice enters twice). ``std``
    is the sample standard deviation over draws (NaN when n_boot < 2).
    """
    doc_index = doc_index.to(torch.long).cpu()
    docs = torch.unique(doc_index)
    rows_of = [torch.nonzero(doc_index == d_, as_tuple=True)[0] for d_ in docs.tolist()]
    gen = torch.Generator().manual_seed(seed)
    draws = [torch.randint(len(docs), (len(docs),), generator=gen) for _ in range(n_boot)]
    result: dict[int, dict[str, dict[str, Any]]] = {}
    for layer, h in hidden.items():
        if h.shape[0] != doc_index.shape[0]:
            raise ValueError(f"layer {layer}: {h.shape[0]} rows but doc_index has {doc_index.shape[0]}")
        src = h.dtype
        h = h.to(device) if device is not None else h
        kw = dict(center=center, spectrum=spectrum, rank_rtol=rank_rtol, source_dtype=src)
        full = activation_metrics(h, **kw)
        boot = {k: [] for k in ACTIVATION_METRICS}
        for draw in draws:
            idx = torch.cat([rows_of[i] for i in draw.tolist()]).to(h.device)
            vals = activation_metrics(h.index_select(0, idx), **kw)
            for k in ACTIVATION_METRICS:
                boot[k].append(vals[k])
        layer_out = {}
        for k in ACTIVATION_METRICS:
            b = torch.tensor(boot[k], dtype=torch.float64)
            layer_out[k] = {
                "value": full[k],
                "mean": float(b.mean()) if n_boot else full[k],
                "std": float(b.std()) if n_boot >= 2 else float("nan"),
                "n_boot": n_boot,
            }
        result[layer] = layer_out
    return result


def activation_rows(model: str, diag: Mapping[int, Mapping[str, Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Long-format rows (kind='activations') for the ``diagnostics`` store table."""
    rows = []
    for layer, metrics in diag.items():
        for metric, v in metrics.items():
            rows.append({"kind": "activations", "metric": metric, "model": model, "layer": f"hidden.{layer}",
                         "scope": "layer", "value": v["mean"], "std": v["std"], "point": v["value"],
                         "n": v["n_boot"]})
    return rows
