"""Deterministic fine-tuning of one ``wild`` pool expert: LoRA, or full-parameter on chosen modules.

The ``wild`` pool mixes near experts (small LoRA updates) with far ones (full-parameter
fine-tunes of some modules of some layers, or large-rank LoRA at a high learning rate), so that
task-vector norms span more than an order of magnitude and spherical merges (Karcher) differ
measurably from linear ones -- which needs per-tensor ``||delta|| / ||theta_base||`` of a few
percent (the small-angle expansion of the Karcher mean).

An expert trains on ``data`` sources: ``task:<embedded task>`` (the train split of a scored
embedded task, in the format lm-eval scores) or ``wild:<source>`` (a committed file of
``suites/wild/data``, see :mod:`mergebench.zoo.wild_data`).  The loss covers the answer tokens
only.  Initialisation, example order and batches derive from ``spec.seed`` alone (the global
torch RNG is forked and restored), dropout is off: the same spec on the same machine and
thread count gives the same weights.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field

import torch

from ..errors import MergebenchError
from .tasks import load_split, training_text
from .train import pad_examples
from .wild_data import load_rows

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODES = ("lora", "full")

__all__ = ["MODES", "MODULES", "WildSpec", "WildSpecError", "examples", "full_delta", "train"]


class WildSpecError(MergebenchError, ValueError):
    """A wild expert's specification is inconsistent (its message names the expert and the field)."""


@dataclass(frozen=True)
class WildSpec:
    """One expert of the wild pool.

    ``mode="lora"``: peft LoRA of ``rank`` (alpha ``alpha``, default 2 x rank) on ``modules``.
    ``mode="full"``: every weight of ``modules`` in ``layers`` is trained (nothing else).
    ``layers``: (first, last) decoder layer, inclusive; None is every layer.
    """

    name: str
    data: tuple[str, ...]
    mode: str = "lora"
    modules: tuple[str, ...] = MODULES
    layers: tuple[int, int] | None = None
    rank: int = 8
    alpha: float | None = None
    steps: int = 60
    lr: float = 1e-3
    seed: int = 0
    batch_size: int = 8
    max_len: int = 64
    max_examples: int | None = None
    tags: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "data", tuple([self.data] if isinstance(self.data, str) else self.data))
        object.__setattr__(self, "modules", tuple([self.modules] if isinstance(self.modules, str) else self.modules))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))
        if self.mode not in MODES:
            raise WildSpecError(f"{self.name}: mode must be one of {MODES}, got {self.mode!r}")
        bad = [m for m in self.modules if m not in MODULES]
        if bad or not self.modules:
            raise WildSpecError(f"{self.name}: modules must be a non-empty subset of {MODULES}, got {self.modules}")
        if not self.data or any(not d.startswith(("task:", "wild:")) for d in self.data):
            raise WildSpecError(f"{self.name}: data entries must start with 'task:' or 'wild:', got {self.data}")
        for k in ("steps", "rank", "batch_size", "max_len"):
            if getattr(self, k) < 1:
                raise WildSpecError(f"{self.name}: {k} must be >= 1, got {getattr(self, k)}")
        if not self.lr > 0:
            raise WildSpecError(f"{self.name}: lr must be > 0, got {self.lr}")
        if self.layers is not None and (len(self.layers) != 2 or self.layers[0] > self.layers[1] or self.layers[0] < 0):
            raise WildSpecError(f"{self.name}: layers must be (first, last) with 0 <= first <= last, got {self.layers}")

    @property
    def scored_tasks(self) -> tuple[str, ...]:
        """Embedded (scored) tasks whose train split this expert sees."""
        return tuple(d.removeprefix("task:") for d in self.data if d.startswith("task:"))

    def layer_list(self, n_layers: int) -> list[int]:
        lo, hi = self.layers if self.layers is not None else (0, n_layers - 1)
        if hi >= n_layers:
            raise WildSpecError(f"{self.name}: layers {self.layers} but the model has {n_layers}")
        return list(range(lo, hi + 1))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["data"], d["modules"] = list(self.data), list(self.modules)
        d["layers"] = list(self.layers) if self.layers is not None else None
        return d


def _pairs(spec: WildSpec) -> list[tuple[str, str]]:
    """(prompt, answer) rows of every data source, at most ``max_examples`` per source."""
    out = []
    for d in spec.data:
        kind, _, name = d.partition(":")
        if kind == "task":
            rows = load_split(name, "train")[: spec.max_examples]
            out += [p for r in rows for p in training_text(r)]
        else:
            out += [(r["prompt"], r["answer"]) for r in load_rows(name)[: spec.max_examples]]
    return out


def examples(spec: WildSpec, tok) -> list[tuple[list[int], int]]:
    """Tokenised (ids, n_prompt) examples; the prompt's own encoding gives the loss boundary
    (as lm-eval splits context and continuation), EOS ends the answer, ``max_len`` cuts."""
    out = []
    for prompt, answer in _pairs(spec):
        whole = tok(prompt + answer)["input_ids"] + [tok.eos_token_id]
        n_prompt = len(tok(prompt)["input_ids"]) if prompt else 0
        if n_prompt < spec.max_len - 1:
            out.append((whole[: spec.max_len], n_prompt))
    if not out:
        raise WildSpecError(f"{spec.name}: no training examples in {spec.data}")
    return out


def _full_params(spec: WildSpec, model) -> dict[str, torch.nn.Parameter]:
    layers = set(spec.layer_list(model.config.num_hidden_layers))
    out = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        if "layers" in parts:
            i = int(parts[parts.index("layers") + 1])
            if i in layers and parts[-2] in spec.modules and parts[-1] == "weight":
                out[name] = p
    return out


def _prepare(spec: WildSpec, model):
    """(trainable model, trainable parameters); the LoRA init is seeded by ``spec.seed``."""
    for p in model.parameters():
        p.requires_grad_(False)
    if spec.mode == "full":
        params = _full_params(spec, model)
        for p in params.values():
            p.requires_grad_(True)
        return model, list(params.values())
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=spec.rank, lora_alpha=spec.alpha if spec.alpha is not None else 2 * spec.rank,
                     target_modules=list(spec.modules), lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                     layers_to_transform=spec.layer_list(model.config.num_hidden_layers) if spec.layers else None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = get_peft_model(model, cfg)
    return model, [p for p in model.parameters() if p.requires_grad]


@dataclass
class Trained:
    spec: WildSpec
    model: object  # the plain model (full) or the peft model (lora)
    losses: list[float]
    seconds: float
    n_examples: int
    n_tokens: int

    @property
    def final_loss(self) -> float:
        tail = max(1, len(self.losses) // 10)
        return sum(self.losses[-tail:]) / tail


def train(spec: WildSpec, base_model, tok, log=None) -> Trained:
    """Fine-tune a private copy of ``base_model``: AdamW (no weight decay), linear warm-up over
    the first tenth then linear decay to zero, gradient-norm clip 1.0."""
    model = copy.deepcopy(base_model)
    model.train()
    model, params = _prepare(spec, model)
    exs = examples(spec, tok)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    warm = spec.steps // 10
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / (warm + 1) if s < warm else max(0.0, (spec.steps - s) / max(1, spec.steps - warm)))
    gen = torch.Generator().manual_seed(spec.seed)
    order: list[int] = []
    losses, n_tokens = [], 0
    t0 = time.perf_counter()
    for step in range(spec.steps):
        if len(order) < spec.batch_size:
            order += torch.randperm(len(exs), generator=gen).tolist()
        chunk, order = [exs[j] for j in order[: spec.batch_size]], order[spec.batch_size:]
        ids, mask, labels = pad_examples(chunk, pad_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{spec.name}: loss is {loss.item()} at step {step}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        n_tokens += int(mask.sum())
        if log and (step + 1) % max(1, spec.steps // 5) == 0:
            log(f"[{spec.name}] step {step + 1}/{spec.steps} loss {losses[-1]:.4f} "
                f"({(step + 1) / (time.perf_counter() - t0):.2f} steps/s)")
    model.eval()
    for p in params:
        p.requires_grad_(False)
    return Trained(spec, model, losses, time.perf_counter() - t0, len(exs), n_tokens)


def full_delta(spec: WildSpec, trained_model, base_model) -> dict[str, torch.Tensor]:
    """theta - theta_base of the trained weights of a ``mode="full"`` expert (float32)."""
    base = dict(base_model.named_parameters())
    return {k: (p.detach() - base[k].detach()).contiguous() for k, p in _full_params(spec, trained_model).items()}
