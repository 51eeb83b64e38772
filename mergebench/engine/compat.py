"""Check that checkpoints can be merged and plan where each input row comes from.

Everything here works on headers and configs only, so incompatibilities are reported before
any weight is read or any kernel runs. The output is a :class:`MergePlan`: for every tensor,
one :class:`Source` per input that says which rows of which checkpoint tensor make it up.
Sources absorb the two legitimate differences between inputs:

* vocabulary size (``vocab_policy``): ``"truncate"`` keeps the first ``min(vocab)`` rows of
  every vocabulary tensor; ``"base"`` cuts experts to the base vocabulary or pads them with the
  base's own rows (a new token keeps its base embedding); ``"error"`` refuses.
* tied embeddings: a model whose checkpoint has no ``lm_head.weight`` (tied to the input
  embedding) while another has one reads its input embedding in its place; the output then
  has its own ``lm_head`` and ``tie_word_embeddings`` becomes false.

Floating tensors may differ in precision (all are converted to the compute dtype); any other
dtype difference, a shape difference, a missing tensor or a different architecture is an
error naming the files and tensors involved.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import MergebenchError
from ..methods.naming import module_kind
from ..methods.spec import ModuleKind
from .checkpoint import Checkpoint

__all__ = ["CompatibilityError", "MergePlan", "Segment", "Source", "TensorPlan", "plan_merge"]

MAX_LISTED = 5

# (output embedding, input embedding) pairs of tied checkpoints, by naming family.
_TIED_PAIRS = (
    ("lm_head.weight", "model.embed_tokens.weight"),
    ("lm_head.weight", "transformer.wte.weight"),
    ("embed_out.weight", "gpt_neox.embed_in.weight"),
)
_INPUT_EMBEDDING = re.compile(r"(^|\.)(embed_tokens|wte|embed_in|word_embeddings)\.weight$")


class CompatibilityError(MergebenchError, ValueError):
    """The checkpoints cannot be merged as given (raised before any tensor is read)."""


@dataclass(frozen=True)
class Segment:
    """Rows ``[src_start, src_start + rows)`` of ``ckpt[name]`` land at row ``dst_start``.
    ``ckpt=None`` means zeros (padding of auxiliary tensors)."""

    ckpt: Checkpoint | None
    name: str
    dst_start: int
    src_start: int
    rows: int


@dataclass(frozen=True)
class Source:
    """One input's view of a tensor, assembled from segments; ``read`` returns a fresh tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    segments: tuple[Segment, ...]

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    def describe(self, row: int = 0) -> str:
        """``expert 1 (/path/model.safetensors): tensor 'name'`` for the segment holding ``row``
        (the first stored segment when that row is padding)."""
        stored = [s for s in self.segments if s.ckpt is not None]
        if not stored:
            return "padding (zeros)"
        seg = next((s for s in stored if s.dst_start <= row < s.dst_start + s.rows), stored[0])
        return f"{seg.ckpt.describe(seg.name)}: tensor {seg.name!r}"

    def read(self, row_start: int = 0, row_stop: int | None = None) -> torch.Tensor:
        row_stop = self.rows if row_stop is None else row_stop
        if len(self.segments) == 1 and self.segments[0].ckpt is not None:
            s = self.segments[0]
            if s.ckpt.tensors[s.name].dtype == self.dtype and s.dst_start == 0:
                if not self.shape:
                    return s.ckpt.read(s.name)
                return s.ckpt.read(s.name, s.src_start + row_start, s.src_start + row_stop)
        out = torch.empty((row_stop - row_start, *self.shape[1:]) if self.shape else (), dtype=self.dtype)
        for s in self.segments:
            lo, hi = max(row_start, s.dst_start), min(row_stop, s.dst_start + s.rows)
            if lo >= hi:
                continue
            dst = out[lo - row_start : hi - row_start] if self.shape else out
            src_lo = s.src_start + lo - s.dst_start
            if s.ckpt is None:
                dst.zero_()
            elif s.ckpt.tensors[s.name].dtype == self.dtype:
                s.ckpt.read_into(s.name, dst, src_lo)
            else:
                dst.copy_(s.ckpt.read(s.name, src_lo, src_lo + hi - lo))
        return out


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    """Storage dtype in the reference model (the output keeps it for non-floating tensors)."""
    base: Source | None
    experts: tuple[Source, ...]
    aux: Mapping[str, tuple[Source, ...]] = field(default_factory=dict)

    @property
    def floating(self) -> bool:
        return self.dtype.is_floating_point

    @property
    def reference(self) -> Source:
        return self.base if self.base is not None else self.experts[0]


@dataclass
class MergePlan:
    tensors: list[TensorPlan]
    reference: Checkpoint
    vocab_size: int | None = None
    """Set when the vocabulary policy changed the reference's vocabulary size."""
    untied: bool = False
    """True when a tied model's input embedding stood in for its missing ``lm_head``."""
    notes: list[str] = field(default_factory=list)


def _whole(ckpt: Checkpoint | None, name: str, shape: tuple[int, ...], dtype: torch.dtype, rows: int | None = None) -> Source:
    n = rows if rows is not None else (shape[0] if shape else 1)
    return Source(shape, dtype, (Segment(ckpt, name, 0, 0, n),))


def _fail(title: str, problems: Sequence[str]) -> None:
    if problems:
        more = f"; ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise CompatibilityError(f"{title} ({len(problems)}): " + "; ".join(problems[:MAX_LISTED]) + more)  # one line


def _check_configs(models: Sequence[Checkpoint]) -> None:
    ref = next((m for m in models if m.config is not None), None)
    if ref is None:
        return
    problems = []
    for m in models:
        if m is ref or m.config is None:
            continue
        for key in ("model_type", "architectures"):
            if m.config.get(key) != ref.config.get(key):
                problems.append(f"{m.label} ({m.path}) has {key}={m.config.get(key)!r}, {ref.label} ({ref.path}) has {ref.config.get(key)!r}")
    _fail("checkpoints have different architectures", problems)


def _tied_aliases(models: Sequence[Checkpoint]) -> dict[int, dict[str, str]]:
    """Per model: output-embedding names it lacks but can read from its input embedding."""
    aliases: dict[int, dict[str, str]] = {}
    for head, embed in _TIED_PAIRS:
        have = [head in m.tensors for m in models]
        if not any(have) or all(have):
            continue
        for i, m in enumerate(models):
            if head not in m.tensors and embed in m.tensors:
                aliases.setdefault(i, {})[head] = embed
    return aliases


def _vocab_size(m: Checkpoint, names: Mapping[str, str]) -> int | None:
    for name in names:
        if _INPUT_EMBEDDING.search(name) and m.tensors[names[name]].shape:
            return m.tensors[names[name]].shape[0]
    return None


def plan_merge(
    base: Checkpoint | None,
    experts: Sequence[Checkpoint],
    aux: Mapping[str, Sequence[Checkpoint]] | None = None,
    *,
    vocab_policy: str = "error",
) -> MergePlan:
    """Check compatibility (headers only) and return the per-tensor read plan.

    The reference model (whose config, tokenizer and tensor order the output follows) is the
    base if given, else the first expert.
    """
    models = ([base] if base is not None else []) + list(experts)
    ref = models[0]
    _check_configs(models)

    aliases = _tied_aliases(models)
    # views[i][name] -> the checkpoint tensor that model i reads for `name`
    views = [{**{n: n for n in m.tensors}, **aliases.get(i, {})} for i, m in enumerate(models)]
    notes = [f"{models[i].label}: tied embeddings, reads {src!r} as {dst!r}" for i, a in aliases.items() for dst, src in a.items()]

    problems = []
    for m, view in zip(models[1:], views[1:]):
        missing = [n for n in views[0] if n not in view]
        extra = [n for n in view if n not in views[0]]
        if missing:
            problems.append(f"{m.label} ({m.path}) lacks {len(missing)} tensor(s) that {ref.label} ({ref.path}) has: {', '.join(missing[:MAX_LISTED])}")
        if extra:
            problems.append(f"{m.label} ({m.path}) has {len(extra)} tensor(s) that {ref.label} ({ref.path}) lacks: {', '.join(extra[:MAX_LISTED])}")
    _fail("checkpoints have different tensor names", problems)

    # Vocabulary: sizes from the input embedding; vocabulary tensors are embedding-kind tensors
    # whose first dimension equals each model's vocabulary size.
    vocabs = [_vocab_size(m, v) for m, v in zip(models, views)]
    target = None
    vocab_names: set[str] = set()
    if None not in vocabs and len(set(vocabs)) > 1:
        sizes = ", ".join(f"{m.label} {v}" for m, v in zip(models, vocabs))
        if vocab_policy == "error":
            raise CompatibilityError(
                f"vocabulary sizes differ ({sizes}); pass vocab_policy='truncate' (all cut to the smallest "
                "vocabulary) or vocab_policy='base' (experts cut or padded with the base's rows to the base vocabulary)"
            )
        if vocab_policy == "base" and base is None:
            raise CompatibilityError(f"vocabulary sizes differ ({sizes}) and vocab_policy='base' needs a base model")
        target = min(vocabs) if vocab_policy == "truncate" else vocabs[0]
        vocab_names = {
            n for n in views[0]
            if module_kind(n) == ModuleKind.EMBEDDING
            and all(m.tensors[v[n]].shape[:1] == (vb,) for m, v, vb in zip(models, views, vocabs))
        }
        notes.append(f"vocabulary sizes {sizes} -> {target} (vocab_policy={vocab_policy!r}) for {', '.join(sorted(vocab_names))}")

    def source(i: int, name: str) -> Source:
        m, real = models[i], views[i][name]
        info = m.tensors[real]
        if name not in vocab_names:
            return _whole(m, real, info.shape, info.dtype)
        shape = (target, *info.shape[1:])
        own = min(info.shape[0], target)
        segs = [Segment(m, real, 0, 0, own)]
        if own < target:  # vocab_policy == "base": new rows keep the base's values
            segs.append(Segment(models[0], views[0][name], own, own, target - own))
        return Source(shape, info.dtype, tuple(segs))

    order = sorted(ref.tensors.values(), key=lambda t: (str(t.file), t.start or 0))
    names = [t.name for t in order] + sorted(set(views[0]) - set(ref.tensors))
    plans, shape_problems, dtype_problems = [], [], []
    for name in names:
        sources = [source(i, name) for i in range(len(models))]
        r = sources[0]
        for i in range(1, len(models)):
            m, s, real = models[i], sources[i], views[i][name]
            if s.shape != r.shape:
                shape_problems.append(f"{name}: {m.describe(real)} has shape {s.shape}, {ref.describe(views[0][name])} has {r.shape}")
            elif s.dtype != r.dtype and not (s.dtype.is_floating_point and r.dtype.is_floating_point):
                dtype_problems.append(f"{name}: {m.describe(real)} has dtype {s.dtype}, {ref.describe(views[0][name])} has {r.dtype}")
        plans.append(TensorPlan(name, r.shape, r.dtype, sources[0] if base is not None else None, tuple(sources[1:] if base is not None else sources)))
    _fail("tensors differ in shape", shape_problems)
    _fail("tensors differ in dtype", dtype_problems)

    if aux:
        plans = _attach_aux(plans, list(experts), aux, vocab_names, target)
    return MergePlan(plans, ref, target if target is not None and target != vocabs[0] else None, bool(aliases), notes)


def _attach_aux(plans, experts, aux, vocab_names, target) -> list[TensorPlan]:
    """Auxiliary per-expert tensors (e.g. Fisher diagonals) of the same name and shape.

    A tensor absent from some auxiliary checkpoint is simply not supplied for that tensor;
    vocabulary tensors follow the vocabulary policy with zero padding.
    """
    problems = []
    for key, ckpts in aux.items():
        if len(ckpts) != len(experts):
            raise CompatibilityError(f"auxiliary input {key!r} has {len(ckpts)} checkpoint(s) for {len(experts)} experts")
    out = []
    for p in plans:
        extra = {}
        for key, ckpts in aux.items():
            if not all(p.name in c.tensors for c in ckpts):
                continue
            sources = []
            for e, c in zip(experts, ckpts):
                info = c.tensors[p.name]
                want = e.tensors[p.name].shape if p.name in e.tensors else p.shape
                if info.shape != want:
                    problems.append(f"{p.name}: {c.describe(p.name)} has shape {info.shape}, {e.describe(p.name)} has {want}")
                    continue
                if p.name in vocab_names:
                    own = min(info.shape[0], target)
                    segs = [Segment(c, p.name, 0, 0, own)] + ([Segment(None, p.name, own, 0, target - own)] if own < target else [])
                    sources.append(Source((target, *info.shape[1:]), info.dtype, tuple(segs)))
                else:
                    sources.append(_whole(c, p.name, info.shape, info.dtype))
            extra[key] = tuple(sources)
        out.append(TensorPlan(p.name, p.shape, p.dtype, p.base, p.experts, extra) if extra else p)
    _fail("auxiliary tensors differ in shape from their experts", problems)
    return out
