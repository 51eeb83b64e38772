"""Turn a merged state dict into a ``transformers`` model without a round trip through disk.

The model is built from the base's config (as updated by the merge: vocabulary size, tying,
dtype) with weight initialisation skipped, then the merged tensors are *assigned* with
``load_state_dict(strict=True, assign=True)``: no second copy of the weights is made, and a
missing or unexpected tensor is an error rather than a silently random weight.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from .checkpoint import resolve_model_path
from .merge import MergeResult

__all__ = ["load_merged_model"]


def _alias_tied(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Fill keys of tied parameters (e.g. ``lm_head.weight``) missing from ``state`` from their twin."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    for names in groups.values():
        present = [n for n in names if n in state]
        if present:
            for n in names:
                state.setdefault(n, state[present[0]])


def load_merged_model(
    merged: MergeResult | Mapping[str, torch.Tensor],
    base_path: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    tokenizer: bool = True,
):
    """Return ``(model, tokenizer)`` for an in-memory merge (``tokenizer`` is None if not asked).

    ``merged`` is a :class:`MergeResult` from ``merge(..., out=None)`` (its output config and
    reference folder are used) or a plain state dict, in which case ``base_path`` supplies the
    config and tokenizer. ``dtype`` defaults to the merged tensors' dtype. With a MergeResult
    and no dtype conversion the model's parameters share memory with ``result.state_dict``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights

    import transformers

    config_dict = None
    if isinstance(merged, MergeResult):
        if merged.state_dict is None:
            raise ValueError(f"this merge was written to {merged.out}; load it with from_pretrained, or merge with out=None")
        state, config_dict = dict(merged.state_dict), merged.config
        base_path = base_path if base_path is not None else merged.reference_path
    else:
        state = dict(merged)
    if base_path is None:
        raise ValueError("base_path is needed to load a plain state dict (it supplies config and tokenizer)")
    folder = resolve_model_path(base_path)
    config = AutoConfig.for_model(**config_dict) if config_dict else AutoConfig.from_pretrained(folder)

    if dtype is None:
        dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}

    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    with no_init_weights():
        model = (cls or AutoModelForCausalLM)._from_config(config, dtype=dtype)
    model.tie_weights()
    _alias_tied(model, state)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()  # assign=True replaced the shared Parameter objects by separate ones
    model.to(device).eval()
    tok = AutoTokenizer.from_pretrained(folder) if tokenizer else None
    return model, tok
