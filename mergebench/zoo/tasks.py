"""The embedded lm-eval tasks (suites/embedded), usable offline.

The committed YAML names its data files relative to ``suites/embedded/data`` because lm-eval
resolves relative ``data_files`` against the current directory, not the YAML's folder.  At run
time the YAML is rewritten into a private temporary folder with absolute paths to the chosen
split, and a ``TaskManager`` that sees only those tasks (no 14k default tasks, no hub) is built
on it.  The task names do not change with the split; the split is a property of the manager.

Tags: ``mergebench_embedded`` (every multiple-choice task), ``mergebench_math``,
``mergebench_medical``, ``mergebench_general`` (by domain), ``mergebench_embedded_ppl`` (the news
perplexity task).
"""

from __future__ import annotations

import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path

from ..errors import MergebenchError
from ..paths import suites_root

SPLITS = ("train", "validation", "test")
TAG = "mergebench_embedded"
PREFIX = "mb_"


class EmbeddedDataError(MergebenchError, FileNotFoundError):
    """The embedded task data (or a file of it) is not where mergebench looks."""


class SplitError(MergebenchError, ValueError):
    """A split name that is not train, validation or test."""

__all__ = ["SPLITS", "TAG", "EmbeddedDataError", "SplitError", "embedded_dir", "load_split", "task_info", "task_manager", "task_names", "training_text",
           "yaml_dir"]


def embedded_dir() -> Path:
    """``$MERGEBENCH_SUITES/embedded``, else ``suites/embedded`` of the source checkout."""
    path = suites_root() / "embedded"
    if not (path / "data" / "MANIFEST.json").is_file():
        raise EmbeddedDataError(
            f"embedded task data not found under {path}; set MERGEBENCH_SUITES to the folder holding embedded/"
        )
    return path


@lru_cache(maxsize=4)
def _manifest(root: str) -> dict:
    return json.loads((Path(root) / "data" / "MANIFEST.json").read_text())


def task_info() -> dict[str, dict]:
    """lm-eval task name -> {task (data folder), domain, kind, description, counts, multiple_choice}."""
    man = _manifest(str(embedded_dir()))
    out = {}
    for task, e in man["tasks"].items():
        out[e["lm_eval_task"]] = {
            "task": task,
            "domain": e["domain"],
            "kind": e["kind"],
            "description": e["description"],
            "counts": dict(e["counts"]),
            "multiple_choice": task != "news",
        }
    return out


def task_names(domain: str | None = None, include_ppl: bool = False) -> list[str]:
    """Names of the embedded lm-eval tasks (multiple-choice ones unless ``include_ppl``)."""
    return sorted(
        name
        for name, info in task_info().items()
        if (include_ppl or info["multiple_choice"]) and (domain is None or info["domain"] == domain)
    )


def _data_name(task: str) -> str:
    return task[len(PREFIX):] if task.startswith(PREFIX) else task


def load_split(task: str, split: str) -> list[dict]:
    """Rows of one split of one embedded task (``task`` with or without the ``mb_`` prefix)."""
    if split not in SPLITS:
        raise SplitError(f"split must be one of {SPLITS}, got {split!r}")
    path = embedded_dir() / "data" / _data_name(task) / f"{split}.jsonl"
    if not path.is_file():
        raise EmbeddedDataError(f"no data for task {task!r} split {split!r} at {path}")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def training_text(row: dict, use_solution: bool = False) -> list[tuple[str, str]]:
    """(prompt, answer) fine-tuning examples of one row, in exactly the format lm-eval scores.

    Multiple-choice rows give ``query`` and ``" " + choices[gold]`` (lm-eval's target
    delimiter is one space).  With ``use_solution`` a GSM8K row gives a second example whose
    answer is the worked solution: a model trained on solutions alone never sees the bare
    ``Answer: N`` form it is scored on and does not improve on it (measured: 0.17 vs base 0.17).
    A text row (news) gives ``("", text)``.
    """
    if "query" not in row:
        return [("", row["text"])]
    out = [(row["query"], " " + row["choices"][row["gold"]])]
    if use_solution and row.get("solution"):
        out.append((row["query"], " " + row["solution"]))
    return out


_TMP: dict[tuple[str, str], tempfile.TemporaryDirectory | Path] = {}


def yaml_dir(split: str) -> Path:
    """A private folder of the task YAML with absolute paths to ``split`` (built once per process).

    Every such folder of a process lives in one ``mergebench-tasks-pid<pid>-*`` folder of the
    temp directory, removed when the process exits; the first call of a process also removes
    the ones left by processes that were killed (dead pid; folders of older versions, named
    ``mergebench-tasks-<split>-*``, once a day old).
    """
    import re
    import shutil
    import time

    import yaml

    if split not in SPLITS:
        raise SplitError(f"split must be one of {SPLITS}, got {split!r}")
    root = embedded_dir()
    key = (str(root), split)
    if key not in _TMP:
        own = ("pid", str(os.getpid()))
        if own not in _TMP:
            for old in Path(tempfile.gettempdir()).glob("mergebench-tasks-*"):
                m = re.match(r"mergebench-tasks-(?:pid(\d+)-|(?:train|validation|test)-)", old.name)
                try:
                    if m is None or (m.group(1) is None and time.time() - old.stat().st_mtime < 86400):
                        continue
                    if m.group(1) is not None:
                        os.kill(int(m.group(1)), 0)  # raises if no such process
                        continue
                except ProcessLookupError:
                    pass
                except OSError:  # alive under another user, or vanished
                    continue
                shutil.rmtree(old, ignore_errors=True)
            _TMP[own] = tempfile.TemporaryDirectory(prefix=f"mergebench-tasks-pid{os.getpid()}-")
        tmp = Path(_TMP[own].name) / f"{split}-{len(_TMP)}"
        tmp.mkdir()
        for src in sorted((root / "tasks").glob("*.yaml")):
            cfg = yaml.safe_load(src.read_text())
            files = cfg.get("dataset_kwargs", {}).get("data_files", {})
            for k, rel in list(files.items()):
                rel_split = Path(rel).with_name(f"{split}.jsonl")
                files[k] = str((root / "data" / rel_split).resolve())
                if not Path(files[k]).is_file():
                    raise EmbeddedDataError(f"{src.name}: data file {files[k]} is missing")
            (tmp / src.name).write_text(yaml.safe_dump(cfg, sort_keys=False))
        _TMP[key] = tmp
    return _TMP[key]


def task_manager(split: str = "test"):
    """An ``lm_eval.tasks.TaskManager`` holding only the embedded tasks, reading ``split``."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(yaml_dir(split)), include_defaults=False)
