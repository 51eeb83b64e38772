"""The streaming merge loop: validate, open headers, check compatibility, then merge tensor by tensor.

Nothing expensive happens before everything cheap has been checked: parameters and the input
contract first, then checkpoint headers and compatibility, and only then are weights read.
Each tensor of each input is read on its own (row chunks of it for elementwise methods), moved
to the compute device and dtype, merged by the method's kernel, cast to the output dtype and
handed to the writer (or kept in memory), so peak memory is a few tensors times the number of
inputs, whatever the model size.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from ..errors import MergebenchError
from ..methods import (
    MethodSpec,
    ParameterError,
    TensorContext,
    count_layers,
    get_method,
    layer_index,
    module_kind,
    tensor_seed,
)
from ..memory import peak_rss_bytes, reset_peak_rss
from mergebench.engine.request import MergeRequest
from ..methods.calibration import calibration_of
from .calibration import CalibrationData, calibrate
from .checkpoint import Checkpoint, open_checkpoint
from .compat import MergePlan, Source, TensorPlan, plan_merge
from .device import resolve_device
from .writer import ShardedWriter, check_destination

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "PROVENANCE_FILE",
    "MergeError",
    "MergeResult",
    "NonFiniteError",
    "NonFiniteInputError",
    "NonFiniteOutputError",
    "all_finite",
    "merge",
    "peak_rss_bytes",
    "tensor_seed",
]

DEFAULT_CHUNK_BYTES = 256 * 1024**2
"""Largest slice of one input an elementwise method sees at once (bounds memory on huge embeddings)."""

PROVENANCE_FILE = "mergebench_merge.json"
_SIDE_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "merges.txt",
    "chat_template.jinja", "chat_template.json",
)


class MergeError(MergebenchError, RuntimeError):
    """A kernel broke its contract (wrong shape or type) during the merge."""


class NonFiniteError(MergebenchError, ValueError):
    """NaN or infinite values where the merge cannot accept them."""


class NonFiniteInputError(NonFiniteError):
    """An input tensor holds NaN/inf values (names the checkpoint, its file and the tensor)."""


class NonFiniteOutputError(MergeError, NonFiniteError):
    """A method produced NaN/inf values from finite inputs (names the method and the tensor)."""


def all_finite(t: torch.Tensor) -> bool:
    """True when ``t`` holds no NaN or infinity (always true for integer tensors). Exact.

    One reduction pass and one host sync in the usual case: a finite sum proves every element
    finite (a NaN or inf anywhere makes any IEEE sum non-finite). Only when the sum is not
    finite (a bad value, or a sum of huge finite values overflowing) is the elementwise test
    run. On CPU the sum is about 2x faster than ``torch.aminmax`` and ~20x faster than
    ``torch.isfinite(t).all()``, which allocates a mask.
    """
    if not t.is_floating_point() or t.numel() == 0:
        return True
    return math.isfinite(t.sum().item()) or bool(torch.isfinite(t).all())


def _nonfinite_summary(t: torch.Tensor, row0: int = 0) -> str:
    """``3 NaN and 1 inf value(s), the first at index (2, 5)`` (failure path only: full scans);
    ``row0``: the first row of ``t`` in the whole tensor (``t`` may be a row chunk)."""
    bad = ~torch.isfinite(t)
    nan = int(torch.isnan(t).sum())
    first = [int(i) for i in torch.nonzero(bad)[0]] if t.dim() else []
    if first:
        first[0] += row0
    first = tuple(first)
    return f"{nan} NaN and {int(bad.sum()) - nan} inf value(s), the first at index {first}"


@dataclass
class MergeResult:
    """What a merge produced and how: output (folder or state dict), timings and provenance."""

    method: str
    method_version: str
    params: dict[str, Any]
    weights: list[float]
    seed: int
    compute_dtype: str
    out_dtype: str
    reference_path: Path
    """Folder supplying config and tokenizer (the base, else the first expert)."""
    config: dict[str, Any] | None
    """The output ``config.json`` (vocabulary size, tying and dtype updated)."""
    inputs: list[dict[str, str]]
    """Provenance of every input: role, source as given, resolved path, content fingerprint."""
    out: Path | None = None
    state_dict: dict[str, torch.Tensor] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    bytes_read: int = 0
    bytes_written: int = 0
    peak_rss_bytes: int | None = None
    """Peak resident memory of the process during the merge (VmHWM, reset at the start on Linux)."""
    notes: list[str] = field(default_factory=list)
    n_tensors: int = 0
    calibration: dict[str, Any] | None = None
    """For data-dependent methods: what calibration read and produced (budget, documents, tokens,
    the data's origin and hash, a model step's log); see :mod:`mergebench.engine.calibration`."""

    def summary(self) -> str:
        """One line for logs: tensors, bytes read, time, throughput, peak memory."""
        total = self.timings.get("total_s", 0.0)
        rate = self.bytes_read / total / 1e9 if total else 0.0
        peak = f", peak RSS {self.peak_rss_bytes / 1e9:.2f} GB" if self.peak_rss_bytes else ""
        return f"{self.n_tensors} tensors, {self.bytes_read / 1e9:.2f} GB read in {total:.1f} s ({rate:.2f} GB/s){peak}"

    def provenance(self) -> dict[str, Any]:
        """JSON-ready record of what was merged (no timings, so it is reproducible)."""
        from .. import __version__

        return {
            "mergebench_version": __version__,
            "method": self.method,
            "method_version": self.method_version,
            "params": self.params,
            "weights": self.weights,
            "seed": self.seed,
            "compute_dtype": self.compute_dtype,
            "out_dtype": self.out_dtype,
            "inputs": self.inputs,
            "notes": self.notes,
            **({"calibration": {k: v for k, v in self.calibration.items() if not k.endswith("_s") and k != "seconds"}}
               if self.calibration is not None else {}),
        }


# -- step 1: validation (no file is opened) ------------------------------------------------


def _validate(request: MergeRequest) -> tuple[MethodSpec, dict[str, Any], torch.Tensor]:
    spec = get_method(request.method)
    n = len(request.experts)
    spec.contract.check(spec.name, request.base is not None, n, has_weights=request.weights is not None)
    if request.weights is not None and len(request.weights) != n:
        raise ParameterError(f"parameter 'weights': {len(request.weights)} weights given for {n} experts")
    by_name = {p.name: p for p in spec.params}
    for key in request.per_expert_params:
        if key in request.params:
            raise ParameterError(f"parameter {key!r} is given both in params and in per_expert_params")
        if key in by_name and not by_name[key].per_expert:
            raise ParameterError(f"method {spec.name!r}: parameter {key!r} is not per-expert; pass one value in params")
    params = spec.validate_params({**request.params, **request.per_expert_params}, n_experts=n)
    unknown = sorted(set(request.aux) - set(spec.aux_inputs))
    if unknown:
        raise ParameterError(f"method {spec.name!r} takes no auxiliary input {', '.join(map(repr, unknown))}; it takes: {', '.join(spec.aux_inputs) or '(none)'}")
    for key, paths in request.aux.items():
        if len(paths) != n:
            raise ParameterError(f"auxiliary input {key!r} has {len(paths)} checkpoint(s) for {n} experts")
    if request.weights is not None:
        spec.contract.check_weights(spec.name, request.weights, params)
    resolve_device(request.device)
    wdtype = torch.float64 if request.dtype == "float64" else torch.float32
    weights = torch.tensor(request.weights if request.weights is not None else [1.0] * n, dtype=wdtype)
    return spec, params, weights


# -- memory and progress helpers -------------------------------------------------------------


class _Progress:
    """Tensors done and GB/s of input read; a no-op when disabled."""

    def __init__(self, enabled: bool, checkpoints: list[Checkpoint]):
        self.enabled, self.ckpts, self.bar = enabled, checkpoints, None

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), transient=False,
            )
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def phase(self, description: str, total: int):
        self.t0, self.b0 = time.perf_counter(), sum(c.bytes_read for c in self.ckpts)
        if self.bar is not None:
            self.task = self.bar.add_task(description, total=total, rate="")

    def advance(self):
        if self.bar is not None:
            gb = (sum(c.bytes_read for c in self.ckpts) - self.b0) / 1e9
            rate = f"{gb / max(time.perf_counter() - self.t0, 1e-9):.2f} GB/s read"
            self.bar.update(self.task, advance=1, rate=rate)


# -- the loop ----------------------------------------------------------------------------------


def _row_chunks(tp: TensorPlan, spec: MethodSpec, itemsize: int, chunk_bytes: int) -> list[tuple[int, int]]:
    rows = tp.shape[0] if tp.shape else 1
    if spec.granularity != "elementwise" or spec.stochastic or len(tp.shape) == 0 or rows == 0:
        return [(0, rows)]  # stochastic draws depend on the shape: never split those
    row_bytes = itemsize * max(1, int(torch.Size(tp.shape[1:]).numel()))
    step = max(1, chunk_bytes // row_bytes)
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]


def _output_config(plan: MergePlan, out_dtype: torch.dtype) -> dict[str, Any] | None:
    if plan.reference.config is None:
        return None
    cfg = json.loads(json.dumps(plan.reference.config))
    if plan.vocab_size is not None:
        cfg["vocab_size"] = plan.vocab_size
    if plan.untied:
        cfg["tie_word_embeddings"] = False
    name = str(out_dtype).removeprefix("torch.")
    keys = [k for k in ("dtype", "torch_dtype") if k in cfg] or ["dtype"]
    for k in keys:
        cfg[k] = name
    return cfg


def merge(
    request: MergeRequest,
    out: str | Path | None = None,
    *,
    progress: bool = True,
    overwrite: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    calibration: CalibrationData | None = None,
) -> MergeResult:
    """Run ``request``. With ``out``, write a complete HF folder there (atomically); with
    ``out=None``, return the merged tensors in ``MergeResult.state_dict`` (CPU, output dtype).

    Raises ``ParameterError`` (parameters, weights, input contract), ``DeviceError``,
    ``CheckpointError`` (missing or unsupported inputs), ``CompatibilityError`` (shapes, names,
    vocabularies) and ``OutputPathError`` (a non-empty ``out`` without ``overwrite``, or ``out``
    under a file) before reading any weight. While streaming: ``NonFiniteInputError`` for
    NaN/inf in any input tensor (unless ``request.allow_nonfinite``), ``NonFiniteOutputError``
    when the method turns finite inputs into NaN/inf, ``OutputWriteError`` (e.g. disk full).
    On any error nothing is left at ``out``: no partial folder, no temporary folder.

    ``calibration``: the texts a data-dependent method (``spec.calibration``) is calibrated on;
    missing texts for such a method, or texts for a data-free one, raise before any file is opened.
    """
    t_start = time.perf_counter()
    reset_peak_rss()
    timings: dict[str, float] = {}
    spec, params, weights = _validate(request)
    need = calibration_of(spec)
    if need is not None and calibration is None:
        raise ParameterError(f"method {spec.name!r} is data-dependent: it needs calibration texts (validation split)")
    if need is None and calibration is not None:
        raise ParameterError(f"method {spec.name!r} is data-free: it takes no calibration texts")
    dest = Path(out).expanduser().resolve() if out is not None else None
    if dest is not None:
        check_destination(dest, overwrite)
    timings["validate_s"] = time.perf_counter() - t_start

    t = time.perf_counter()
    opened: list[Checkpoint] = []

    def _open(path: str, label: str) -> Checkpoint:
        opened.append(open_checkpoint(path, label, allow_pickle=request.allow_pickle))
        return opened[-1]

    try:
        base = _open(request.base, "base") if request.base is not None else None
        experts = [_open(p, f"expert {i}") for i, p in enumerate(request.experts)]
        aux = {k: [_open(p, f"aux {k}[{i}]") for i, p in enumerate(v)] for k, v in request.aux.items()}
        plan = plan_merge(base, experts, aux, vocab_policy=request.vocab_policy)
        timings["open_s"] = time.perf_counter() - t

        compute = getattr(torch, request.dtype)
        out_dtype = getattr(torch, request.out_dtype) if request.out_dtype else (plan.reference.main_dtype() or compute)
        inputs = [{"role": c.label, "source": c.source, "path": str(c.path), "fingerprint": c.fingerprint} for c in opened]
        result = MergeResult(
            method=spec.name, method_version=spec.version, params=params, weights=weights.tolist(), seed=request.seed,
            compute_dtype=request.dtype, out_dtype=str(out_dtype).removeprefix("torch."),
            reference_path=plan.reference.path, config=_output_config(plan, out_dtype), inputs=inputs, out=dest,
            notes=list(plan.notes), n_tensors=len(plan.tensors),
        )
        runner = _Runner(spec, params, weights, request, plan, compute, out_dtype, chunk_bytes)
        if need is not None:
            cal = calibrate(need, params, base=base.path if base is not None else None,
                            experts=[c.path for c in experts], data=calibration, device=runner.device,
                            dtype=torch.float64 if compute == torch.float64 else torch.float32,
                            seed=request.seed, method=spec.name)
            runner.extra_aux = cal.aux
            result.calibration = cal.record
            timings["calibration_s"] = cal.seconds
        with _Progress(progress, opened) as bar:
            if spec.prepass is not None:
                t = time.perf_counter()
                runner.prepass(bar)
                timings["prepass_s"] = time.perf_counter() - t
            t = time.perf_counter()
            if dest is None:
                result.state_dict = runner.run_in_memory(bar)
                _note_passed_through(result, runner)
            else:
                specs = [(p.name, p.shape, out_dtype if p.floating else p.dtype) for p in plan.tensors]
                with ShardedWriter(dest, specs, max_shard_size=request.max_shard_size, overwrite=overwrite) as writer:
                    runner.run(writer.write, bar)
                    _note_passed_through(result, runner)
                    _write_side_files(writer, result, plan)
                result.bytes_written = writer.bytes_written
            timings["merge_s"] = time.perf_counter() - t
        timings.update(runner.timings)
    finally:
        for c in opened:
            c.close()
    result.bytes_read = sum(c.bytes_read for c in opened)
    timings["total_s"] = time.perf_counter() - t_start
    result.timings = timings
    result.peak_rss_bytes = peak_rss_bytes()
    return result


def _note_passed_through(result: MergeResult, runner: _Runner) -> None:
    if runner.passed_through:
        names = sorted(runner.passed_through)
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        result.notes.append(f"non-finite input values passed through (allow_nonfinite) in {len(names)} tensor(s): {shown}")


def _write_side_files(writer: ShardedWriter, result: MergeResult, plan: MergePlan) -> None:
    if result.config is not None:
        writer.write_file("config.json", json.dumps(result.config, indent=2))
    ref = plan.reference.path
    if ref.is_dir():
        for name in _SIDE_FILES:
            if (ref / name).is_file():
                writer.copy_file(ref / name)
    writer.write_file(PROVENANCE_FILE, json.dumps(result.provenance(), indent=2, default=list))


class _Runner:
    """Reads inputs and calls the kernel, tensor by tensor (one object to keep `merge` short)."""

    def __init__(self, spec, params, weights, request, plan, compute, out_dtype, chunk_bytes):
        self.spec, self.params, self.weights, self.plan = spec, params, weights, plan
        self.seed, self.compute, self.out_dtype, self.chunk_bytes = request.seed, compute, out_dtype, chunk_bytes
        self.allow_nonfinite = request.allow_nonfinite
        self.inputs_finite = True  # of the tensor (chunk) being merged
        self.checked: dict[str, bool] = {}  # tensors whose inputs the prepass already checked -> all finite
        self.passed_through: set[str] = set()  # tensors merged with non-finite inputs (allow_nonfinite)
        self.device = resolve_device(request.device)
        self.use_base = spec.contract.base != "unused"
        self.num_layers = count_layers([p.name for p in plan.tensors])
        self.stats: dict[str, dict[str, float]] = {}
        self._stats_view = MappingProxyType(self.stats)  # one view: kernels may cache on its identity
        self.timings = {"read_s": 0.0, "kernel_s": 0.0, "write_s": 0.0, "check_s": 0.0}
        # Methods declaring "nonfinite_propagates" (every built-in; the conformance kit checks it)
        # have their inputs checked through their output: a finite output proves finite inputs,
        # and only a non-finite output (or a kernel error) makes the engine scan the inputs to
        # name the culprit. Other methods get every input scanned as it is read.
        self.fused = "nonfinite_propagates" in spec.properties
        self._loaded: list[tuple[Source, torch.Tensor, int, int]] | None = None  # inputs not yet scanned
        self.extra_aux: dict[str, dict[str, list[torch.Tensor]]] = {}  # calibration statistics, by tensor

    def _load(self, src: Source | None, r0: int, r1: int) -> torch.Tensor | None:
        if src is None:
            return None
        t = time.perf_counter()
        x = src.read(r0, r1).to(device=self.device, dtype=self.compute)
        self.timings["read_s"] += time.perf_counter() - t
        if self._loaded is not None:
            self._loaded.append((src, x, r0, r1))
        return x

    def _inputs(self, tp: TensorPlan, r0: int, r1: int, *, prepass: bool = False):
        """Read (and convert) every input of rows [r0, r1); scanned at once unless the check is
        fused with the output (or the prepass already scanned this tensor)."""
        known = self.checked.get(tp.name)
        self.inputs_finite = True if known is None else known
        self._loaded = [] if known is None else None
        base = self._load(tp.base, r0, r1) if self.use_base else None
        experts = [self._load(s, r0, r1) for s in tp.experts]
        aux = {k: [self._load(s, r0, r1) for s in v] for k, v in tp.aux.items()}
        for k, v in self.extra_aux.get(tp.name, {}).items():  # statistics shaped like the tensor follow its rows
            aux[k] = [t[r0:r1].to(self.device) if tuple(t.shape) == tp.shape and t.dim() else t.to(self.device) for t in v]
        if not self.fused or prepass:
            self._scan(tp)
        return base, experts, aux

    def _scan(self, tp: TensorPlan) -> None:
        """Check the inputs read for this tensor (chunk); NaN/inf raise unless allowed."""
        loaded, self._loaded = self._loaded, None
        if not loaded:
            return
        t = time.perf_counter()
        for src, x, r0, r1 in loaded:
            if not all_finite(x):
                self._nonfinite_input(src, r0, r1)
        self.timings["check_s"] += time.perf_counter() - t
        if not self.inputs_finite:
            self.passed_through.add(tp.name)

    def _nonfinite_input(self, src: Source, r0: int, r1: int) -> None:
        raw = src.read(r0, r1)  # failure path only: read again, as stored
        if all_finite(raw):  # finite as stored: the conversion to the compute dtype overflowed
            peak = float(raw.abs().max())
            raise NonFiniteInputError(
                f"{src.describe(r0)} overflows the compute dtype {str(self.compute).removeprefix('torch.')} "
                f"(max |value| {peak:.4g}); use a wider --dtype (e.g. float32)"
            )
        if not self.allow_nonfinite:
            bad = torch.nonzero(~torch.isfinite(raw))[0]
            raise NonFiniteInputError(
                f"{src.describe(r0 + (int(bad[0]) if raw.dim() else 0))} holds {_nonfinite_summary(raw, r0)}; "
                "fix the checkpoint, or pass allow_nonfinite=True (--allow-nonfinite) to merge them as they are"
            )
        self.inputs_finite = False

    def _kernel_failed(self, tp: TensorPlan, exc: Exception, what: str) -> None:
        """A kernel raised: report non-finite inputs first (they are the likely cause)."""
        self._scan(tp)  # raises NonFiniteInputError for NaN/inf inputs unless allowed
        if not self.inputs_finite and not isinstance(exc, MergebenchError):
            raise NonFiniteInputError(
                f"method {self.spec.name!r} cannot merge tensor {tp.name!r}, whose inputs hold NaN/inf "
                f"values (allow_nonfinite): {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            ) from exc
        exc.add_note(f"while {what} tensor {tp.name!r} with method {self.spec.name!r}")

    def _check_output(self, tp: TensorPlan, merged: torch.Tensor) -> torch.Tensor:
        """Cast to the output dtype; NaN/inf from finite inputs is an error naming method and tensor."""
        t = time.perf_counter()
        finite = all_finite(merged)
        self.timings["check_s"] += time.perf_counter() - t
        if not finite:
            self._scan(tp)  # fused check: now find out whether an input is to blame
            if self.inputs_finite:
                raise NonFiniteOutputError(
                    f"method {self.spec.name!r} produced {_nonfinite_summary(merged)} for tensor {tp.name!r} "
                    "from finite inputs"
                )
        self._loaded = None
        out = merged.to(self.out_dtype)
        narrower = (
            out.dtype.is_floating_point and merged.dtype.is_floating_point
            and torch.finfo(out.dtype).max < torch.finfo(merged.dtype).max
        )
        if finite and narrower and not all_finite(out):
            peak = float(merged.abs().max())
            raise NonFiniteOutputError(
                f"method {self.spec.name!r}: tensor {tp.name!r} overflows the output dtype "
                f"{str(self.out_dtype).removeprefix('torch.')} (max |value| {peak:.4g}); choose a wider out_dtype"
            )
        return out

    def _context(self, tp: TensorPlan, aux) -> TensorContext:
        gen = None
        if self.spec.stochastic:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(tensor_seed(tp.name, self.seed))
        return TensorContext(
            name=tp.name, layer=layer_index(tp.name), num_layers=self.num_layers, kind=module_kind(tp.name),
            generator=gen, model_stats=self._stats_view, aux=aux,
        )

    def prepass(self, bar: _Progress) -> None:
        """First streaming pass: per-tensor statistics for methods that look at the whole model."""
        todo = [tp for tp in self.plan.tensors if tp.floating]
        bar.phase(f"{self.spec.name} prepass", len(todo))
        for tp in todo:
            base, experts, aux = self._inputs(tp, 0, tp.reference.rows, prepass=True)  # no output to fuse with
            self.checked[tp.name] = self.inputs_finite
            try:
                self.stats[tp.name] = dict(self.spec.prepass(base, experts, self.params, self._context(tp, aux)))
            except Exception as exc:
                self._kernel_failed(tp, exc, "running the prepass on")
                raise
            bar.advance()

    def run(self, sink, bar: _Progress) -> None:
        """Merge every tensor, handing ``sink(name, chunk)`` the output rows in order."""
        bar.phase(f"merging ({self.spec.name})", len(self.plan.tensors))
        for tp in self.plan.tensors:
            if not tp.floating:  # integer/bool buffers are not merged: the reference's are kept
                sink(tp.name, tp.reference.read())
                bar.advance()
                continue
            for r0, r1 in _row_chunks(tp, self.spec, self.compute.itemsize, self.chunk_bytes):
                base, experts, aux = self._inputs(tp, r0, r1)
                t = time.perf_counter()
                try:
                    merged = self.spec.kernel(base, experts, self.weights, self.params, self._context(tp, aux))
                except Exception as exc:
                    self._kernel_failed(tp, exc, "merging")
                    raise
                want = tuple(experts[0].shape)
                if not isinstance(merged, torch.Tensor) or tuple(merged.shape) != want:
                    got = tuple(merged.shape) if isinstance(merged, torch.Tensor) else type(merged).__name__
                    raise MergeError(f"method {self.spec.name!r} returned {got} for tensor {tp.name!r}; expected shape {want}")
                self.timings["kernel_s"] += time.perf_counter() - t
                merged = self._check_output(tp, merged)
                del base, experts, aux
                t = time.perf_counter()
                sink(tp.name, merged)
                self.timings["write_s"] += time.perf_counter() - t
                del merged
            bar.advance()

    def run_in_memory(self, bar: _Progress) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        filled: dict[str, int] = {}

        def sink(name: str, chunk: torch.Tensor) -> None:
            tp_shape = shapes[name]
            chunk = chunk.to("cpu")
            if tuple(chunk.shape) == tp_shape:
                state[name] = chunk.contiguous()
                return
            if name not in state:
                state[name] = torch.empty(tp_shape, dtype=chunk.dtype)
                filled[name] = 0
            state[name][filled[name] : filled[name] + len(chunk)] = chunk
            filled[name] += len(chunk)

        shapes = {tp.name: tp.shape for tp in self.plan.tensors}
        self.run(sink, bar)
        return state
