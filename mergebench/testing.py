"""Conformance kit for merge methods, in the spirit of scikit-learn's ``check_estimator``.

    from mergebench.testing import check_method
    check_method(my_method)            # raises AssertionError naming the failed check

or, to get one pytest item per check::

    @pytest.mark.parametrize("check", method_checks(my_method), ids=lambda c: c.name)
    def test_conformance(check):
        check()

Checks run on small random tensors with the method's default parameters (or ``params``).
Universal checks: shapes and dtypes, determinism, no input mutation, finite results on
degenerate inputs, strided (non-contiguous) inputs giving the contiguous inputs' result, and
non-finite inputs (NaN, inf in an expert or the base) never vanishing silently: the kernel
must raise or let them reach the output. Property checks (``identity_on_base``, ``idempotent``, ``order_invariant``) run only for the
properties the method declares, because e.g. un-normalized task arithmetic is legitimately
not idempotent. Auxiliary inputs (``aux_inputs``) are not supplied: methods must treat them
as optional.

Data-dependent methods (``spec.calibration``) get synthetic statistics as the engine would hand
them over, derived from each expert's own tensor (so reordering or duplicating experts reorders or
duplicates them): a positive ``fisher`` shaped like the tensor, an SPD ``(in, in)`` ``gram`` for
2-D tensors. A model step's output is not synthesised: kernels must accept tensors the step did
not cover. The declaration itself is checked (budget, budget parameters, per-task outputs).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import MergebenchError
from .methods.calibration import CalibrationBudget, CalibrationNeed, calibration_of
from .methods.spec import MethodSpec, ModuleKind, ParameterError, TensorContext, tensor_seed

__all__ = ["Check", "CheckFailure", "ConformanceReport", "check_method", "method_checks", "run_kernel",
           "synthetic_statistics"]


class CheckFailure(MergebenchError, AssertionError):
    pass


@dataclass(frozen=True)
class Check:
    name: str
    fn: Callable[[], None]
    requires: str | None = None  # "cuda": the check does nothing (passes vacuously) without a GPU

    def __call__(self) -> None:
        try:
            self.fn()
        except CheckFailure:
            raise
        except Exception as exc:  # report crashes as failures of this check
            raise CheckFailure(f"{self.name}: raised {type(exc).__name__}: {exc}") from exc


_CONTEXTS = {
    "matrix": TensorContext(name="model.layers.1.mlp.down_proj.weight", layer=1, num_layers=4, kind=ModuleKind.MLP),
    "attention": TensorContext(name="model.layers.2.self_attn.q_proj.weight", layer=2, num_layers=4, kind=ModuleKind.ATTENTION),
    "vector": TensorContext(name="model.layers.1.input_layernorm.weight", layer=1, num_layers=4, kind=ModuleKind.NORM),
    "embedding": TensorContext(name="model.embed_tokens.weight", layer=None, num_layers=4, kind=ModuleKind.EMBEDDING),
}
_SHAPES = {"matrix": (24, 16), "attention": (16, 16), "vector": (16,), "embedding": (40, 16)}


def _n_experts(spec: MethodSpec) -> int:
    c = spec.contract
    n = max(c.min_experts, 3)
    return min(n, c.max_experts) if c.max_experts is not None else n


def run_kernel(
    spec: MethodSpec,
    base: torch.Tensor | None,
    experts: Sequence[torch.Tensor],
    params: Mapping[str, Any],
    ctx: TensorContext,
    weights: torch.Tensor | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Call a kernel as the engine does: base dropped if unused, generator seeded per
    tensor for stochastic methods, prepass statistics supplied."""
    if spec.contract.base == "unused":
        base = None
    if weights is None:
        weights = torch.ones(len(experts), dtype=torch.float32)
    gen = None
    device = experts[0].device
    if spec.stochastic:
        gen = torch.Generator(device=device)
        gen.manual_seed(tensor_seed(ctx.name, seed))
    aux = {**synthetic_statistics(spec, experts), **dict(ctx.aux)}
    stats = {}
    if spec.prepass is not None:
        pctx = TensorContext(name=ctx.name, layer=ctx.layer, num_layers=ctx.num_layers, kind=ctx.kind, aux=aux)
        stats = {ctx.name: dict(spec.prepass(base, experts, params, pctx))}
    ctx = TensorContext(
        name=ctx.name, layer=ctx.layer, num_layers=ctx.num_layers, kind=ctx.kind, generator=gen,
        model_stats=stats, aux=aux,
    )
    return spec.kernel(base, list(experts), weights, params, ctx)


def synthetic_statistics(spec: MethodSpec, experts: Sequence[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """Stand-ins for the calibration statistics ``spec`` declares, each a function of one expert's
    tensor: ``fisher`` = 0.05 + theta^2 (positive, shaped like it); ``gram`` = theta^T theta / out +
    0.1 I (SPD, ``(in, in)``; 2-D tensors only, as the engine gives Grams to linear weights only)."""
    need = calibration_of(spec)
    out: dict[str, list[torch.Tensor]] = {}
    if need is None:
        return out
    if "fisher" in need.statistics:
        out["fisher"] = [0.05 + e.square() for e in experts]
    if "gram" in need.statistics and experts[0].dim() == 2:
        eye = torch.eye(experts[0].shape[1], dtype=experts[0].dtype, device=experts[0].device)
        out["gram"] = [e.T @ e / e.shape[0] + 0.1 * eye for e in experts]
    return out


def _inputs(spec, shape, n, dtype=torch.float32, device="cpu", seed=0, spread=0.1):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    experts = [(base.double() + spread * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype) for _ in range(n)]
    return base.to(device), [e.to(device) for e in experts]


def _close(a: torch.Tensor, b: torch.Tensor, what: str, atol=1e-5, rtol=1e-4) -> None:
    if a.shape != b.shape:
        raise CheckFailure(f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}")
    if not torch.allclose(a.double().cpu(), b.double().cpu(), atol=atol, rtol=rtol):
        err = (a.double().cpu() - b.double().cpu()).abs().max().item()
        raise CheckFailure(f"{what}: max abs difference {err:.3g}")


def _finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise CheckFailure(f"{what}: result has NaN or inf")


def _strided(t: torch.Tensor, how: str) -> torch.Tensor:
    """A non-contiguous tensor equal to ``t``: a transposed view or every other column/element."""
    if how == "transposed" and t.dim() == 2:
        return t.T.contiguous().T
    wide = torch.zeros((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def _with_ties(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to a coarse grid, so magnitudes (and task-vector entries) tie often."""
    return torch.round(t * 8) / 8


def method_checks(spec: MethodSpec, params: Mapping[str, Any] | None = None) -> list[Check]:
    """The list of checks for ``spec`` (each a zero-argument callable raising CheckFailure)."""
    n = _n_experts(spec)
    p = spec.validate_params(params, n_experts=n)
    checks: list[Check] = []

    def add(name, requires=None):
        def deco(fn):
            checks.append(Check(f"{spec.name}:{name}", fn, requires))
            return fn

        return deco

    @add("metadata")
    def _():
        if not spec.name or not spec.name.replace("_", "").isalnum():
            raise CheckFailure(f"name {spec.name!r} must be a non-empty identifier")
        if not spec.version:
            raise CheckFailure("version is empty")
        if not spec.citation:
            raise CheckFailure("citation is empty: say which paper or source the method follows")
        for prm in spec.params:
            prm.coerce(prm.default, spec.name, n) if prm.default is not None else None

    need = calibration_of(spec)
    if need is not None:

        @add("calibration_declaration")
        def _():
            if not isinstance(need, CalibrationNeed):
                raise CheckFailure(f"calibration must be a CalibrationNeed, got {type(need).__name__}")
            if not isinstance(need.budget, CalibrationBudget):
                raise CheckFailure("calibration.budget must be a CalibrationBudget")
            if not need.budget.source:
                raise CheckFailure("calibration.budget.source is empty: say where the budget comes from")
            clash = sorted(set(need.aux_keys) & set(spec.aux_inputs))
            if clash:
                raise CheckFailure(f"calibration statistic(s) {', '.join(clash)} are also checkpoint aux_inputs")
            budget = need.resolve_budget(p)
            if budget.documents < 1 or budget.max_tokens < 1:
                raise CheckFailure(f"the default parameters give an empty calibration budget: {budget.describe()}")

    if spec.outputs == "per_task":

        @add("per_task_outputs")
        def _():
            base, experts = _inputs(spec, _SHAPES["matrix"], n)
            for k in range(n):
                pk = spec.validate_params({**p, "task": k}, n_experts=n)
                out = run_kernel(spec, base, experts, pk, _CONTEXTS["matrix"])
                if out.shape != experts[0].shape:
                    raise CheckFailure(f"task {k}: shape {tuple(out.shape)}")
                _finite(out, f"task {k}")
            try:
                spec.validate_params({**p, "task": n}, n_experts=n)
            except ParameterError:
                pass
            else:
                raise CheckFailure(f"task={n} with {n} experts must be rejected by validate_params (no tensor read)")
            if spec.contract.min_experts <= 1:
                one = run_kernel(spec, base, experts[:1], spec.validate_params({**p, "task": 0}, n_experts=1),
                                 _CONTEXTS["matrix"])
                _close(one, experts[0], "task 0 of a single expert must be that expert")

    for key in _CONTEXTS:

        @add(f"shape_dtype[{key}]")
        def _(key=key):
            for dtype in (torch.float32, torch.float64):
                base, experts = _inputs(spec, _SHAPES[key], n, dtype)
                out = run_kernel(spec, base, experts, p, _CONTEXTS[key])
                if not isinstance(out, torch.Tensor):
                    raise CheckFailure(f"kernel returned {type(out).__name__}, not a tensor")
                if out.shape != experts[0].shape or out.dtype != dtype:
                    raise CheckFailure(f"{key}/{dtype}: got shape {tuple(out.shape)} dtype {out.dtype}, expected {tuple(experts[0].shape)} {dtype}")
                _finite(out, f"{key}/{dtype}")

    @add("deterministic")
    def _():
        base, experts = _inputs(spec, _SHAPES["matrix"], n)
        a = run_kernel(spec, base, experts, p, _CONTEXTS["matrix"], seed=7)
        b = run_kernel(spec, base, experts, p, _CONTEXTS["matrix"], seed=7)
        if not torch.equal(a, b):
            raise CheckFailure("two runs with the same seed differ" + (" (use ctx.generator, never the global RNG)" if spec.stochastic else ""))
        if spec.stochastic:
            state = torch.get_rng_state()
            torch.manual_seed(12345)
            c = run_kernel(spec, base, experts, p, _CONTEXTS["matrix"], seed=7)
            torch.manual_seed(54321)
            d = run_kernel(spec, base, experts, p, _CONTEXTS["matrix"], seed=7)
            torch.set_rng_state(state)
            if not torch.equal(c, d):
                raise CheckFailure("result depends on the global RNG; draw from ctx.generator")

    @add("no_input_mutation")
    def _():
        base, experts = _inputs(spec, _SHAPES["matrix"], n)
        copies = [base.clone()] + [e.clone() for e in experts]
        weights = torch.ones(n)
        run_kernel(spec, base, experts, p, _CONTEXTS["matrix"], weights=weights)
        for orig, now in zip(copies, [base, *experts]):
            if not torch.equal(orig, now):
                raise CheckFailure("the kernel modified one of its input tensors in place")
        if not torch.equal(weights, torch.ones(n)):
            raise CheckFailure("the kernel modified the weights tensor in place")

    for key, how in (("matrix", "transposed"), ("matrix", "sliced"), ("vector", "sliced")):

        @add(f"noncontiguous[{key}/{how}]")
        def _(key=key, how=how):
            for ties in (False, True):
                base, experts = _inputs(spec, _SHAPES[key], n, torch.float64, spread=0.3)
                if ties:
                    base, experts = _with_ties(base), [_with_ties(e) for e in experts]
                want = run_kernel(spec, base, experts, p, _CONTEXTS[key], seed=3)
                sb, se = _strided(base, how), [_strided(e, how) for e in experts]
                if sb.is_contiguous() or any(e.is_contiguous() for e in se):
                    raise AssertionError("the kit failed to build non-contiguous inputs")
                got = run_kernel(spec, sb, se, p, _CONTEXTS[key], seed=3)
                if not isinstance(got, torch.Tensor) or got.shape != want.shape:
                    raise CheckFailure(f"{how} inputs ({key}) gave {type(got).__name__} {tuple(getattr(got, 'shape', ()))}")
                _close(got, want, f"{how} (non-contiguous) inputs ({key}{', with ties' if ties else ''}) changed the result",
                       atol=1e-9, rtol=1e-9)

    # an optional base may legitimately go unused (SLERP of two experts), a required one may not
    where = ["expert 0"] + (["the base"] if spec.contract.base == "required" else [])
    for who in where:
        for bad in (float("nan"), float("inf"), float("-inf")):

            @add(f"nonfinite_input[{who}/{bad}]")
            def _(who=who, bad=bad):
                for key in ("matrix", "vector"):
                    base, experts = _inputs(spec, _SHAPES[key], n)
                    target = experts[0] if who == "expert 0" else base
                    target.view(-1)[target.numel() // 3] = bad
                    try:
                        out = run_kernel(spec, base, experts, p, _CONTEXTS[key])
                    except Exception:
                        continue  # refusing non-finite input is fine; hiding it is not
                    if isinstance(out, torch.Tensor) and bool(torch.isfinite(out).all()):
                        raise CheckFailure(
                            f"a {bad} in {who} ({key}) gave an all-finite result: non-finite inputs must reach "
                            "the output (or make the kernel raise), never vanish silently"
                        )

    if "nonfinite_propagates" in spec.properties:

        @add("nonfinite_propagates")
        def _():
            """The declared guarantee the engine relies on: a NaN/inf at any position of any
            input, even one weighted 0, reaches the output (or makes the kernel raise)."""
            targets = list(range(n)) + (["base"] if spec.contract.base == "required" else [])
            for key in ("matrix", "vector"):
                numel = int(torch.Size(_SHAPES[key]).numel())
                for who in targets:
                    weightings = [None]
                    if spec.contract.per_expert_weights and who != "base":
                        w = torch.ones(n)
                        w[who] = 0.0
                        weightings.append(w)
                    for pos in (0, numel // 2, numel - 1):
                        for bad in (float("nan"), float("inf")):
                            for weights in weightings:
                                base, experts = _inputs(spec, _SHAPES[key], n)
                                (base if who == "base" else experts[who]).view(-1)[pos] = bad
                                try:
                                    out = run_kernel(spec, base, experts, p, _CONTEXTS[key], weights=weights)
                                except Exception:
                                    continue
                                if bool(torch.isfinite(out).all()):
                                    at = "weight 0" if weights is not None else "weight 1"
                                    raise CheckFailure(
                                        f"declares nonfinite_propagates, but a {bad} at flat index {pos} of "
                                        f"{'the base' if who == 'base' else f'expert {who}'} ({key}, {at}) gave an "
                                        "all-finite result"
                                    )

    @add("zero_tensors_finite")
    def _():
        for key in ("matrix", "vector"):
            z = torch.zeros(_SHAPES[key])
            _finite(run_kernel(spec, z, [z.clone() for _ in range(n)], p, _CONTEXTS[key]), f"all-zero inputs ({key})")

    @add("zero_deltas_finite")
    def _():
        for key in ("matrix", "vector"):
            base, _e = _inputs(spec, _SHAPES[key], n)
            out = run_kernel(spec, base, [base.clone() for _ in range(n)], p, _CONTEXTS[key])
            _finite(out, f"experts equal to the base ({key})")

    if "identity_on_base" in spec.properties:

        @add("identity_on_base")
        def _():
            for key in ("matrix", "vector"):
                base, _e = _inputs(spec, _SHAPES[key], n)
                out = run_kernel(spec, base, [base.clone() for _ in range(n)], p, _CONTEXTS[key])
                _close(out, base, f"experts identical to the base ({key}) must give the base")

    if "idempotent" in spec.properties:

        @add("idempotent")
        def _():
            for key in ("matrix", "vector"):
                base, experts = _inputs(spec, _SHAPES[key], n)
                out = run_kernel(spec, base, [experts[0].clone() for _ in range(n)], p, _CONTEXTS[key])
                _close(out, experts[0], f"identical experts ({key}) must give that expert")

    if "order_invariant" in spec.properties and n > 1:

        @add("order_invariant")
        def _():
            base, experts = _inputs(spec, _SHAPES["matrix"], n)
            a = run_kernel(spec, base, experts, p, _CONTEXTS["matrix"])
            b = run_kernel(spec, base, experts[::-1], p, _CONTEXTS["matrix"])
            _close(a, b, "reversing the expert order (equal weights) changed the result")

    @add("devices", requires="cuda")
    def _():
        if not torch.cuda.is_available():
            return
        base, experts = _inputs(spec, _SHAPES["matrix"], n)
        cpu = run_kernel(spec, base, experts, p, _CONTEXTS["matrix"])
        cuda = run_kernel(spec, base.cuda(), [e.cuda() for e in experts], p, _CONTEXTS["matrix"])
        if cuda.device.type != "cuda":
            raise CheckFailure(f"CUDA inputs gave a result on {cuda.device}")
        if not spec.stochastic:
            _close(cuda.cpu(), cpu, "CUDA and CPU results differ", atol=1e-4, rtol=1e-3)

    return checks


@dataclass(frozen=True)
class ConformanceReport:
    """What :func:`check_method` ran: ``str(report)`` is its one-line summary."""

    name: str
    version: str
    passed: tuple[str, ...]
    skipped: tuple[str, ...] = ()  # checks that need hardware this machine lacks (CUDA)

    def __str__(self) -> str:
        line = f"{self.name} {self.version}: {len(self.passed)} checks passed"
        if self.skipped:
            line += f", {len(self.skipped)} skipped (need CUDA: {', '.join(n.split(':', 1)[-1] for n in self.skipped)})"
        return line


def check_method(spec: MethodSpec, params: Mapping[str, Any] | None = None, *, quiet: bool = False) -> ConformanceReport:
    """Run every check; raise one AssertionError listing all failures. On success, print (unless
    ``quiet``) and return a :class:`ConformanceReport`, e.g. ``median 0.1.0: 21 checks passed``."""
    failures, passed, skipped = [], [], []
    for check in method_checks(spec, params):
        if check.requires == "cuda" and not torch.cuda.is_available():
            skipped.append(check.name)
            continue
        try:
            check()
        except CheckFailure as exc:
            failures.append(str(exc) if str(exc).startswith(spec.name) else f"{check.name}: {exc}")
        else:
            passed.append(check.name)
    if failures:
        raise CheckFailure(f"method {spec.name!r} failed {len(failures)} conformance check(s):\n  " + "\n  ".join(failures))
    report = ConformanceReport(spec.name, spec.version, tuple(passed), tuple(skipped))
    if not quiet:
        print(report)
    return report
