"""The method contract: what a merge method declares and what its kernel receives.

A method is data (a :class:`MethodSpec`) plus one pure kernel function. The engine reads
the spec to validate parameters and inputs *before* any tensor is read, to decide how much
of a tensor the kernel must see at once (``granularity``), and to hand stochastic methods
an explicit, per-tensor seeded :class:`torch.Generator`.
"""

from __future__ import annotations

import enum
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch

from ..config.papers import get_paper
from ..errors import MergebenchError

if TYPE_CHECKING:
    from .calibration import CalibrationNeed

__all__ = [
    "Granularity",
    "InputContract",
    "Kernel",
    "MethodSpec",
    "ModuleKind",
    "Param",
    "ParameterError",
    "TensorContext",
    "tensor_seed",
]


class ParameterError(MergebenchError, ValueError):
    """A method parameter (or the input contract) is violated; raised before any tensor work."""


class ModuleKind(str, enum.Enum):
    """Coarse role of a tensor inside a transformer, derived from its name."""

    ATTENTION = "attention"
    MLP = "mlp"
    EMBEDDING = "embedding"
    NORM = "norm"
    OTHER = "other"


Granularity = Literal["elementwise", "tensor", "matrix"]
"""How much of a tensor a kernel must see at once.

* ``elementwise``: the kernel's output at an index depends only on the inputs at that
  index (linear, task arithmetic); the engine may split a tensor into chunks.
* ``tensor``: the kernel needs the whole tensor (norms, angles, top-k per tensor).
* ``matrix``: the kernel works on 2-D weight matrices (SVD methods); it still receives
  1-D tensors and must say in its docstring what it does with them.
"""


@dataclass(frozen=True)
class TensorContext:
    """Where a tensor sits in the model; everything a kernel may know besides the values.

    ``generator`` is set (and seeded from the run seed and the tensor name) for
    stochastic methods only, so results do not depend on the order tensors are visited.
    ``model_stats`` holds the per-tensor outputs of the method's ``prepass`` (if any), for
    methods whose decision for one tensor depends on the whole model (e.g. a guardrail on
    the mean layer angle). ``aux`` holds auxiliary per-expert tensors with the same name
    (e.g. diagonal Fisher estimates), keyed by the auxiliary input's name.
    """

    name: str = "tensor"
    layer: int | None = None
    num_layers: int | None = None
    kind: ModuleKind = ModuleKind.OTHER
    generator: torch.Generator | None = None
    model_stats: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    aux: Mapping[str, Sequence[torch.Tensor]] = field(default_factory=dict)

    @property
    def depth(self) -> float | None:
        """Relative depth in [0, 1] (first layer 0, last layer 1), or None outside layers."""
        if self.layer is None or not self.num_layers:
            return None
        return self.layer / max(self.num_layers - 1, 1)


def tensor_seed(name: str, seed: int) -> int:
    """Generator seed for one tensor, from the run seed and the tensor *name* (not its
    position), so stochastic results do not depend on the order tensors are visited. The
    engine and the conformance kit both use it, so kernels behave identically in both."""
    return (zlib.crc32(name.encode()) ^ (seed * 0x9E3779B1)) & 0x7FFFFFFF


class Kernel(Protocol):
    """A pure merge function. Must not mutate its inputs; returns a new tensor shaped like
    the experts, in the experts' dtype and device."""

    def __call__(
        self,
        base: torch.Tensor | None,
        experts: Sequence[torch.Tensor],
        weights: torch.Tensor,
        params: Mapping[str, Any],
        ctx: TensorContext,
    ) -> torch.Tensor: ...


ParamType = Literal["float", "int", "bool", "str", "floats"]


@dataclass(frozen=True)
class Param:
    """One typed hyperparameter with its default and valid range.

    For a ``nullable`` parameter the strings ``"none"``/``"null"`` (e.g. from the CLI) mean
    None; for other parameters they are ordinary strings (a choice may be ``"none"``).
    ``floats`` is a list of floats (e.g. a per-layer schedule). ``per_expert`` floats may
    also be given as one value per expert (mergekit's per-model ``density``); the kernel
    then always receives a tuple with one value per expert.
    """

    name: str
    type: ParamType
    default: Any
    help: str = ""
    ge: float | None = None
    le: float | None = None
    gt: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] | None = None
    nullable: bool = False
    per_expert: bool = False

    def describe_range(self) -> str:
        parts = []
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.ge is None and self.le is None and self.gt is None and self.lt is None:
            return ""
        lo = f"[{self.ge}" if self.ge is not None else (f"({self.gt}" if self.gt is not None else "(-inf")
        hi = f"{self.le}]" if self.le is not None else (f"{self.lt})" if self.lt is not None else "inf)")
        if self.type in ("float", "int", "floats"):
            parts.append(f"{lo}, {hi}")
        return " ".join(parts)

    def coerce(self, value: Any, method: str, n_experts: int | None = None) -> Any:
        """Convert ``value`` (possibly a CLI string) to this parameter's type and check range."""
        where = f"method {method!r}: parameter {self.name!r}"
        if value is None or (self.nullable and isinstance(value, str) and value.lower() in ("none", "null")):
            if self.nullable:
                return None
            raise ParameterError(f"{where} may not be None")
        if self.per_expert and isinstance(value, str) and "," in value:
            value = [v for v in value.strip("[]() ").split(",") if v.strip()]
        if self.per_expert and isinstance(value, (list, tuple)):
            if n_experts is not None and len(value) != n_experts:
                raise ParameterError(f"{where} has {len(value)} per-expert values for {n_experts} experts")
            return tuple(self._scalar(v, where) for v in value)
        if self.type == "floats":
            if isinstance(value, str):
                value = [v for v in value.strip("[]() ").split(",") if v.strip()]
            if not isinstance(value, (list, tuple)) or not value:
                raise ParameterError(f"{where} must be a non-empty list of floats, got {value!r}")
            return tuple(self._scalar(v, where, "float") for v in value)
        out = self._scalar(value, where)
        return tuple([out] * n_experts) if self.per_expert and n_experts is not None else out

    def _scalar(self, value: Any, where: str, type_: str | None = None) -> Any:
        type_ = type_ or self.type
        try:
            if type_ == "bool":
                if isinstance(value, str):
                    if value.lower() in ("1", "true", "yes", "on"):
                        return True
                    if value.lower() in ("0", "false", "no", "off"):
                        return False
                    raise ValueError(value)
                if not isinstance(value, (bool, int)):
                    raise ValueError(value)
                return bool(value)
            if type_ == "int":
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError(value)
                if isinstance(value, bool):
                    raise ValueError(value)
                out: Any = int(value)
            elif type_ in ("float", "floats"):
                if isinstance(value, bool):
                    raise ValueError(value)
                out = float(value)
                if not math.isfinite(out):
                    raise ValueError(value)
            else:
                out = str(value)
        except (TypeError, ValueError):
            raise ParameterError(f"{where} must be of type {type_}, got {value!r}") from None
        if self.choices is not None and out not in self.choices:
            raise ParameterError(f"{where} must be one of {', '.join(self.choices)}; got {out!r}")
        if type_ in ("float", "int", "floats"):
            bad = (
                (self.ge is not None and out < self.ge)
                or (self.le is not None and out > self.le)
                or (self.gt is not None and out <= self.gt)
                or (self.lt is not None and out >= self.lt)
            )
            if bad:
                raise ParameterError(f"{where} must be in {self.describe_range()}, got {out!r}")
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "default": list(self.default) if isinstance(self.default, tuple) else self.default,
            "range": self.describe_range(),
            "per_expert": self.per_expert,
            "help": self.help,
        }


@dataclass(frozen=True)
class InputContract:
    """Which models a method accepts.

    ``base``: ``"required"`` (task-vector methods), ``"optional"`` (used when given), or
    ``"unused"`` (the kernel always receives ``base=None``; the base folder only supplies
    config and tokenizer). ``max_experts=None`` means unbounded.
    """

    base: Literal["required", "optional", "unused"] = "required"
    min_experts: int = 1
    max_experts: int | None = None
    per_expert_weights: bool = True
    min_models: int | None = None
    """Fewest models the kernel needs, counting a given base when the method uses it
    (``base != "unused"``); e.g. SLERP takes a base and one expert, or two experts."""
    weights_normalized: bool | str = False
    """Whether the kernel divides by the sum of the per-expert weights: ``True`` always, or
    the name of the bool parameter that turns the division on (e.g. ``"normalize"``). A
    zero sum is then rejected before any tensor is read."""
    nonnegative_weights: bool = False
    """Whether negative per-expert weights are meaningless for the method (e.g. a mean on
    the sphere) and rejected before any tensor is read."""

    def check(self, method: str, has_base: bool, n_experts: int, has_weights: bool = False) -> None:
        if self.base == "required" and not has_base:
            raise ParameterError(f"method {method!r} needs a base model (pass --base)")
        if self.min_models is not None:
            n_models = n_experts + (1 if has_base and self.base != "unused" else 0)
            if n_models < self.min_models:
                raise ParameterError(
                    f"method {method!r} needs {self.min_models} models (a base and {self.min_models - 1} expert(s), "
                    f"or {self.min_models} experts), got {n_experts} expert(s)" + (" and a base" if has_base else "")
                )
        if n_experts < self.min_experts:
            raise ParameterError(f"method {method!r} needs at least {self.min_experts} experts, got {n_experts}")
        if self.max_experts is not None and n_experts > self.max_experts:
            raise ParameterError(f"method {method!r} accepts at most {self.max_experts} experts, got {n_experts}")
        if has_weights and not self.per_expert_weights:
            raise ParameterError(f"method {method!r} does not take per-expert weights")

    def check_weights(self, method: str, weights: Sequence[float], params: Mapping[str, Any]) -> None:
        """Reject per-expert weights the kernel cannot use: NaN or infinite values (any
        method), a zero sum where the method divides by it, negative values where the
        method declares them meaningless. Raises :class:`ParameterError` naming the value."""
        shown = "[" + ", ".join(f"{w:g}" for w in weights) + "]"
        for i, w in enumerate(weights):
            if not math.isfinite(w):
                raise ParameterError(f"method {method!r}: parameter 'weights' must be finite numbers; weight {i} is {w} in {shown}")
        if self.nonnegative_weights:
            neg = [i for i, w in enumerate(weights) if w < 0]
            if neg:
                raise ParameterError(
                    f"method {method!r}: parameter 'weights' must be nonnegative; weight {neg[0]} is {weights[neg[0]]:g} in {shown}"
                )
        switch = self.weights_normalized
        divides = switch is True or (isinstance(switch, str) and params.get(switch) is True)
        if divides and math.fsum(weights) == 0:
            why = f" ({switch}=true)" if isinstance(switch, str) else ""
            raise ParameterError(
                f"method {method!r}: parameter 'weights' {shown} sums to zero, and the method divides by the sum{why}"
            )


Prepass = Callable[[torch.Tensor | None, Sequence[torch.Tensor], Mapping[str, Any], TensorContext], Mapping[str, float]]


@dataclass(frozen=True)
class MethodSpec:
    """A registered merge method: metadata, parameters, input contract and the kernel.

    Calling the spec calls the kernel (after no validation: validate once per run with
    :meth:`validate_params`, not once per tensor).
    """

    name: str
    kernel: Kernel
    version: str = "1.0"
    citation: str = ""
    summary: str = ""
    params: tuple[Param, ...] = ()
    contract: InputContract = field(default_factory=InputContract)
    granularity: Granularity = "tensor"
    stochastic: bool = False
    prepass: Prepass | None = None
    aux_inputs: tuple[str, ...] = ()
    properties: frozenset[str] = frozenset()
    """Math properties the conformance kit may check, beyond the universal ones:
    ``identity_on_base`` (experts == base -> base), ``idempotent`` (identical experts ->
    that tensor), ``order_invariant`` (equal weights -> expert order does not matter),
    ``nonfinite_propagates`` (a NaN/inf anywhere in any input the kernel is given, at any
    weight including 0, makes the output non-finite or the kernel raise). With the last one
    the engine checks inputs through the output (one pass instead of one per input)."""
    source: str = ""
    validate: Callable[[dict[str, Any], int | None], dict[str, Any]] | None = None
    """Optional cross-parameter check run at the end of :meth:`validate_params` (e.g. a
    wrapper validating the wrapped method's parameters); returns the (possibly completed)
    parameters or raises :class:`ParameterError`."""
    paper: str | None = None
    """Key of the method's own paper in the paper registry (``mergebench.config.papers``); ``citation``
    stays the free-text form (a plugin may give only that, or a ``reference_url``)."""
    related_papers: tuple[str, ...] = ()
    """Registry keys of papers the method follows besides its own (the form it is written in, a
    paper it is applied as in)."""
    reference_url: str = ""
    """A URL for the method when it has no registry paper (the paper's URL is used otherwise)."""
    calibration: CalibrationNeed | None = None
    """What calibration data the method needs (:mod:`mergebench.methods.calibration`): statistics
    the engine computes per expert (input Gram matrices, diagonal Fisher) and/or a model-level
    step, handed to the kernel in ``ctx.aux``. None for data-free methods."""
    outputs: Literal["merged", "per_task"] = "merged"
    """``"per_task"``: the method builds one model per task (EMR-Merging). It then takes a nullable
    int parameter ``task`` (the expert's index; None = its unified model), and the evaluation
    scores each task with that task's model."""

    def __post_init__(self):
        if self.outputs == "per_task" and not any(p.name == "task" and p.type == "int" and p.nullable for p in self.params):
            raise ParameterError(f"method {self.name!r} declares per-task outputs but no nullable int parameter 'task'")
        if self.calibration is not None:
            by_name = {p.name: p for p in self.params}
            for field_, pname in self.calibration.budget_params.items():
                if pname not in by_name or by_name[pname].type != "int":
                    raise ParameterError(f"method {self.name!r}: calibration budget field {field_!r} names "
                                         f"{pname!r}, which is not an int parameter of the method")
        if self.paper is not None or self.related_papers:
            for key in (self.paper, *self.related_papers):
                if key is not None:
                    get_paper(key)

    def paper_info(self) -> dict[str, Any] | None:
        """The registry entry of :attr:`paper` (title, authors, year, venue, arXiv, URL), or None."""
        return get_paper(self.paper).describe() if self.paper else None

    def url(self) -> str:
        """``reference_url``, else the paper's URL; "" when neither is known."""
        info = self.paper_info()
        return self.reference_url or (info["url"] if info else "")

    def __call__(self, base, experts, weights, params, ctx):  # noqa: D102 - see Kernel
        return self.kernel(base, experts, weights, params, ctx)

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}

    def validate_params(self, given: Mapping[str, Any] | None = None, n_experts: int | None = None) -> dict[str, Any]:
        """Merge ``given`` over the defaults, coerce types and check ranges.

        Unknown names are an error that lists the valid ones (typos must not be ignored).
        """
        given = dict(given or {})
        unknown = sorted(set(given) - set(self.param_names))
        if unknown:
            valid = ", ".join(self.param_names) or "(none)"
            raise ParameterError(f"method {self.name!r} has no parameter {', '.join(map(repr, unknown))}; valid: {valid}")
        out: dict[str, Any] = {}
        for p in self.params:
            value = given.get(p.name, p.default)
            out[p.name] = p.coerce(value, self.name, n_experts) if value is not None or not p.nullable else None
        return self.validate(out, n_experts) if self.validate is not None else out

    def describe(self) -> dict[str, Any]:
        """JSON-ready description (``mergebench methods --json``), with the registry entries of
        the method's papers."""
        c = self.contract
        return {
            "name": self.name,
            "version": self.version,
            "summary": self.summary,
            "citation": self.citation,
            "paper": self.paper_info(),
            "related_papers": [get_paper(k).describe() for k in self.related_papers],
            "url": self.url(),
            "granularity": self.granularity,
            "stochastic": self.stochastic,
            "base": c.base,
            "min_experts": c.min_experts,
            "max_experts": c.max_experts,
            "min_models": c.min_models,
            "per_expert_weights": c.per_expert_weights,
            "aux_inputs": list(self.aux_inputs),
            "params": [p.as_dict() for p in self.params],
            "source": self.source,
            "data_dependent": self.calibration is not None,
            "calibration": self.calibration.describe() if self.calibration is not None else None,
            "outputs": self.outputs,
        }
