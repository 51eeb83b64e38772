import os

# Tests never touch a hub: a miss must fail fast instead of retrying for 20+ s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# The machine is shared and small: one thread keeps SVD/eigen timings sane.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_pool(tmp_path_factory):
    """A tiny random Llama base and three experts on disk (single-file safetensors)."""
    from mergebench.toy import make_tiny_pool

    return make_tiny_pool(tmp_path_factory.mktemp("tiny_pool"), 3)
