"""End-to-end streaming merge: mergebench's engine vs mergekit 0.1.5 on the same YAML.

A synthetic Llama-shaped model (``--e2e-size``: ``120m`` by default, ~125M parameters,
fp32, several safetensors shards) and ``--e2e-experts`` experts (base + small random deltas)
are written once per session. For every method in ``--e2e-methods`` one YAML file is
written and each tool merges it in its own fresh subprocess (``_e2e_runner.py``), so the
wall time includes the interpreter start and the tool's imports, and the peak RSS
(``os.wait4``) is the tool's alone. Both use ``--e2e-threads`` torch threads.

Recorded in ``extra_info`` (and the terminal summary): wall and in-process merge seconds,
peak RSS in MB for both tools, the ratios, and the largest difference between the two
outputs (deterministic methods should agree to float32 rounding; dare_ties draws different
random masks and rescales differently, so its difference is large by design).

Targets (reported, not asserted): mergebench >= 10x faster end to end, no higher peak RSS.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

RUNNER = Path(__file__).with_name("_e2e_runner.py")

SIZES = {
    # name: (hidden, intermediate, layers, vocab, heads, kv_heads)
    "tiny": (256, 688, 4, 8000, 4, 2),
    "30m": (512, 1376, 6, 16000, 8, 4),
    "120m": (768, 2048, 12, 32000, 12, 4),
}

# Method -> (YAML ``parameters`` block, per-expert parameters, whether the base is listed as a model).
# Karcher lists the base as one more model: mergekit always averages a configured base in,
# and listing it makes mergebench do the same work (and compute the same result).
YAML_SETUP = {
    "ties": ({"normalize": True}, {"density": 0.5}, False),
    "dare_ties": ({}, {"density": 0.5}, False),
    "karcher": ({}, {}, True),
    "model_stock": ({}, {}, False),
    "multislerp": ({}, {}, False),
    "task_arithmetic": ({}, {}, False),
    "della": ({}, {"density": 0.5, "epsilon": 0.1}, False),
}
TAKES_WEIGHT = {"ties", "dare_ties", "multislerp", "task_arithmetic", "della"}


def _opt(config, flag):
    return str(config.getoption(flag.lstrip("-").replace("-", "_")))


def _write_model(path: Path, cfg, seed: int, base_state: dict | None, shard_bytes: int) -> dict:
    from mergebench.toy import write_checkpoint

    g = torch.Generator().manual_seed(seed)
    if base_state is None:
        state = {}
        for name, shape in _shapes(cfg).items():
            if name.endswith("norm.weight"):
                state[name] = 1.0 + 0.05 * torch.randn(shape, generator=g)
            else:
                state[name] = 0.02 * torch.randn(shape, generator=g)
    else:
        state = {k: v + 0.005 * torch.randn(v.shape, generator=g) for k, v in base_state.items()}
    write_checkpoint(path, state, cfg, max_shard_bytes=shard_bytes, tokenizer=True)
    return state


def _shapes(cfg) -> dict[str, tuple[int, ...]]:
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.fixture(scope="session")
def e2e_models(pytestconfig, tmp_path_factory):
    """(base path, [expert paths], parameter count); reused from --e2e-dir when present."""
    from transformers import LlamaConfig

    size = _opt(pytestconfig, "--e2e-size")
    n = int(_opt(pytestconfig, "--e2e-experts"))
    h, inter, layers, vocab, heads, kv = SIZES[size]
    cfg = LlamaConfig(
        hidden_size=h, intermediate_size=inter, num_hidden_layers=layers, vocab_size=vocab,
        num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=False,
        max_position_embeddings=2048,
    )
    cfg.architectures = ["LlamaForCausalLM"]
    root_opt = _opt(pytestconfig, "--e2e-dir")
    root = Path(root_opt) / f"{size}-n{n}" if root_opt else tmp_path_factory.mktemp(f"e2e-{size}")
    n_params = sum(torch.Size(s).numel() for s in _shapes(cfg).values())
    shard = max(1, n_params * 4 // 3 + 1)  # a third of the model per shard (tensors are never split)
    base, experts = root / "base", [root / f"expert_{i}" for i in range(n)]
    done = root / ".complete"
    if not done.exists():
        state = _write_model(base, cfg, 0, None, shard)
        for i, p in enumerate(experts):
            _write_model(p, cfg, i + 1, state, shard)
        del state
        done.write_text("ok")
    return base, experts, n_params


def _yaml(method: str, base: Path, experts: list[Path]) -> str:
    import yaml

    params, per_model, base_listed = YAML_SETUP[method]
    models = []
    if base_listed:
        models.append({"model": str(base)})
    for i, p in enumerate(experts):
        mp = dict(per_model)
        if method in TAKES_WEIGHT:
            mp["weight"] = round(1.0 - 0.15 * i, 3)
        models.append({"model": str(p), **({"parameters": mp} if mp else {})})
    doc = {"merge_method": method, "base_model": str(base), "models": models, "dtype": "float32"}
    if params:
        doc["parameters"] = params
    return yaml.safe_dump(doc, sort_keys=False)


def _run(tool: str, config: Path, out: Path, threads: int) -> dict:
    """Run the tool in a fresh process; wall seconds, peak RSS (MB) and its own timings."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    t = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(RUNNER), tool, str(config), str(out), str(threads)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} failed ({proc.returncode}):\n{stderr[-4000:]}")
    info = json.loads(stdout.strip().splitlines()[-1])
    return {"wall_s": wall, "rss_mb": usage.ru_maxrss / 1024, **info}


def _max_diff(a: Path, b: Path) -> float:
    """Largest |a - b| over all tensors of two output folders, one tensor at a time."""
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                out.update({k: f for k in h.keys()})
        return out

    ia, ib = index(a), index(b)
    if set(ia) != set(ib):
        return float("nan")
    worst = 0.0
    for k in ia:
        with safe_open(str(ia[k]), "pt") as ha, safe_open(str(ib[k]), "pt") as hb:
            x, y = ha.get_tensor(k), hb.get_tensor(k)
        worst = max(worst, float((x.double() - y.double()).abs().max()))
    return worst


def test_end_to_end(benchmark, e2e_method, e2e_models, pytestconfig, tmp_path, bench_results):
    base, experts, n_params = e2e_models
    threads = int(_opt(pytestconfig, "--e2e-threads"))
    config = tmp_path / f"{e2e_method}.yaml"
    config.write_text(_yaml(e2e_method, base, experts))
    out_mb, out_mk = tmp_path / "mergebench_out", tmp_path / "mergekit_out"

    runs: dict[str, dict] = {}
    benchmark.pedantic(lambda: runs.__setitem__("mergebench", _run("mergebench", config, out_mb, threads)),
                       rounds=1, iterations=1)
    mb = runs["mergebench"]
    row = {
        "method": e2e_method, "params_m": round(n_params / 1e6, 1), "experts": len(experts), "threads": threads,
        "mergebench_wall": mb["wall_s"], "mergebench_merge": mb["merge_s"], "mergebench_rss_mb": mb["rss_mb"],
    }
    if _opt(pytestconfig, "--skip-mergekit") not in ("1", "true", "yes"):
        mk = _run("mergekit", config, out_mk, threads)
        row.update(
            mergekit_wall=mk["wall_s"], mergekit_merge=mk["merge_s"], mergekit_rss_mb=mk["rss_mb"],
            speedup_wall=mk["wall_s"] / mb["wall_s"], speedup_merge=mk["merge_s"] / mb["merge_s"],
            rss_ratio=mb["rss_mb"] / mk["rss_mb"], max_abs_diff=_max_diff(out_mb, out_mk),
        )
        shutil.rmtree(out_mk, ignore_errors=True)
    shutil.rmtree(out_mb, ignore_errors=True)
    benchmark.extra_info.update({k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in row.items()})
    bench_results.setdefault("e2e", []).append(row)
