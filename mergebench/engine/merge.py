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
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

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
from ..request import MergeRequest
from .checkpoint import Checkpoint, open_checkpoint
from .compat import MergePlan, Source, TensorPlan, plan_merge
from .writer import ShardedWriter, check_destination

__all__ = ["DEFAULT_CHUNK_BYTES", "PROVENANCE_FILE", "MergeError", "MergeResult", "merge", "peak_rss_bytes", "tensor_seed"]

DEFAULT_CHUNK_BYTES = 256 * 1024**2
"""Largest slice of one input an elementwise method sees at once (bounds memory on huge embeddings)."""

PROVENANCE_FILE = "mergebench_merge.json"
_SIDE_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "merges.txt",
    "chat_template.jinja", "chat_template.json",
)


class MergeError(RuntimeError):
    """A kernel broke its contract (wrong shape or type) during the merge."""


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
        }


# -- step 1: validation (no file is opened) ------------------------------------------------


def _validate(request: MergeRequest) -> tuple[MethodSpec, dict[str, Any], torch.Tensor]:
    spec = get_method(request.method)
    n = len(request.experts)
    spec.contract.check(spec.name, request.base is not None, n, has_weights=request.weights is not None)
    if request.weights is not None and len(request.weights) != n:
        raise ParameterError(f"{len(request.weights)} weights given for {n} experts")
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
    device = torch.device(request.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ParameterError(f"device {request.device!r} requested but CUDA is not available")
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
) -> MergeResult:
    """Run ``request``. With ``out``, write a complete HF folder there (atomically); with
    ``out=None``, return the merged tensors in ``MergeResult.state_dict`` (CPU, output dtype).

    Raises ``ParameterError`` (parameters, input contract), ``CheckpointError`` (missing or
    unsupported inputs), ``CompatibilityError`` (shapes, names, vocabularies) before reading
    any weight, and ``FileExistsError`` for a non-empty ``out`` without ``overwrite``.
    """
    t_start = time.perf_counter()
    reset_peak_rss()
    timings: dict[str, float] = {}
    spec, params, weights = _validate(request)
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
        with _Progress(progress, opened) as bar:
            if spec.prepass is not None:
                t = time.perf_counter()
                runner.prepass(bar)
                timings["prepass_s"] = time.perf_counter() - t
            t = time.perf_counter()
            if dest is None:
                result.state_dict = runner.run_in_memory(bar)
            else:
                specs = [(p.name, p.shape, out_dtype if p.floating else p.dtype) for p in plan.tensors]
                with ShardedWriter(dest, specs, max_shard_size=request.max_shard_size, overwrite=overwrite) as writer:
                    runner.run(writer.write, bar)
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
        self.device = torch.device(request.device)
        self.use_base = spec.contract.base != "unused"
        self.num_layers = count_layers([p.name for p in plan.tensors])
        self.stats: dict[str, dict[str, float]] = {}
        self._stats_view = MappingProxyType(self.stats)  # one view: kernels may cache on its identity
        self.timings = {"read_s": 0.0, "kernel_s": 0.0, "write_s": 0.0}

    def _load(self, src: Source | None, r0: int, r1: int) -> torch.Tensor | None:
        if src is None:
            return None
        t = time.perf_counter()
        x = src.read(r0, r1).to(device=self.device, dtype=self.compute)
        self.timings["read_s"] += time.perf_counter() - t
        return x

    def _inputs(self, tp: TensorPlan, r0: int, r1: int):
        base = self._load(tp.base, r0, r1) if self.use_base else None
        experts = [self._load(s, r0, r1) for s in tp.experts]
        aux = {k: [self._load(s, r0, r1) for s in v] for k, v in tp.aux.items()}
        return base, experts, aux

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
            base, experts, aux = self._inputs(tp, 0, tp.reference.rows)
            try:
                self.stats[tp.name] = dict(self.spec.prepass(base, experts, self.params, self._context(tp, aux)))
            except Exception as exc:
                exc.add_note(f"while running the prepass of method {self.spec.name!r} on tensor {tp.name!r}")
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
                    exc.add_note(f"while merging tensor {tp.name!r} with method {self.spec.name!r}")
                    raise
                want = tuple(experts[0].shape)
                if not isinstance(merged, torch.Tensor) or tuple(merged.shape) != want:
                    got = tuple(merged.shape) if isinstance(merged, torch.Tensor) else type(merged).__name__
                    raise MergeError(f"method {self.spec.name!r} returned {got} for tensor {tp.name!r}; expected shape {want}")
                merged = merged.to(self.out_dtype)
                self.timings["kernel_s"] += time.perf_counter() - t
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
