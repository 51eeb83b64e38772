"""Synthetic result stores for the leaderboard's tests and benchmark (never written into results/).

`small_store` goes through ``store.write_unit`` (the real write path, with provenance);
`bulk_store` writes the same schema as a few large Parquet files, to reach a million rows fast.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mergebench.results import store

TASKS = ("mb_capitals", "mb_antonyms", "mb_elements", "mb_analogies")
EXPERTS = ("capitals", "antonyms", "elements", "analogies", "math", "medical")
METHODS = {"linear": 0.00, "task_arithmetic": 0.03, "ties": 0.05, "karcher": 0.07, "slerp": -0.02}


def small_store(results_dir, *, suite="inthewild", profile="embedded", pool="smol", methods=METHODS,
                sizes=(2, 3), seed=0, clones=None) -> Path:
    """Base, experts and every subset of each size merged by every method, via store.write_unit.

    `clones` maps a method to one listed before it in `methods` whose result rows it repeats
    exactly (the same value on every unit and task: an exact tie)."""
    clones = dict(clones or {})
    rng = np.random.default_rng(seed)
    results_dir = Path(results_dir)
    common = dict(suite=suite, suite_version="1", profile=profile, pool=pool, base_model="smol-135m", seed=0,
                  doc_index_hash="syn")
    run = "20260101T000000Z-synthe"

    def rows(level):
        return [{"task": t, "metric": m, "value": float(np.clip(level + rng.normal(0, 0.03) + (0.02 if m == "acc_norm"
                                                                                                   else 0), 0, 1)),
                 "stderr": 0.02, "n_docs": 100} for t in TASKS for m in ("acc", "acc_norm")]

    store.write_unit(store.Unit(role="base", subset=("smol-135m",), **common), rows(0.40), run_id=run,
                     results_dir=results_dir, provenance={"task_vector_norm": 0.0})
    for e in EXPERTS:
        store.write_unit(store.Unit(role="expert", subset=(e,), **common), rows(0.42), run_id=run,
                         results_dir=results_dir, provenance={"task_vector_norm": 3.0 + rng.random()})
    written = {}
    for (m, off), k in itertools.product(methods.items(), sizes):
        for subset in itertools.combinations(EXPERTS, k):
            u = store.Unit(role="merged", subset=subset, method=m, method_version="1.0",
                           params={"lambda": 1.0} if m != "linear" else {}, **common)
            prov = {"merge_wall_s": 1.0 + 0.5 * len(m) + rng.random(), "merge_peak_rss_bytes": int(2e9 + 1e8 * k),
                    "eval_wall_s": 3.0,  # averaging shrinks the task vector, summing grows it
                    "task_vector_norm": (3.0 / np.sqrt(k) if m == "linear" else 3.0 * (1 + off) * np.sqrt(k))
                    + 0.1 * rng.random()}
            vals = written[(clones[m], subset)] if m in clones else rows(0.41 + off + 0.01 * k)
            written[(m, subset)] = vals
            store.write_unit(u, vals, run_id=run, results_dir=results_dir, provenance=prov)
    return results_dir


def bulk_store(results_dir, *, n_rows=1_000_000, n_methods=20, n_tasks=31, suite="openllm", profile="embedded",
               pool="smol", seed=0) -> dict:
    """About `n_rows` result rows (20 methods x sizes 2..8 x subsets x tasks) plus provenance, written
    as one Parquet file per method in the store's layout. Returns counts."""
    rng = np.random.default_rng(seed)
    results_dir = Path(results_dir)
    tasks = [f"task_{i:02d}" for i in range(n_tasks)]
    sizes = list(range(2, 9))
    units_per_method = max(1, n_rows // (n_methods * n_tasks))
    per_size = max(1, units_per_method // len(sizes))
    experts = [f"e{i:02d}" for i in range(12)]
    subsets = [tuple(sorted(rng.choice(experts, size=k, replace=False).tolist())) for k in sizes
               for _ in range(per_size)]
    ns = np.array([len(s) for s in subsets], dtype=np.int32)

    def created(k):
        return pa.array(np.full(k, np.datetime64("2026-01-01T00:00:00", "us"))).cast(pa.timestamp("us", tz="UTC"))

    total = 0

    def write(method, role, subs, nvec, level):
        nonlocal total
        k = len(subs)
        uid = np.array([f"{method or role}-{i:06d}" for i in range(k)])
        rep = np.repeat(np.arange(k), n_tasks)
        values = np.clip(level + rng.normal(0, 0.05, size=k * n_tasks), 0, 1)
        cols = {
            "run_id": pa.array(["bench"] * (k * n_tasks)), "unit_id": pa.array(uid[rep]),
            "source": pa.array(["run"] * (k * n_tasks)), "suite": pa.array([suite] * (k * n_tasks)),
            "suite_version": pa.array(["1"] * (k * n_tasks)), "profile": pa.array([profile] * (k * n_tasks)),
            "pool": pa.array([pool] * (k * n_tasks)), "base_model": pa.array(["base"] * (k * n_tasks)),
            "method": pa.array([method] * (k * n_tasks), pa.string()),
            "method_version": pa.array(["1.0" if method else None] * (k * n_tasks), pa.string()),
            "params_json": pa.array(["{}"] * (k * n_tasks)), "seed": pa.array(np.zeros(k * n_tasks, np.int64)),
            "subset": pa.array([list(subs[i]) for i in rep], pa.list_(pa.string())),
            "n": pa.array(nvec[rep].astype(np.int32)), "role": pa.array([role] * (k * n_tasks)),
            "task": pa.array(np.tile(tasks, k)), "metric": pa.array(["acc"] * (k * n_tasks)),
            "value": pa.array(values), "stderr": pa.array(np.full(k * n_tasks, 0.02)),
            "n_docs": pa.array(np.full(k * n_tasks, 100, np.int64)),
            "normalized_value": pa.nulls(k * n_tasks, pa.float64()),
            "created_at": created(k * n_tasks),
        }
        d = results_dir / "runs" / f"suite={suite}" / f"method={method or '_reference'}"
        d.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(cols, schema=store.RESULTS_SCHEMA), d / f"part-bench-{method or role}.parquet")
        if method:
            prov = {f.name: pa.nulls(k, f.type) for f in store.PROVENANCE_SCHEMA}
            prov.update(run_id=pa.array(["bench"] * k), unit_id=pa.array(uid), suite=pa.array([suite] * k),
                        method=pa.array([method] * k), created_at=created(k),
                        merge_wall_s=pa.array(rng.uniform(1, 30, k)),
                        merge_peak_rss_bytes=pa.array(rng.integers(1e9, 4e9, k).astype(np.int64)))
            pd_ = results_dir / "provenance" / f"suite={suite}" / f"method={method}"
            pd_.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table(prov, schema=store.PROVENANCE_SCHEMA), pd_ / f"prov-bench-{method}.parquet")
        total += k * n_tasks

    write(None, "base", [("base",)], np.array([0]), 0.40)
    write(None, "expert", [(e,) for e in experts], np.ones(len(experts), np.int32), 0.42)
    for i in range(n_methods):
        write(f"method_{i:02d}", "merged", subsets, ns, 0.38 + 0.004 * i)
    return {"rows": total, "units": n_methods * len(subsets) + 1 + len(experts)}
