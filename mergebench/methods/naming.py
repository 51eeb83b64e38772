"""Map a checkpoint tensor name to (layer index, module kind).

Covers the naming of Llama, Mistral, Qwen2/3, Gemma, Phi-3 and GPT-NeoX-style checkpoints;
anything unrecognised is ``other``. Pure string work so kernels can rely on it.
"""

from __future__ import annotations

import re

from .spec import ModuleKind

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")
_NORM = re.compile(r"(norm|ln_\d|ln_f|layernorm)", re.IGNORECASE)
_ATTN = re.compile(r"(self_attn|attention|attn|\.q_proj|\.k_proj|\.v_proj|\.o_proj|qkv)")
_MLP = re.compile(r"(mlp|feed_forward|ffn|gate_proj|up_proj|down_proj|experts)")
_EMBED = re.compile(r"(embed_tokens|wte|wpe|embed_in|embed_out|lm_head|word_embeddings|embeddings)")


def layer_index(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def module_kind(name: str) -> ModuleKind:
    if _NORM.search(name):
        return ModuleKind.NORM
    if _EMBED.search(name):
        return ModuleKind.EMBEDDING
    if _ATTN.search(name):
        return ModuleKind.ATTENTION
    if _MLP.search(name):
        return ModuleKind.MLP
    return ModuleKind.OTHER


def count_layers(names) -> int | None:
    idx = [i for i in (layer_index(n) for n in names) if i is not None]
    return max(idx) + 1 if idx else None
