import os

# Tests never touch a hub: a miss must fail fast instead of retrying for 20+ s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MERGEBENCH_THREADS", "1")  # eval/sweep in tests: one thread, as below (mergebench.threads)

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# The machine is shared and small: one thread keeps SVD/eigen timings sane.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_pool(tmp_path_factory):
    """A tiny random Llama base and three experts on disk (single-file safetensors)."""
    from mergebench.toy import make_tiny_pool

    return make_tiny_pool(tmp_path_factory.mktemp("tiny_pool"), 3)


@pytest.fixture()
def tiny_suites(tmp_path, monkeypatch, tiny_pool):
    """A suites root holding the real embedded data, a tiny pool and a tiny suite."""
    from mergebench.zoo.tasks import embedded_dir

    base, experts = tiny_pool
    root = tmp_path / "suites"
    (root / "pools").mkdir(parents=True)
    (root / "embedded").symlink_to(embedded_dir())
    tasks = ["mb_capitals", "mb_sentiment", "mb_elements"]
    pool = {
        "name": "tiny",
        "base": {"name": "base", "path": str(base)},
        "experts": [{"name": f"e{i}", "path": str(p), "tags": {"task": tasks[i]}} for i, p in enumerate(experts)],
    }
    (root / "pools" / "tiny.yaml").write_text(json.dumps(pool))
    suite = {
        "name": "tiny", "version": 1, "default_profile": "embedded",
        "methods": {"ties": {"params": {"density": 0.5, "lambda": 0.5}, "source": "test"}},
        "profiles": {"embedded": {
            "pools": ["tiny"],
            "tasks": [{"name": t, "metric": "acc"} for t in tasks],
            "sampler": {"mode": "uniform", "sizes": [2, 3], "subsets_per_size": 2, "seed": 0},
            "docs": {"budget": 5, "seed": 0, "split": "test"},
            "eval": {"dtype": "float32", "batch_size": 8},
            "references": {"base": True, "experts": True},
        }},
    }
    (root / "tiny.yaml").write_text(json.dumps(suite))
    monkeypatch.setenv("MERGEBENCH_SUITES", str(root))
    return root
