"""Kernel throughput per method on LLM-shaped tensors, as GB/s of input read.

The number to compare is ``extra_info["gbps_in"]`` (bytes of base + experts read, divided
by the median time) against ``test_copy_bandwidth`` on the same machine and thread count:
an elementwise kernel cannot beat a copy, and a good one stays within a small factor of it.

Pick the cases with ``--shapes``, ``--experts``, ``--methods``, ``--threads`` (see
``conftest.py``); SVD-based methods (granularity ``matrix``) run only on square 4096x4096
(or the smallest given) tensors, always with one thread (LAPACK with 2 threads collapses
under contention on a shared machine).
"""

from __future__ import annotations

import gc
import time

import torch

from mergebench import get_method
from mergebench.methods import ModuleKind, TensorContext

COPY_SHAPE = (4096, 14336)  # 235 MB fp32: well past any cache


def _opt(config, flag):
    return str(config.getoption(flag.lstrip("-").replace("-", "_")))


_INPUTS: dict = {}


def _inputs(shape, n, device):
    """Base and ``n`` experts (base + small deltas); only the latest set is kept alive."""
    key = (shape, n, device)
    if key not in _INPUTS:
        _INPUTS.clear()
        gc.collect()
        g = torch.Generator().manual_seed(0)
        base = torch.randn(shape, generator=g)
        experts = [base + 0.01 * torch.randn(shape, generator=g) for _ in range(n)]
        _INPUTS[key] = (base.to(device), [e.to(device) for e in experts])
    return _INPUTS[key]


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def test_copy_bandwidth(benchmark, device, pytestconfig, bench_results):
    """Reference: ``dst.copy_(src)`` of one large fp32 tensor (reads and writes its bytes once)."""
    torch.set_num_threads(int(_opt(pytestconfig, "--threads")))
    src = torch.randn(COPY_SHAPE).to(device)
    dst = torch.empty_like(src)

    def run():
        dst.copy_(src)
        _sync(device)

    benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=2)
    nbytes = src.numel() * src.element_size()
    gbps = nbytes / benchmark.stats.stats.median / 1e9
    benchmark.extra_info.update(gbps_in=round(gbps, 2), bytes_in=nbytes, threads=torch.get_num_threads())
    bench_results.setdefault("copy", {})[device] = gbps


def test_kernel_throughput(benchmark, kernel_case, device, pytestconfig, bench_results):
    name, shape, n = kernel_case
    spec = get_method(name)
    threads = 1 if spec.granularity == "matrix" else int(_opt(pytestconfig, "--threads"))
    torch.set_num_threads(threads)
    base, experts = _inputs(shape, n, device)
    kernel_base = None if spec.contract.base == "unused" else base
    weights = torch.full((n,), 1.0 / n)
    params = spec.validate_params({}, n_experts=n)
    layer = 10
    tname = "model.layers.10.mlp.down_proj.weight" if shape[0] != 32000 else "model.embed_tokens.weight"
    kind = ModuleKind.MLP if shape[0] != 32000 else ModuleKind.EMBEDDING
    aux = {a: [e.abs() for e in experts] for a in spec.aux_inputs}
    ctx_kw = dict(name=tname, layer=layer if kind is ModuleKind.MLP else None, num_layers=32, kind=kind, aux=aux)

    def run():
        gen = torch.Generator(device=device).manual_seed(1) if spec.stochastic else None
        ctx = TensorContext(**ctx_kw, generator=gen)
        if spec.prepass is not None:
            stats = spec.prepass(kernel_base, experts, params, ctx)
            ctx = TensorContext(**ctx_kw, generator=ctx.generator, model_stats={tname: stats})
        out = spec(kernel_base, experts, weights, params, ctx)
        _sync(device)
        return out

    rounds = int(_opt(pytestconfig, "--rounds"))
    if spec.granularity == "matrix":
        rounds = 1  # seconds per call: one timed call, no warm-up (LAPACK has no meaningful warm-up)
    else:
        t0 = time.perf_counter()
        run()  # warm-up (allocator, lazy init; also fails fast before timing)
        if time.perf_counter() - t0 > 20:
            rounds = 1
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=0)
    n_in = n + (kernel_base is not None)
    nbytes = n_in * base.numel() * base.element_size()
    gbps = nbytes / benchmark.stats.stats.median / 1e9
    benchmark.extra_info.update(
        gbps_in=round(gbps, 3), bytes_in=nbytes, threads=threads, granularity=spec.granularity, inputs=n_in
    )
    bench_results.setdefault("kernels", []).append(
        dict(method=name, shape=f"{shape[0]}x{shape[1]}", n=n, gbps=gbps, seconds=benchmark.stats.stats.median,
             threads=threads, granularity=spec.granularity, device=device)
    )
