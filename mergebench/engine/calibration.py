"""Calibration: run the experts on a few validation texts and hand the statistics to a kernel.

For a method whose spec declares a :class:`~mergebench.methods.calibration.CalibrationNeed`,
this module computes, before the tensor-by-tensor merge:

* ``gram``: for every ``torch.nn.Linear`` of each expert, the mean Gram matrix of its inputs
  (forward pre-hooks; modules fed the same tensor, e.g. q/k/v, share one matrix);
* ``fisher``: each expert's diagonal empirical Fisher (one backward pass per document, the
  squared gradient of the document's log-likelihood accumulated per parameter);
* a model-level step (:class:`~mergebench.methods.calibration.ModelStep`) given the base, the
  task vectors, the tokenized inputs and a differentiable forward (AdaMerging).

Experts are loaded one at a time (memory: one model, its hooks' accumulators, and the
statistics kept so far); a model step holds the base and the task vectors, as the method
itself requires. Statistics reach the kernel as ``ctx.aux[<name>]`` (one tensor per expert),
so kernels stay pure. Which texts: :class:`CalibrationData`, built by the caller (the runner
samples validation documents, :mod:`mergebench.evaluation.calibration_data`); every text and
its origin is recorded in the returned provenance.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import MergebenchError
from ..methods.calibration import CalibrationBudget, CalibrationNeed
from ..methods.naming import layer_index
from .checkpoint import resolve_model_path

__all__ = [
    "Calibration",
    "CalibrationData",
    "CalibrationDoc",
    "CalibrationError",
    "ModelProblemData",
    "calibrate",
    "calibration_cost",
    "fisher_statistics",
    "gram_statistics",
    "model_problem",
    "tokenize",
]


class CalibrationError(MergebenchError, ValueError):
    """Calibration data are missing, empty or do not fit the method's declaration."""


@dataclass(frozen=True)
class CalibrationDoc:
    """One calibration document: the unlabeled ``prompt`` and, where the task has one, its ``answer``."""

    prompt: str
    answer: str = ""

    def text(self, labels: bool) -> str:
        return self.prompt + self.answer if labels else self.prompt


@dataclass(frozen=True)
class CalibrationData:
    """Calibration documents, one group per expert (the expert's own task; for a model step
    group k is task k), and where they came from (``source``: split, tasks, indices, seed)."""

    groups: tuple[tuple[CalibrationDoc, ...], ...]
    source: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_texts(cls, groups: Sequence[Sequence[str | tuple[str, str]]], source: Mapping[str, Any] | None = None):
        """Build from plain strings (prompt only) or ``(prompt, answer)`` pairs, one list per expert."""
        docs = tuple(
            tuple(CalibrationDoc(*t) if isinstance(t, tuple) else CalibrationDoc(str(t)) for t in g) for g in groups
        )
        return cls(docs, dict(source or {"kind": "given texts"}))

    @classmethod
    def from_jsonl(cls, path: str | Path, n_experts: int):
        """Read texts from a JSON-lines file (for ``mergebench merge``): one object per document with
        ``prompt`` (or ``text``), optional ``answer``, and ``expert`` (its index; absent = every
        expert). Bad lines raise :class:`CalibrationError` naming the file and line."""
        groups: list[list[tuple[str, str]]] = [[] for _ in range(n_experts)]
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise CalibrationError(f"calibration texts {path}: {exc.strerror or exc}") from None
        for k, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                doc = (str(row["prompt"] if "prompt" in row else row["text"]), str(row.get("answer", "")))
                who = row.get("expert")
                targets = range(n_experts) if who is None else [int(who)]
                if any(not 0 <= i < n_experts for i in targets):
                    raise IndexError(f"expert {who} out of range")
                for i in targets:
                    groups[i].append(doc)
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                raise CalibrationError(f"{path}, line {k}: not a calibration document ({type(exc).__name__}: {exc}); "
                                       f"expected {{\"prompt\": ..., \"answer\": ..., \"expert\": 0..{n_experts - 1}}}") from None
        return cls.from_texts(groups, {"kind": "file", "path": str(path)})

    def content_hash(self) -> str:
        payload = json.dumps([[(d.prompt, d.answer) for d in g] for g in self.groups], ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()[:20]


@dataclass
class Calibration:
    """What calibration produced: per tensor name, per ``ctx.aux`` key, one tensor per expert;
    timings; and a JSON-ready provenance record."""

    aux: dict[str, dict[str, list[torch.Tensor]]]
    record: dict[str, Any]
    seconds: float


# -- tokenization --------------------------------------------------------------------------


def tokenize(tokenizer, docs: Sequence[CalibrationDoc], *, labels: bool, max_tokens: int,
             batch_size: int = 8) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches (``input_ids``, ``attention_mask``) of the documents' texts, each
    truncated to ``max_tokens`` tokens; empty texts are refused."""
    out = []
    texts = [d.text(labels) for d in docs]
    for k, t in enumerate(texts):
        if not t.strip():
            raise CalibrationError(f"calibration document {k} is empty")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    for s in range(0, len(texts), batch_size):
        ids = [tokenizer(t, add_special_tokens=True)["input_ids"][:max_tokens] for t in texts[s : s + batch_size]]
        width = max(len(i) for i in ids)
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for r, row in enumerate(ids):
            input_ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[r, : len(row)] = 1
        out.append({"input_ids": input_ids, "attention_mask": mask})
    return out


# -- statistics (pure functions of a model and batches) -------------------------------------


def gram_statistics(model: torch.nn.Module, batches: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``{linear weight name: X^T X / n_tokens}`` over the non-padding tokens of ``batches``.

    Each batch's product in the model's precision (float32 at least), the running sum in float64;
    returned in float32 (float64 for a float64 model). Modules that
    receive the very same input tensor in a forward pass (q/k/v, gate/up) share one matrix.
    """
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    acc: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}
    alias: dict[str, str] = {}
    state: dict[str, Any] = {"mask": None, "seen": []}

    def hook(name):
        def pre(_module, args):
            x = args[0]
            for prev, owner in state["seen"]:
                if prev is x:
                    alias[name] = owner
                    return
            state["seen"].append((x, name))
            mask = state["mask"]
            rows = x[mask] if mask is not None and x.shape[:2] == mask.shape else x.reshape(-1, x.shape[-1])
            rows = rows.detach()
            if rows.dtype in (torch.float16, torch.bfloat16):
                rows = rows.float()
            g = (rows.T @ rows).double()  # one batch in the model's precision, the running sum in float64
            acc[name] = g if name not in acc else acc[name].add_(g)
            count[name] = count.get(name, 0) + rows.shape[0]

        return pre

    # A causal LM's output head reads the decoder's last hidden state: its Gram comes from that
    # state directly, so the full-vocabulary logits (12 % of the time on SmolLM2, and unused) are
    # never computed.
    head_module = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = next((n for n, m in linears.items() if m is head_module), None)
    decoder = model.get_decoder() if head is not None and hasattr(model, "get_decoder") else None
    decoder = None if decoder is model else decoder
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items() if decoder is None or n != head]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for b in batches:
                state["mask"] = b["attention_mask"].to(device).bool()
                state["seen"] = []
                ids, mask = b["input_ids"].to(device), b["attention_mask"].to(device)
                if decoder is None:
                    model(input_ids=ids, attention_mask=mask)
                else:
                    hook(head)(None, (decoder(input_ids=ids, attention_mask=mask).last_hidden_state,))
    finally:
        for h in handles:
            h.remove()
        state["seen"] = []
    dtype = next(model.parameters()).dtype
    dtype = torch.float64 if dtype == torch.float64 else torch.float32
    grams = {n: (acc[n] / max(count[n], 1)).to(dtype) for n in acc}
    out = {f"{n}.weight": grams[n] for n in grams}
    for n, owner in alias.items():
        if owner in grams:
            out[f"{n}.weight"] = grams[owner]  # the same tensor object: no extra memory
    return out


def _log_likelihood(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token log-likelihood of one unpadded sequence (shape (1, T))."""
    logits = model(input_ids=input_ids).logits[:, :-1]
    logp = torch.log_softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, dim=-1)
    return logp.gather(-1, input_ids[:, 1:, None]).sum()


def fisher_statistics(model: torch.nn.Module, batches: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher ``mean_d (grad_theta log p(text_d))^2``, one document at a time.

    Every parameter name (tied names too, e.g. ``lm_head.weight`` when it is the embedding)
    gets a tensor of its shape. Documents shorter than two tokens predict nothing and are skipped.
    """
    params = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
    acc = {n: torch.zeros_like(p) for n, p in params}
    device = next(model.parameters()).device
    n_docs = 0
    for b in batches:
        for row, mask in zip(b["input_ids"], b["attention_mask"]):
            ids = row[: int(mask.sum())][None].to(device)
            if ids.shape[1] < 2:
                continue
            model.zero_grad(set_to_none=True)
            _log_likelihood(model, ids).backward()
            for n, p in params:
                if p.grad is not None:
                    acc[n].addcmul_(p.grad, p.grad)
            n_docs += 1
    model.zero_grad(set_to_none=True)
    if n_docs == 0:
        raise CalibrationError("no calibration document is long enough (>= 2 tokens) for the Fisher")
    out = {n: a.div_(n_docs) for n, a in acc.items()}
    seen = {id(p): n for n, p in params}
    for n, p in model.named_parameters(remove_duplicate=False):
        if n not in out and id(p) in seen:
            out[n] = out[seen[id(p)]]
    return out


# -- model loading -------------------------------------------------------------------------


def _load(path: str | Path, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(path), dtype=dtype)
    return model.to(device).eval()


def _tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(path))


# -- model-level problems --------------------------------------------------------------------


@dataclass
class ModelProblemData:
    """The concrete :class:`~mergebench.methods.calibration.ModelProblem` a model step is given."""

    model: torch.nn.Module
    base: dict[str, torch.Tensor]
    task_vectors: list[dict[str, torch.Tensor]]
    batches: list[dict[str, torch.Tensor]]
    device: torch.device
    generator: torch.Generator

    def forward(self, params: Mapping[str, torch.Tensor], input_ids: torch.Tensor, attention_mask: torch.Tensor,
                positions: torch.Tensor | None = None):
        """Logits ``(B, T, V)`` of the model with ``params``; with ``positions`` (one index per row)
        only those rows' logits ``(B, V)``: the output layer then runs on B positions, not B x T."""
        if positions is None:
            return torch.func.functional_call(
                self.model, dict(params), (), {"input_ids": input_ids, "attention_mask": attention_mask},
                tie_weights=True, strict=False,
            ).logits
        decoder, prefix, head = self._parts()
        inner = {n[len(prefix):]: t for n, t in params.items() if n.startswith(prefix)}
        hidden = torch.func.functional_call(
            decoder, inner, (), {"input_ids": input_ids, "attention_mask": attention_mask}, strict=False,
        ).last_hidden_state
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), positions]
        return torch.nn.functional.linear(picked, params.get(head, dict(self.model.named_parameters())[head]))

    def _parts(self) -> tuple[torch.nn.Module, str, str]:
        """The decoder (the model without its output layer), its parameter-name prefix, and the
        name of the output layer's weight (the embedding's when they are tied)."""
        decoder, out = self.model.get_decoder(), self.model.get_output_embeddings()
        names = {id(m): n for n, m in self.model.named_modules()}
        weights = {id(p): n for n, p in self.model.named_parameters()}  # tied: the first name (the embedding's)
        return decoder, names[id(decoder)] + ".", weights[id(out.weight)]

    @staticmethod
    def layer_of(name: str) -> int | None:
        return layer_index(name)


def model_problem(base_path, expert_paths, batches, device, dtype, seed) -> ModelProblemData:
    """The problem a model step gets: the base model, the experts' task vectors (one expert loaded
    at a time), the tokenized batches and a generator seeded with ``seed``."""
    model = _load(base_path, device, dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    base = {n: p.detach() for n, p in model.named_parameters() if p.is_floating_point()}
    tvs = []
    for path in expert_paths:  # one expert in memory at a time, beside the base and the task vectors so far
        expert = _load(path, device, dtype)
        own = dict(expert.named_parameters())
        tvs.append({n: (own[n].detach() - base[n]) for n in base})
        del expert, own
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return ModelProblemData(model, base, tvs, batches, device, gen)


# -- the entry point -------------------------------------------------------------------------


def _budgeted(data: CalibrationData, budget: CalibrationBudget) -> tuple[tuple[CalibrationDoc, ...], ...]:
    return tuple(g[: budget.documents] for g in data.groups)


def calibrate(
    need: CalibrationNeed,
    params: Mapping[str, Any],
    *,
    base: str | Path | None,
    experts: Sequence[str | Path],
    data: CalibrationData | None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    method: str = "method",
) -> Calibration:
    """Compute what ``need`` declares for ``experts`` on ``data``; see the module doc.

    Raises :class:`CalibrationError` (before any model is loaded) when data are missing, when
    there is not one group per expert, or when a group is empty; a model step needs ``base``.
    """
    if data is None:
        raise CalibrationError(f"method {method!r} needs calibration data (validation texts); none were given")
    if len(data.groups) != len(experts):
        raise CalibrationError(f"method {method!r}: calibration data have {len(data.groups)} group(s) for "
                               f"{len(experts)} expert(s)")
    empty = [i for i, g in enumerate(data.groups) if not g]
    if empty:
        raise CalibrationError(f"method {method!r}: calibration group {empty[0]} (expert {empty[0]}) has no document")
    if need.model_step is not None and base is None:
        raise CalibrationError(f"method {method!r}: its model-level step needs a base model")
    for path in [*([base] if base is not None else []), *experts]:
        folder = Path(resolve_model_path(path))
        if not (folder / "config.json").is_file():
            raise CalibrationError(f"method {method!r} runs the models on calibration texts, so {path} must be a "
                                   "Hugging Face model folder with a config.json")
    t0 = time.perf_counter()
    device = torch.device(device)
    budget = need.resolve_budget(params)
    groups = _budgeted(data, budget)
    tok = _tokenizer(base if base is not None else experts[0])
    with torch.inference_mode(False), torch.enable_grad():  # callers may run under inference_mode
        batches = [tokenize(tok, g, labels=need.labels, max_tokens=budget.max_tokens) for g in groups]
        aux, timings, step_log = _compute(need, params, experts, base, batches, device, dtype, seed)
    n_tokens = [int(sum(int(b["attention_mask"].sum()) for b in bs)) for bs in batches]
    seconds = time.perf_counter() - t0
    record = {
        "need": need.describe(),
        "budget": budget.describe(),
        "documents": [len(g) for g in groups],
        "tokens": n_tokens,
        "data": dict(data.source),
        "data_hash": data.content_hash(),
        "seconds": seconds,
        **timings,
    }
    if step_log:
        record["model_step"] = step_log
    return Calibration(aux, record, seconds)


def _compute(need, params, experts, base, batches, device, dtype, seed):
    """The statistics and the model step (see :func:`calibrate`); returns (aux, timings, step log)."""
    aux: dict[str, dict[str, list[torch.Tensor]]] = {}
    timings: dict[str, float] = {}
    per_expert: dict[str, list[dict[str, torch.Tensor]]] = {s: [] for s in need.statistics}
    if need.statistics:
        t = time.perf_counter()
        for i, path in enumerate(experts):
            model = _load(path, device, dtype)
            if "gram" in need.statistics:
                per_expert["gram"].append(gram_statistics(model, batches[i]))
            if "fisher" in need.statistics:
                per_expert["fisher"].append(fisher_statistics(model, batches[i]))
            del model
        timings["statistics_s"] = time.perf_counter() - t
        for stat, maps in per_expert.items():
            common = set(maps[0]).intersection(*map(set, maps[1:]))
            for name in common:
                aux.setdefault(name, {})[stat] = [m[name] for m in maps]
    step_log: dict[str, Any] = {}
    if need.model_step is not None:
        t = time.perf_counter()
        problem = model_problem(base, experts, [_cat(bs) for bs in batches], device, dtype, seed)
        result = need.model_step(problem, params, step_log)
        for name, values in result.items():
            aux.setdefault(name, {})[need.output] = [v.detach() for v in values]
        del problem
        timings["model_step_s"] = time.perf_counter() - t
    return aux, timings, step_log


def _cat(batches: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One right-padded batch of every document of a group (a model step draws its own minibatches)."""
    width = max(b["input_ids"].shape[1] for b in batches)

    def pad(t, value):
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    ids = torch.cat([pad(b["input_ids"], 0) for b in batches])  # masked out: any id will do
    mask = torch.cat([pad(b["attention_mask"], 0) for b in batches])
    return {"input_ids": ids, "attention_mask": mask}


def calibration_cost(need: CalibrationNeed, params: Mapping[str, Any], n_experts: int,
                     documents: Sequence[int] | None = None) -> dict[str, Any]:
    """What calibrating one merge costs, before anything runs (for ``mergebench plan``).

    ``documents``: documents per expert group (default: the budget's, for every expert).
    Counts document forward passes and backward passes, and ``passes`` by kind (``gram``: a
    forward pass per document, ``fisher``: a forward and a backward pass per document,
    ``model_step``: a forward and backward pass per sampled document, from the step's ``epochs``
    and ``samples_per_epoch`` parameters when it has them).
    """
    budget = need.resolve_budget(params)
    docs = list(documents) if documents is not None else [budget.documents] * n_experts
    passes = {"gram": sum(docs) if "gram" in need.statistics else 0,
              "fisher": sum(docs) if "fisher" in need.statistics else 0, "model_step": 0}
    if need.model_step is not None:
        steps = int(params.get("epochs", 0) or 0)
        passes["model_step"] = steps * sum(min(int(params.get("samples_per_epoch", d) or d), d) for d in docs)
    return {"documents": sum(docs), "max_tokens": budget.max_tokens,
            "forward_docs": passes["gram"] + passes["fisher"] + passes["model_step"],
            "backward_docs": passes["fisher"] + passes["model_step"], "passes": passes,
            "models_loaded": n_experts + (1 if need.model_step is not None else 0)}
