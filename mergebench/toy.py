"""Tiny random Llama checkpoints: unit-test fixtures and the bundled merge example.

They are *not* models anyone should evaluate; they exist so the engine, the CLI and the
mergekit differential tests run in seconds with no download. A byte-level tokenizer with
no merges is written beside them so the folders are complete HF checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_CONFIG = dict(
    vocab_size=260,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges (256 bytes + 4 specials); needs no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {tok: i for i, tok in enumerate(bytes_to_unicode().values())}
    for s in specials:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_llama_state(seed: int, config: dict | None = None) -> tuple[dict[str, torch.Tensor], object]:
    """A randomly initialised tiny Llama state dict and its config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**TINY_CONFIG, **(config or {})})
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, cfg


def write_checkpoint(
    path: str | Path,
    state: dict[str, torch.Tensor],
    config,
    *,
    max_shard_bytes: int | None = None,
    dtype: torch.dtype | None = None,
    tokenizer: bool = True,
) -> Path:
    """Write ``state`` as an HF folder: ``model.safetensors`` or shards + index, config, tokenizer."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in state.items()}
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    if dtype is not None:
        cfg["dtype"] = str(dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    if max_shard_bytes is None:
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for k, v in state.items():
            nbytes = v.numel() * v.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][k] = v
            size += nbytes
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(path / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        total = sum(v.numel() * v.element_size() for v in state.values())
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    if tokenizer:
        byte_tokenizer().save_pretrained(str(path))
    return path


def make_tiny_pool(root: str | Path, n_experts: int = 3, *, seed: int = 0, delta_scale: float = 0.02, **write_kw) -> tuple[Path, list[Path]]:
    """A base and ``n_experts`` experts (base + small random deltas) under ``root``."""
    root = Path(root)
    state, cfg = tiny_llama_state(seed)
    base = write_checkpoint(root / "base", state, cfg, **write_kw)
    experts = []
    for i in range(n_experts):
        g = torch.Generator().manual_seed(seed * 1000 + i + 1)
        expert = {k: v + delta_scale * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in state.items()}
        experts.append(write_checkpoint(root / f"expert_{i}", expert, cfg, **write_kw))
    return base, experts
