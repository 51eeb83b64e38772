"""Method registry: a decorator for authors, entry points for discovery.

Built-in methods (``baselines/``) and third-party plugins are found the same way: through
the ``mergebench.methods`` entry-point group, whose targets are :class:`MethodSpec`
objects (or modules/lists of them). Methods defined in a script can be registered directly
with :func:`register` or the :func:`method` decorator.
"""

from __future__ import annotations

import importlib.metadata as md
import warnings
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any, Literal

from ..errors import MergebenchError
from .calibration import CalibrationNeed
from .spec import Granularity, InputContract, Kernel, MethodSpec, Param

ENTRY_POINT_GROUP = "mergebench.methods"

_REGISTRY: dict[str, MethodSpec] = {}
_BROKEN: dict[str, str] = {}  # entry point name -> why it failed to load
_ENTRY_POINTS_LOADED = False


class UnknownMethodError(MergebenchError, KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0])


def register(spec: MethodSpec, *, replace: bool = False) -> MethodSpec:
    """Add ``spec`` to the registry; a different method under a taken name is an error."""
    current = _REGISTRY.get(spec.name)
    if current is not None and current is not spec and not replace:
        if (current.kernel.__module__, current.kernel.__qualname__) != (spec.kernel.__module__, spec.kernel.__qualname__):
            raise ValueError(
                f"method name {spec.name!r} is registered twice: by {current.source or current.kernel.__module__} "
                f"and by {spec.source or spec.kernel.__module__}"
            )
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> MethodSpec | None:
    """Remove the method registered in this process under ``name`` (a notebook cell or a test
    that defines a method); the removed spec, or None. Entry points are not touched."""
    return _REGISTRY.pop(name, None)


def method(
    name: str,
    *,
    version: str = "1.0",
    citation: str = "",
    paper: str | None = None,
    related_papers: Iterable[str] = (),
    reference_url: str = "",
    params: Iterable[Param] = (),
    contract: InputContract | None = None,
    granularity: Granularity = "tensor",
    stochastic: bool = False,
    prepass=None,
    aux_inputs: Iterable[str] = (),
    properties: Iterable[str] = (),
    summary: str | None = None,
    validate=None,
    calibration: CalibrationNeed | None = None,
    outputs: Literal["merged", "per_task"] = "merged",
) -> Callable[[Kernel], MethodSpec]:
    """Decorator turning a kernel function into a registered :class:`MethodSpec`.

    The first line of the kernel's docstring becomes the summary unless given. ``calibration``
    declares the data a data-dependent method needs (docs/data-dependent.md); ``outputs="per_task"``
    a method that builds one model per task.
    """

    def wrap(kernel: Kernel) -> MethodSpec:
        doc = (kernel.__doc__ or "").strip().splitlines()
        spec = MethodSpec(
            name=name,
            kernel=kernel,
            version=version,
            citation=citation,
            summary=summary if summary is not None else (doc[0] if doc else ""),
            params=tuple(params),
            contract=contract or InputContract(),
            granularity=granularity,
            stochastic=stochastic,
            prepass=prepass,
            aux_inputs=tuple(aux_inputs),
            properties=frozenset(properties),
            source=kernel.__module__,
            validate=validate,
            paper=paper,
            related_papers=tuple(related_papers),
            reference_url=reference_url,
            calibration=calibration,
            outputs=outputs,
        )
        return register(spec)

    return wrap


def _specs_in(obj: Any) -> list[MethodSpec]:
    if isinstance(obj, MethodSpec):
        return [obj]
    if isinstance(obj, ModuleType):
        return [v for v in vars(obj).values() if isinstance(v, MethodSpec)]
    if isinstance(obj, (list, tuple)):
        return [s for o in obj for s in _specs_in(o)]
    raise TypeError(f"entry point target {obj!r} is not a MethodSpec, a list of them, or a module")


def load_entry_points(force: bool = False) -> None:
    """Import every ``mergebench.methods`` entry point (once per process).

    A plugin that fails to import is recorded (see :func:`broken_plugins`) and a warning is
    issued, but it does not hide the other methods; asking for a method that is missing
    then names the broken plugins in the error.
    """
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED and not force:
        return
    _ENTRY_POINTS_LOADED = True
    for ep in md.entry_points(group=ENTRY_POINT_GROUP):
        try:
            target = ep.load()
            if isinstance(target, MethodSpec) and target.name != ep.name:
                raise ValueError(f"the entry point is named {ep.name!r} but its method is named {target.name!r}")
            specs = _specs_in(target)
            for spec in specs:
                register(spec)
        except Exception as exc:
            _BROKEN[ep.name] = f"{ep.value}: {type(exc).__name__}: {exc}"
            warnings.warn(f"mergebench method plugin {ep.name!r} could not be loaded ({_BROKEN[ep.name]})", stacklevel=2)


def broken_plugins() -> dict[str, str]:
    """Entry points that failed to load, with the reason."""
    load_entry_points()
    return dict(_BROKEN)


def get_method(name: str) -> MethodSpec:
    """Look a method up by name (loading entry points first)."""
    load_entry_points()
    try:
        return _REGISTRY[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        broken = "".join(f"\n  plugin {k!r} failed to load: {v}" for k, v in _BROKEN.items())
        raise UnknownMethodError(
            f"unknown merge method {name!r}{hint} (run `mergebench methods` to list them){broken}"
        ) from None


def list_methods() -> list[MethodSpec]:
    """All registered methods, sorted by name."""
    load_entry_points()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]
