"""Run one merge of a mergekit-style YAML in this (fresh) process and print timings as JSON.

    python benchmarks/_e2e_runner.py {mergebench|mergekit} CONFIG.yaml OUT_DIR THREADS [SEED]

Used by ``bench_end_to_end.py``, which starts it as a subprocess so that each tool's peak
RSS can be read on its own (``os.wait4``). ``import_s`` is the time to import the tool,
``merge_s`` the merge itself (reading, computing and writing every shard).
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    tool, config, out, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    seed = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(threads)
    if tool == "mergebench":
        from mergebench.engine import merge
        from mergebench.engine.mergekit_config import load_mergekit_yaml

        t1 = time.perf_counter()
        request = load_mergekit_yaml(config, seed=seed)
        merge(request, out, progress=False, overwrite=True)
    elif tool == "mergekit":
        import yaml
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions

        t1 = time.perf_counter()
        with open(config) as f:
            cfg = MergeConfiguration.model_validate(yaml.safe_load(f))
        opts = MergeOptions(
            cuda=False, lazy_unpickle=False, copy_tokenizer=False, quiet=True, write_model_card=False,
            random_seed=seed, num_threads=threads,
        )
        run_merge(cfg, out, opts)
    else:
        raise SystemExit(f"unknown tool {tool!r}")
    t2 = time.perf_counter()
    print(json.dumps({"import_s": t1 - t0, "merge_s": t2 - t1, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
