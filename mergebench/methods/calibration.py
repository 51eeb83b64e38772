"""The calibration part of the method contract: what data-dependent methods declare.

A data-free method needs only the weights. A data-dependent one needs the experts to *see
data* first, and says so with a :class:`CalibrationNeed` on its :class:`MethodSpec`
(``spec.calibration``): which statistics the engine must compute (input Gram matrices of the
linear modules, diagonal Fisher of each expert) and/or a model-level optimisation step
(:class:`ModelStep`, e.g. AdaMerging's coefficients), with a :class:`CalibrationBudget`
(documents per task, tokens per document, seed). The engine
(:mod:`mergebench.engine.calibration`) computes them one expert at a time and hands them to
the kernel per tensor, in ``ctx.aux[<statistic>]`` (one tensor per expert), so kernels stay
pure functions of tensors.

Statistics, per expert i and tensor name ``t`` (what ``ctx.aux`` holds):

* ``"gram"``: for the weight ``t`` of a ``torch.nn.Linear`` (shape ``(out, in)``), the mean
  input Gram matrix ``X_i^T X_i / n_tokens`` (``(in, in)``, float32), over the non-padding
  tokens of expert i's calibration texts. Tensors that are not linear weights get none.
* ``"fisher"``: the diagonal empirical Fisher ``mean_d (d log p_i(text_d) / d theta_t)^2``,
  shaped like the tensor (float32), one squared gradient per calibration document.
* the ``output`` of a :class:`ModelStep` (e.g. ``"coefficients"``): whatever per-tensor,
  per-expert tensors the step returns.

This module holds only declarations (no torch models): the engine and the conformance kit
(:mod:`mergebench.testing`) read them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

from .spec import ParameterError

__all__ = [
    "STATISTICS",
    "CalibrationBudget",
    "CalibrationNeed",
    "ModelProblem",
    "ModelStep",
    "Statistic",
    "calibration_of",
]

Statistic = Literal["gram", "fisher"]
STATISTICS: tuple[str, ...] = ("gram", "fisher")


@dataclass(frozen=True)
class CalibrationBudget:
    """How much calibration data a method reads, and how it is drawn.

    ``documents``: documents per task (per expert for statistics; per task for a model step),
    drawn from the *validation* split by a seeded sampler (never the test split). ``max_tokens``:
    each document is truncated to this many tokens. ``seed``: the sampler's seed. ``source``
    says where the numbers come from (a paper, a reference implementation), for provenance.
    """

    documents: int = 256
    max_tokens: int = 256
    seed: int = 0
    source: str = ""

    def __post_init__(self):
        for name in ("documents", "max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ParameterError(f"calibration budget: {name} must be a positive integer, got {value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ParameterError(f"calibration budget: seed must be an integer, got {self.seed!r}")

    def describe(self) -> dict[str, Any]:
        return {"documents": self.documents, "max_tokens": self.max_tokens, "seed": self.seed, "source": self.source}


class ModelProblem(Protocol):
    """What a :class:`ModelStep` is given (built by :mod:`mergebench.engine.calibration`).

    ``base``: the base model's floating parameters by tensor name (float32, on ``device``);
    ``task_vectors[i]``: expert i minus the base, same names; ``batches[k]``: tokenized
    calibration inputs of task k (``input_ids``, ``attention_mask``; unlabeled: prompts only);
    ``forward(params, input_ids, attention_mask, positions=None)`` runs the base architecture with
    the given parameters (a differentiable functional call) and returns the logits (``(B, T, V)``,
    or ``(B, V)`` at one position per row when ``positions`` is given); ``generator`` is
    seeded from the run seed (draw minibatches from it only); ``layer_of(name)`` is the
    transformer block index of a tensor (None outside the blocks).
    """

    base: Mapping[str, torch.Tensor]
    task_vectors: Sequence[Mapping[str, torch.Tensor]]
    batches: Sequence[Mapping[str, torch.Tensor]]
    device: torch.device
    generator: torch.Generator

    def forward(self, params: Mapping[str, torch.Tensor], input_ids: torch.Tensor,
                attention_mask: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor: ...

    def layer_of(self, name: str) -> int | None: ...


class ModelStep(Protocol):
    """A model-level optimisation run before the tensor-by-tensor merge.

    Returns, per tensor name, one tensor per expert (e.g. AdaMerging's scalar coefficient of
    each task vector); the engine hands them to the kernel as ``ctx.aux[need.output]``.
    Must draw randomness only from ``problem.generator`` and record what it did (losses,
    learned values) in ``log`` (JSON-ready values; they go to provenance).
    """

    def __call__(self, problem: ModelProblem, params: Mapping[str, Any],
                 log: dict[str, Any]) -> Mapping[str, Sequence[torch.Tensor]]: ...


@dataclass(frozen=True)
class CalibrationNeed:
    """A method's declaration that it needs calibration data (``MethodSpec.calibration``).

    ``statistics``: which per-expert statistics the engine computes (see the module doc).
    ``model_step``: a model-level optimisation (see :class:`ModelStep`) whose result reaches
    the kernel as ``ctx.aux[output]``. ``labels``: whether the texts include the validation
    answers (statistics methods fit the experts' own behaviour on labelled examples) or are
    prompts only (AdaMerging's unlabeled test-time adaptation). ``budget``: the default
    :class:`CalibrationBudget`; ``budget_params`` maps budget fields to method parameters that
    override them (e.g. ``{"documents": "fisher_samples"}``), so a suite can set them as it sets
    any other typed parameter.
    """

    statistics: tuple[Statistic, ...] = ()
    model_step: ModelStep | Callable[..., Mapping[str, Sequence[torch.Tensor]]] | None = None
    output: str = "coefficients"
    labels: bool = True
    budget: CalibrationBudget = field(default_factory=CalibrationBudget)
    budget_params: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        unknown = [s for s in self.statistics if s not in STATISTICS]
        if unknown:
            raise ParameterError(f"calibration: unknown statistic(s) {', '.join(map(repr, unknown))}; "
                                 f"known: {', '.join(STATISTICS)}")
        if not self.statistics and self.model_step is None:
            raise ParameterError("calibration: declare at least one statistic or a model_step")
        if self.model_step is not None and not callable(self.model_step):
            raise ParameterError(f"calibration: model_step must be callable, got {type(self.model_step).__name__}")
        if self.output in STATISTICS:
            raise ParameterError(f"calibration: output {self.output!r} collides with a statistic's name")
        bad = sorted(set(self.budget_params) - {"documents", "max_tokens"})
        if bad:
            raise ParameterError(f"calibration: budget_params keys must be documents/max_tokens, got {', '.join(bad)}")

    @property
    def needs_backward(self) -> bool:
        """Whether calibration runs backward passes (Fisher, or an optimisation step)."""
        return "fisher" in self.statistics or self.model_step is not None

    @property
    def aux_keys(self) -> tuple[str, ...]:
        """The ``ctx.aux`` keys the kernel receives."""
        return tuple(self.statistics) + ((self.output,) if self.model_step is not None else ())

    def resolve_budget(self, params: Mapping[str, Any]) -> CalibrationBudget:
        """The budget with the method parameters named in ``budget_params`` applied."""
        over = {f: int(params[p]) for f, p in self.budget_params.items() if params.get(p) is not None}
        if not over:
            return self.budget
        return CalibrationBudget(**{**self.budget.describe(), **over})

    def describe(self) -> dict[str, Any]:
        return {
            "statistics": list(self.statistics),
            "model_step": getattr(self.model_step, "__qualname__", None) if self.model_step else None,
            "output": self.output if self.model_step is not None else None,
            "labels": self.labels,
            "budget": self.budget.describe(),
            "budget_params": dict(self.budget_params),
        }


def calibration_of(spec: Any) -> CalibrationNeed | None:
    """``spec.calibration`` (None for data-free methods and for specs built before the field existed)."""
    return getattr(spec, "calibration", None)
