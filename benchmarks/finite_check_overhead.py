"""Cost of the engine's NaN/inf checks of input and merged tensors.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/finite_check_overhead.py [--methods linear,ties] [--reps 20] [--per-input]

Builds a base and experts shaped like a small Llama (hidden 512, 6 layers, vocab 8192:
27.3M parameters, fp32) with ``mergebench.toy``, merges them to disk, and reports for each
method the time spent in the checks (the engine's ``check_s`` timer) as a share of the merge,
and the median wall time of runs with and without the checks in ABBA order (A/B; noisy on a
shared machine). Built-in methods declare ``nonfinite_propagates``, so their inputs are checked
through their output (one pass per tensor); ``--per-input`` measures the scan of every input
as it is read (what a method without that property gets).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from mergebench.engine import all_finite, merge
from mergebench.methods import get_method, register
from mergebench.engine.request import MergeRequest
from mergebench.toy import tiny_llama_state, write_checkpoint

SHAPE = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=8192)


def make_pool(root: Path, n: int) -> tuple[Path, list[Path]]:
    state, cfg = tiny_llama_state(0, SHAPE)
    base = write_checkpoint(root / "base", state, cfg, tokenizer=False)
    experts = []
    for i in range(n):
        g = torch.Generator().manual_seed(i + 1)
        sd = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in state.items()}
        experts.append(write_checkpoint(root / f"e{i}", sd, cfg, tokenizer=False))
    return base, experts


def run_once(method: str, base: Path, experts: list[Path], out: Path, checks: bool, per_input: bool) -> tuple[float, dict]:
    engine = importlib.import_module("mergebench.engine.merge")
    spec = get_method(method)
    if not checks:  # every tensor "finite" without looking
        engine.all_finite = lambda t: True
    if per_input:
        register(dataclasses.replace(spec, properties=spec.properties - {"nonfinite_propagates"}), replace=True)
    try:
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        res = merge(MergeRequest(method=method, base=str(base), experts=[str(e) for e in experts]), out, progress=False)
        return time.perf_counter() - t, res.timings
    finally:
        engine.all_finite = all_finite
        register(spec, replace=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="linear,ties,karcher")
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--reps", type=int, default=20, help="pairs of runs with and without the checks, ABBA order (medians)")
    ap.add_argument("--per-input", action="store_true", help="scan every input as read (methods without the property)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, experts = make_pool(root, args.experts)
        n_params = sum(t.numel() for t in load_file(str(base / "model.safetensors")).values())
        print(f"model: {n_params / 1e6:.1f}M params fp32, base + {args.experts} experts, {args.reps} interleaved runs each")
        for m in args.methods.split(","):
            on, off, share = [], [], []
            run_once(m, base, experts, root / "out", True, args.per_input)  # warm-up
            for i in range(args.reps):
                for checks in ((True, False) if i % 2 == 0 else (False, True)):  # ABBA order
                    wall, tm = run_once(m, base, experts, root / "out", checks, args.per_input)
                    (on if checks else off).append(wall)
                    if checks:
                        share.append(tm["check_s"] / tm["total_s"])
            a, b = statistics.median(on), statistics.median(off)
            print(f"{m:10s} checks {100 * statistics.median(share):.1f}% of the merge time (timer); median merge "
                  f"{a:.3f} s with checks, {b:.3f} s without (A/B {100 * (a - b) / b:+.1f}%)")


if __name__ == "__main__":
    main()
