"""Scoring throughput: the base model on the inthewild embedded battery, stock HFLM vs the
prefix-sharing scorer, and both against this machine's compute floor.

Run: ``.venv/bin/pytest benchmarks/bench_scorer.py --benchmark-only [--device cuda] [--scorer-dtype bfloat16]``
(needs the materialized embedded pool: ``mergebench zoo materialize``).

Two interleaved repetitions (stock, shared, stock, shared; each a whole battery: 9 tasks x 60
documents, ~2,000 requests), so that a change in the machine's load hits both scorers alike; each
row also records the process CPU seconds, which other jobs sharing the cores inflate far less than
wall time at one thread (``MERGEBENCH_THREADS=1``). The tasks are built once, before timing, as
``mergebench eval`` builds them once per run. The floor is
``unique tokens x 2 x parameters / matmul GFLOP/s``: the FLOPs of running every distinct
context-plus-continuation token through the whole model once, at the fp32 (or ``--scorer-dtype``)
matmul throughput measured on this machine just before.
"""

from __future__ import annotations

import time

import pytest
import torch
from conftest import option


@pytest.fixture(scope="module")
def setup(pytestconfig, device):
    from mergebench.evaluation import runner
    from mergebench.evaluation.battery import Battery
    from mergebench.evaluation.scorer import measure_matmul_gflops
    from mergebench.threads import apply_threads, resolve_threads

    threads = apply_threads(resolve_threads(None))
    plan = runner.plan_eval("linear", "inthewild", materialize=False, log=lambda m: None)
    missing = [m for m in [plan.pool.base, *plan.pool.experts] if m.locate() is None]
    if missing:
        pytest.skip("the embedded pool is not materialized: run `mergebench zoo materialize`")
    dtype = getattr(torch, option(pytestconfig, "--scorer-dtype"))
    model, tok = runner.load_model(plan.paths[plan.pool.base.name], "float32")
    model.to(device=device, dtype=dtype)
    battery = Battery([t.name for t in plan.profile.tasks], plan.task_manager, samples=plan.samples)
    with torch.inference_mode():
        battery.score(model, tok, device=device, quiet=True, scorer="shared")  # builds the requests
    gflops = measure_matmul_gflops(2048, repeats=10, dtype=dtype, device=device)
    docs = plan.n_docs(plan.profile.tasks)
    n_params = sum(p.numel() for p in model.parameters())
    return {"battery": battery, "model": model, "tok": tok, "device": device, "docs": docs, "gflops": gflops,
            "n_params": n_params, "threads": threads, "dtype": str(dtype).removeprefix("torch."), "results": {}}


@pytest.mark.parametrize(("scorer", "rep"), [("hflm", 1), ("shared", 1), ("hflm", 2), ("shared", 2)])
def test_score_battery(benchmark, setup, scorer, rep, bench_results):
    from mergebench.evaluation.scorer import floor_seconds

    s = setup

    def run():
        with torch.inference_mode():
            return s["battery"].score(s["model"], s["tok"], batch_size=16, device=s["device"], quiet=True,
                                      scorer=scorer)

    cpu = time.process_time()
    scores, stats = benchmark.pedantic(run, rounds=1, iterations=1)
    cpu = time.process_time() - cpu
    seconds = benchmark.stats.stats.median
    s["results"][scorer] = {"seconds": seconds, "cpu_s": cpu, "scores": {(x.task, x.metric): x.value for x in scores},
                            **stats}
    shared = s["results"].get("shared")
    unique = shared["tokens_fed"] if shared else None
    floor = floor_seconds(unique, s["n_params"], s["gflops"]) if unique else None
    row = {
        "scorer": scorer, "rep": rep, "device": s["device"], "dtype": s["dtype"], "threads": s["threads"],
        "seconds": seconds, "cpu_s": cpu, "tokens_fed": stats.get("tokens_fed"),
        "docs_per_s": s["docs"] / seconds, "requests_per_s": stats["requests_total"] / seconds,
        "gflops": s["gflops"], "floor_s": floor,
    }
    benchmark.extra_info.update(row)
    bench_results.setdefault("scorer", []).append(row)
    if "hflm" in s["results"] and shared:  # same battery, same numbers
        assert s["results"]["hflm"]["scores"] == shared["scores"]
    if scorer == "shared" and "hflm" in s["results"]:  # this repetition's pair
        stock = s["results"]["hflm"]
        print(f"\nrep {rep}: stock {stock['seconds']:.1f} s ({stock['cpu_s']:.1f} CPU s), shared {seconds:.1f} s "
              f"({cpu:.1f} CPU s): {stock['seconds'] / seconds:.2f}x wall, {stock['cpu_s'] / cpu:.2f}x CPU; "
              f"floor {floor:.1f} s ({seconds / floor:.2f}x)")
