"""The lm-eval adapter: score an in-memory model on lm-eval tasks.

Models are passed to lm-eval's ``HFLM`` as objects, so a merged model is evaluated without
a round trip through disk. Documents are subsampled with explicit index lists
(``samples=``), never ``limit=`` (which takes the first N). lm-eval's own request cache is
never used: it keys requests without the model's identity.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from mergebench.evaluation.outcomes import doc_outcomes

__all__ = ["SCORERS", "Battery", "TaskScore", "evaluate_model", "quiet_progress_bars"]

_SKIP = ("alias", "samples", "sample_len", " ")


@dataclass(frozen=True)
class TaskScore:
    """One metric of one task: value, standard error (NaN when lm-eval gives none), docs scored."""

    task: str
    metric: str
    value: float
    stderr: float
    n_docs: int

    def as_dict(self) -> dict:
        return asdict(self)


SCORERS = ("shared", "hflm")


class Battery:
    """lm-eval tasks with their documents chosen and their requests built once, scored for any
    number of models.

    Building a task (reading its data, choosing documents, rendering prompts, tokenizing) costs
    the same for every model of a run; a battery does it for the first model only. Later models
    reuse the same request objects (their responses are cleared), so every model is scored on
    exactly the same requests. lm-eval still applies the tasks' filters and metrics and
    aggregates groups.

    ``samples`` maps an lm-eval *leaf* task to the document indices to score (seeded lists from
    :mod:`mergebench.config.sampling`): lm-eval looks ``samples`` up by leaf task name only, so a group
    is subsampled through its leaves' entries and still reports its aggregate. Leaves absent
    from it are scored on every document; entries for tasks not evaluated here are ignored, and
    an entry keyed by a group is refused (lm-eval would silently score every document).
    ``fewshot`` sets the number of in-context examples per task (or group: all its subtasks),
    since lm-eval's own ``num_fewshot`` is one value for every task.
    """

    def __init__(self, tasks: Sequence[str], task_manager, *, samples: Mapping[str, Sequence[int]] | None = None,
                 fewshot: Mapping[str, int] | None = None):
        self.tasks = list(tasks)
        loaded = task_manager.load(self.tasks)
        keyed_by_group = sorted(set(samples or {}) & set(loaded["groups"]))
        if keyed_by_group:
            raise ValueError(
                f"document samples for group(s) {', '.join(keyed_by_group)}: lm-eval looks samples up by leaf "
                "task, so give one index list per subtask"
            )
        self.samples = {t: list(map(int, idx)) for t, idx in (samples or {}).items() if t in loaded["tasks"]}
        if fewshot:
            _set_fewshot(loaded, fewshot)
        # the loaded objects (lm-eval would build every task again from names): each named group,
        # and every leaf not under one (plain tasks, and the tasks a tag stands for)
        groups = [loaded["groups"][n] for n in self.tasks if n in loaded["groups"]]
        grouped = {t.task_name for g in groups for t in g.get_all_tasks()}
        self._specs = groups + [t for name, t in loaded["tasks"].items() if name not in grouped]
        self._leaves = list(loaded["tasks"].values())
        self.task_manager = task_manager
        self.built = False
        #: Per-document outcomes of the model scored last (:func:`mergebench.evaluation.outcomes.doc_outcomes`).
        self.outcomes: list[dict] = []

    def score(self, model, tokenizer, *, batch_size: int | str = 16, device: str = "cpu", quiet: bool = False,
              scorer: str = "shared") -> tuple[list[TaskScore], dict]:
        """Score one model: (one :class:`TaskScore` per task and metric, scoring statistics).

        ``scorer="shared"`` runs :class:`mergebench.evaluation.scorer.PrefixSharingLM` (each shared context
        once, output layer only where read); ``"hflm"`` lm-eval's stock ``HFLM``. ``quiet`` hides
        lm-eval's and datasets' progress bars (the caller draws its own)."""
        import lm_eval
        import torch

        if scorer not in SCORERS:
            raise ValueError(f"scorer must be one of {', '.join(SCORERS)}, got {scorer!r}")
        # lm-eval warns on every call that an in-memory model is not a string; that is the point here
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        kwargs = dict(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
        if scorer == "shared":
            from mergebench.evaluation.scorer import PrefixSharingLM

            lm = PrefixSharingLM(**kwargs, quiet=quiet)
        else:
            lm = (_quiet_hflm() if quiet else _hflm())(**kwargs)
        if self.built:
            self._reuse_requests()
        t0 = time.perf_counter()
        # scoring never needs autograd: without this a caller outside inference mode keeps every
        # activation alive (zoo verify reached 17 GB)
        with torch.inference_mode(), quiet_progress_bars() if quiet else contextlib.nullcontext():
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=self._specs,
                task_manager=self.task_manager,
                samples=self.samples or None,
                use_cache=None,
                log_samples=False,
                verbosity="WARNING",
            )
        self.built = True
        self.outcomes = doc_outcomes(self._leaves, self.samples)
        stats = lm.stats.as_dict() if hasattr(lm, "stats") else {}
        stats.update(scorer=scorer, eval_seconds=time.perf_counter() - t0,
                     requests_total=sum(len(t.instances) for t in self._leaves))
        return _scores(out, self.tasks), stats

    def _reuse_requests(self) -> None:
        """Keep the requests built for the first model: clear their responses and make the next
        ``build_all_requests`` (called by lm-eval for every model) a no-op for these tasks."""
        for task in self._leaves:
            for inst in task.instances:
                inst.resps.clear()
                inst.filtered_resps.clear()
            task.build_all_requests = _keep_requests


def _keep_requests(**_kwargs) -> None:
    """Stands in for ``Task.build_all_requests`` once a battery's requests are built."""


def evaluate_model(
    model,
    tokenizer,
    tasks: Sequence[str],
    task_manager,
    *,
    samples: Mapping[str, Sequence[int]] | None = None,
    batch_size: int | str = 16,
    device: str = "cpu",
    fewshot: Mapping[str, int] | None = None,
    quiet: bool = False,
    scorer: str = "shared",
) -> list[TaskScore]:
    """Evaluate ``model`` on ``tasks`` once (a one-model :class:`Battery`; see it for the arguments)."""
    battery = Battery(tasks, task_manager, samples=samples, fewshot=fewshot)
    return battery.score(model, tokenizer, batch_size=batch_size, device=device, quiet=quiet, scorer=scorer)[0]


def _scores(out: dict, tasks: Sequence[str]) -> list[TaskScore]:
    scores = []
    n_docs = out.get("n-samples", {})
    for task, metrics in out["results"].items():
        if task not in tasks:
            continue  # subtasks and subgroups of a requested group
        # a group has no n-samples entry; its sample_len is the sum over its leaves
        n = n_docs.get(task, {}).get("effective", metrics.get("sample_len", 0))
        for key, value in metrics.items():
            if any(key.startswith(s) for s in _SKIP) or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, _, _filter = key.partition(",")
            err = metrics.get(f"{metric}_stderr,{_filter}")
            stderr = float(err) if isinstance(err, (int, float)) else math.nan
            scores.append(TaskScore(task, metric, float(value), stderr, int(n)))
    return scores


def _set_fewshot(loaded: dict, fewshot: Mapping[str, int]) -> None:
    """Set ``num_fewshot`` on every leaf task of each named task in ``TaskManager.load``'s result."""
    children = loaded.get("group_map", {})

    def leaves(name: str) -> list[str]:
        if name in loaded["tasks"]:
            return [name]
        return [leaf for child in children.get(name, []) for leaf in leaves(child)]

    for name, k in fewshot.items():
        for leaf in leaves(name):
            loaded["tasks"][leaf].set_config(key="num_fewshot", value=int(k))


def _hflm():
    from lm_eval.models.huggingface import HFLM

    return HFLM


@functools.cache
def _quiet_hflm():
    """lm-eval's HF model with the per-request progress bars off (its own ``disable_tqdm`` switch)."""
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = True):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = True):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = True):
            return super().generate_until(requests, disable_tqdm=True)

    return QuietHFLM


@contextlib.contextmanager
def quiet_progress_bars():
    """Silence the tqdm bars of transformers (weight loading), datasets (split generation) and
    lm-eval (building each task's requests) while a caller draws its own progress bar.
    ``TQDM_DISABLE`` would do it, but tqdm reads it only when first imported, long before; so the
    libraries' own switches are used, and lm-eval's task module gets a disabled ``tqdm``."""
    import datasets
    import lm_eval.api.task as task_module
    from transformers.utils import logging as hf_logging

    datasets_on, hf_on = datasets.is_progress_bar_enabled(), hf_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    made_bar = task_module.tqdm
    task_module.tqdm = functools.partial(made_bar, disable=True)
    try:
        yield
    finally:
        task_module.tqdm = made_bar
        if datasets_on:
            datasets.enable_progress_bars()
        if hf_on:
            hf_logging.enable_progress_bar()
