"""Deterministic LoRA fine-tuning of one expert on the embedded task data (CPU-friendly).

An expert is described by a small :class:`ExpertSpec` (tasks, steps, learning rate, rank,
target modules, seed, batch size, maximum sequence length).  Training reads only the ``train``
split, in exactly the text format lm-eval scores (``query`` + ``" " + gold choice``; the loss
covers the answer tokens only), so an expert that learns its task shows it on the
``validation``/``test`` splits.  Batches are padded to their own longest sequence, not to
``max_len``: the prompts are short, and on CPU the step time is proportional to the tokens.

Determinism: the LoRA initialisation, the example order and every batch derive from
``spec.seed`` alone (the global torch RNG is forked and restored), dropout is off, so the same
spec on the same machine and thread count gives the same adapter.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .tasks import load_split, training_text

TARGETS = {
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}

OBJECTIVES = ("lm", "rank")

__all__ = ["OBJECTIVES", "TARGETS", "ExpertSpec", "TrainResult", "build_examples", "pad_examples", "score_mc", "train_expert"]


@dataclass(frozen=True)
class ExpertSpec:
    """What to train.  ``tasks`` are embedded data folders (``capitals``) or lm-eval names (``mb_capitals``).

    ``use_solution``: GSM8K rows also train on their worked solution (a second example).
    ``flip_labels``: two-choice rows train on the *wrong* choice (a deliberately conflicting
    expert, e.g. inverted sentiment).  ``max_examples`` caps the training rows per task.
    """

    name: str
    tasks: tuple[str, ...]
    steps: int = 80
    lr: float = 1e-3
    rank: int = 8
    alpha: float | None = None  # default 2 * rank
    targets: str = "all"
    seed: int = 0
    batch_size: int = 8
    max_len: int = 128
    warmup: int | None = None  # default steps // 10
    weight_decay: float = 0.0
    use_solution: bool = False
    flip_labels: bool = False
    max_examples: int | None = None
    objective: str = "lm"
    tags: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if isinstance(self.tasks, str):
            object.__setattr__(self, "tasks", (self.tasks,))
        else:
            object.__setattr__(self, "tasks", tuple(self.tasks))
        if self.targets not in TARGETS:
            raise ValueError(f"{self.name}: targets must be one of {sorted(TARGETS)}, got {self.targets!r}")
        for k in ("steps", "rank", "batch_size", "max_len"):
            if getattr(self, k) < 1:
                raise ValueError(f"{self.name}: {k} must be >= 1, got {getattr(self, k)}")
        if not self.lr > 0:
            raise ValueError(f"{self.name}: lr must be > 0, got {self.lr}")
        if not self.tasks:
            raise ValueError(f"{self.name}: at least one task is needed")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"{self.name}: objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.objective == "rank" and (self.use_solution or self.flip_labels):
            raise ValueError(f"{self.name}: objective='rank' cannot be combined with use_solution or flip_labels")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tasks"] = list(self.tasks)
        return d


@dataclass
class TrainResult:
    spec: ExpertSpec
    model: object  # a peft PeftModel wrapping a private copy of the base
    final_loss: float  # mean loss over the last max(1, steps // 10) steps
    losses: list[float]
    seconds: float
    n_examples: int
    n_tokens: int  # non-padding tokens processed

    @property
    def steps_per_s(self) -> float:
        return len(self.losses) / self.seconds if self.seconds > 0 else float("inf")

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The LoRA tensors (peft's names), detached copies."""
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model).items()}

    def save_adapter(self, folder: str | Path) -> Path:
        """peft adapter folder (adapter_config.json + adapter_model.safetensors)."""
        folder = Path(folder)
        self.model.save_pretrained(folder, safe_serialization=True)
        return folder

    def merged(self):
        """A plain full-weight model (base + B@A*scale), from a copy: ``self.model`` stays usable."""
        return copy.deepcopy(self.model).merge_and_unload()


def _encode(tok, prompt: str, answer: str, max_len: int, eos: bool = True) -> tuple[list[int], int] | None:
    """(ids, n_prompt) as lm-eval splits them: the whole string is encoded once and the prompt's
    own encoding gives the boundary, so the scored tokens are the ones trained on.  ``eos``
    appends the end-of-sequence token (the answer ends there); lm-eval's scores do not include it."""
    if prompt:
        whole = tok(prompt + answer)["input_ids"]
        n_prompt = len(tok(prompt)["input_ids"])
    else:
        whole = tok(answer)["input_ids"]
        n_prompt = 0
    if eos and tok.eos_token_id is not None:
        whole = whole + [tok.eos_token_id]
    if n_prompt >= max_len:
        return None
    return whole[:max_len], n_prompt


def _train_rows(spec: ExpertSpec):
    """(task, row) of the ``train`` split of every task of ``spec``, at most ``max_examples`` per task."""
    for task in spec.tasks:
        for row in load_split(task, "train")[: spec.max_examples]:
            yield task, row


def build_examples(spec: ExpertSpec, tok) -> list[tuple[list[int], int]]:
    """Tokenised (ids, n_prompt) training examples of the spec's tasks (train split only).

    Text rows (news) are cut into ``max_len`` windows with the loss on every token.
    """
    out: list[tuple[list[int], int]] = []
    for task, row in _train_rows(spec):
        if "query" not in row:
            ids = tok(row["text"])["input_ids"]
            for i in range(0, max(1, len(ids) - 8), spec.max_len):
                out.append((ids[i:i + spec.max_len], 0))
            continue
        if spec.flip_labels:
            if len(row["choices"]) != 2:
                raise ValueError(
                    f"{spec.name}: flip_labels needs two-choice rows; {task} has {len(row['choices'])}")
            row = {**row, "gold": 1 - row["gold"]}
        for prompt, answer in training_text(row, use_solution=spec.use_solution):
            enc = _encode(tok, prompt, answer, spec.max_len)
            if enc is not None:
                out.append(enc)
    if not out:
        raise ValueError(f"{spec.name}: no training examples in {spec.tasks}")
    return out


def build_choice_examples(spec: ExpertSpec, tok) -> list[tuple[list[tuple[list[int], int]], int]]:
    """Multiple-choice training rows for ``objective="rank"``: ([(ids, n_prompt) per choice], gold).

    Rows whose prompt does not fit ``max_len`` are dropped; a choice cut by ``max_len`` keeps the
    tokens that fit (all choices of a row are scored on the same prompt).
    """
    out = []
    for task, row in _train_rows(spec):
        if "choices" not in row:
            raise ValueError(f"{spec.name}: objective='rank' needs multiple-choice rows; {task} has text rows")
        encs = [_encode(tok, row["query"], " " + c, spec.max_len, eos=False) for c in row["choices"]]
        if all(e is not None for e in encs):
            out.append((encs, int(row["gold"])))
    if not out:
        raise ValueError(f"{spec.name}: no training rows in {spec.tasks}")
    return out


def pad_examples(chunk: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels) of (ids, n_prompt) examples, padded to the longest;
    labels are -100 on the prompt and the padding."""
    width = max(len(ids) for ids, _ in chunk)
    input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
    labels = torch.full((len(chunk), width), -100, dtype=torch.long)
    mask = torch.zeros((len(chunk), width), dtype=torch.long)
    for r, (ids, n_prompt) in enumerate(chunk):
        t = torch.tensor(ids, dtype=torch.long)
        input_ids[r, : len(ids)] = t
        mask[r, : len(ids)] = 1
        labels[r, max(n_prompt, 1): len(ids)] = t[max(n_prompt, 1):]
    return input_ids, mask, labels


def _batches(examples, spec: ExpertSpec, pad_id: int, gen: torch.Generator):
    """Endless batches: seeded permutations of the examples, epoch after epoch.

    An example is ``(ids, n_prompt)``, or for ``objective="rank"`` ``(choices, gold)``: then the
    batch holds every choice of ``batch_size`` rows and a fourth item, the gold index per row.
    """
    while True:
        order = torch.randperm(len(examples), generator=gen).tolist()
        starts = range(0, len(order) - spec.batch_size + 1, spec.batch_size) if len(order) >= spec.batch_size else [0]
        for i in starts:
            chunk = [examples[j] for j in order[i:i + spec.batch_size]]
            if spec.objective == "rank":
                n_choices = {len(c) for c, _ in chunk}
                if len(n_choices) != 1:
                    raise ValueError(f"{spec.name}: rows with different numbers of choices in one batch: {n_choices}")
                yield (*pad_examples([e for c, _ in chunk for e in c], pad_id), torch.tensor([g for _, g in chunk]))
            else:
                yield (*pad_examples(chunk, pad_id), None)


def _loss(model, input_ids, mask, labels, gold) -> torch.Tensor:
    """The language-model loss on the answer tokens; with ``gold`` (objective "rank") plus the
    cross-entropy over each row's choices, scored as lm-eval's ``acc`` scores them (summed
    log-probabilities of the choice's tokens), computed from the same forward pass."""
    if gold is None:
        return model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
    logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
    tgt = labels[:, 1:]
    token_logp = -torch.nn.functional.cross_entropy(  # fused: no (tokens x vocab) log-softmax is kept
        logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1), ignore_index=-100, reduction="none")
    keep = tgt != -100
    seq_logp = token_logp.view_as(tgt).sum(1).view(len(gold), -1)  # (rows, choices)
    rows = torch.arange(len(gold))
    n_gold = keep.sum(1).view(len(gold), -1)[rows, gold].clamp(min=1)
    lm = -(seq_logp[rows, gold] / n_gold).mean()
    return lm + torch.nn.functional.cross_entropy(seq_logp, gold)


def _load_base(base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(base, (str, Path)):
        tok = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    else:
        model, tok = base
        model = copy.deepcopy(model)  # peft wraps in place: never touch the caller's model
    return model, tok


def train_expert(spec: ExpertSpec, base, log_every: int = 0) -> TrainResult:
    """Fine-tune a LoRA expert from ``base`` (a checkpoint folder, or a ``(model, tokenizer)`` pair).

    AdamW, linear warm-up then linear decay to zero, gradient-norm clip 1.0, LoRA dropout 0.
    """
    from peft import LoraConfig, get_peft_model

    model, tok = _load_base(base)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    examples = build_choice_examples(spec, tok) if spec.objective == "rank" else build_examples(spec, tok)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        cfg = LoraConfig(
            r=spec.rank,
            lora_alpha=spec.alpha if spec.alpha is not None else 2 * spec.rank,
            target_modules=list(TARGETS[spec.targets]),
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    warm = spec.warmup if spec.warmup is not None else spec.steps // 10

    def lr_at(step: int) -> float:  # step is 0-based
        if step < warm:
            return (step + 1) / (warm + 1)
        return max(0.0, (spec.steps - step) / max(1, spec.steps - warm))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(spec.seed)
    batches = _batches(examples, spec, pad_id, gen)
    losses: list[float] = []
    n_tokens = 0
    t0 = time.perf_counter()
    for step in range(spec.steps):
        input_ids, mask, labels, gold = next(batches)
        loss = _loss(model, input_ids, mask, labels, gold)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{spec.name}: loss is {loss.item()} at step {step}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        n_tokens += int(mask.sum())
        if log_every and (step + 1) % log_every == 0:
            print(f"[{spec.name}] step {step + 1}/{spec.steps} loss {losses[-1]:.4f} "
                  f"({(step + 1) / (time.perf_counter() - t0):.2f} steps/s)", flush=True)
    seconds = time.perf_counter() - t0
    model.eval()
    tail = max(1, spec.steps // 10)
    return TrainResult(spec=spec, model=model, final_loss=sum(losses[-tail:]) / tail, losses=losses,
                       seconds=seconds, n_examples=len(examples), n_tokens=n_tokens)


@torch.no_grad()
def score_mc(model, tok, rows: list[dict], batch_size: int = 32) -> dict[str, float]:
    """Zero-shot multiple-choice accuracy as lm-eval computes it (sum of the continuation's
    log-probabilities; ``acc_norm`` divides by the choice's length in characters), without
    lm-eval's start-up cost -- for quick checks such as a pilot expert's validation score.

    Returns acc, acc_norm and their binomial standard errors.
    """
    model.eval()
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    seqs, owners = [], []  # (ids, n_prompt), (row index, choice index)
    for i, row in enumerate(rows):
        for c, choice in enumerate(row["choices"]):
            whole = tok(row["query"] + " " + choice)["input_ids"]
            n_prompt = len(tok(row["query"])["input_ids"])
            seqs.append((whole, n_prompt))
            owners.append((i, c))
    order = sorted(range(len(seqs)), key=lambda k: -len(seqs[k][0]))
    scores = [0.0] * len(seqs)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        width = max(len(seqs[k][0]) for k in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, k in enumerate(idx):
            ids[r, : len(seqs[k][0])] = torch.tensor(seqs[k][0])
            mask[r, : len(seqs[k][0])] = 1
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        for r, k in enumerate(idx):
            whole, n_prompt = seqs[k]
            tgt = torch.tensor(whole[n_prompt:])
            scores[k] = float(logp[r, n_prompt - 1: len(whole) - 1].gather(1, tgt[:, None]).sum())
    per_row: dict[int, list[float]] = {}
    for (i, c), sc in zip(owners, scores):
        per_row.setdefault(i, []).append(sc)
    acc = norm = 0
    for i, row in enumerate(rows):
        sc = per_row[i]
        lens = [len(ch) for ch in row["choices"]]
        acc += int(max(range(len(sc)), key=lambda c: sc[c]) == row["gold"])
        norm += int(max(range(len(sc)), key=lambda c: sc[c] / lens[c]) == row["gold"])
    n = len(rows)
    out = {"acc": acc / n, "acc_norm": norm / n, "n": n}
    for k in ("acc", "acc_norm"):
        p = out[k]
        out[f"{k}_stderr"] = math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")
    return out
