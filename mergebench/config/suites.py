"""Evaluation suites: which tasks, pools, subsets, documents and hyperparameters a run uses.

A suite file (``suites/<name>.yaml``, versioned) reproduces one paper's evaluation (``paper:``, a key of suites/papers/papers.yaml). It has
named **profiles**:

* ``paper`` -- the paper's real configuration (hub models and lm-eval tasks);
* ``embedded`` -- the default when no pool is given: the offline ``smol`` pool and the embedded
  tasks, sized to finish one method in minutes on 2 CPU cores;
* ``quick`` -- a CI-sized variant of ``embedded``.

Each profile says how it differs from the paper (``deviations``, printed by the CLI). A profile
may ``extends:`` another one of the same suite (mappings are merged key by key, everything else
is replaced). Method hyperparameters are the ones the paper used, with the section or table they
come from (``methods.<name>.source``); a profile can override them.

The subsets and documents a profile evaluates come from :mod:`mergebench.config.sampling`, so they
depend only on the pool's expert list and the profile's sampler settings -- never on the method.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from mergebench.config import papers, sampling
from mergebench.config.pools import ConfigError, Pool, read_yaml, suites_root, tag_values, validate_named_file
from mergebench.config.sampling import DocSample, Subset

from mergebench.errors import MergebenchError

__all__ = [
    "REPORT_METRICS",
    "DocsConfig",
    "EvalConfig",
    "GroupSpec",
    "MethodDefaults",
    "Profile",
    "SamplerConfig",
    "Selector",
    "Suite",
    "SuiteError",
    "TaskSpec",
    "check_task_metrics",
    "embedded_task_names",
    "list_suites",
    "load_suite",
    "suite_names",
]

REPORT_METRICS: dict[str, str] = {
    "per_task": "each task's headline metric, per merged model",
    "avg": "unweighted mean of the tasks' headline metrics (mean and std over the subsets of a size)",
    "avg_normalized": (
        "mean of max(0, s - c) / (1 - c) per task, c = chance (Open LLM Leaderboard v2 style; Fisher–Rao merging paper, Tables 1-2)"
    ),
    "p_gt_base": "share of a size's subsets whose avg beats the base's (in-the-wild merging study, Tables 1, 3)",
    "gain_vs_base": "mean improvement of avg over the base's (in-the-wild merging study, Tables 1, 3)",
    "p_gt_best_expert": "share of subsets beating the best single expert by avg (in-the-wild merging study, Table 2)",
    "gain_vs_best_expert": "mean improvement over the best single expert's avg (in-the-wild merging study, Table 2)",
    "merging_loss": "(P(merged, T_i) / P(expert_i, T_i) - 1) x 100 per member task, and its mean (merging-collapse study, eq. 1)",
}


class SuiteError(MergebenchError, ValueError):
    """A suite or profile cannot be used as asked."""


_Strict = ConfigDict(extra="forbid")


class TaskSpec(BaseModel):
    """One lm-eval task (or group) and how it is scored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="lm-eval task, group or tag name")
    fewshot: int = Field(0, ge=0)
    metric: str = Field("acc", description="headline metric key in lm-eval's results (acc, acc_norm, mcc, ...)")
    seed_name: str | None = Field(None, description="the task's name in the seed, when it differs")
    key: str | None = Field(None, description="extra name matching experts' `task` tags")
    chance: float | None = Field(None, ge=0.0, lt=1.0, description="score of random guessing (for normalization)")
    docs: int | None = Field(None, ge=1, description="per-task document budget (overrides the profile's)")
    note: str = ""

    @property
    def aliases(self) -> set[str]:
        """Names an expert's ``task`` tag may use for this task (``mb_capitals`` <-> ``capitals``)."""
        out = {self.name, self.name.removeprefix("mb_")}
        if self.key:
            out.add(self.key)
        return out


class DocsConfig(BaseModel):
    model_config = _Strict

    budget: int | None = Field(None, ge=1, description="documents per task; None evaluates every document")
    seed: int = 0
    split: Literal["train", "validation", "test"] = Field(
        "test", description="split of the embedded tasks (hub tasks use lm-eval's evaluation split)"
    )


class Selector(BaseModel):
    """Which of a pool's experts a profile uses."""

    model_config = _Strict

    where: dict[str, str | list[str]] = Field(default_factory=dict, description="tag filters (AND; a list = any of)")
    names: list[str] | None = None
    single_task: bool = Field(
        False, description="only experts whose `task` tag names exactly one of the profile's tasks"
    )
    one_per_task: bool = Field(False, description="keep the first expert (pool order) of each task")


class GroupSpec(BaseModel):
    """A fixed, named subset (in-the-wild merging study, App. E) and the tasks it is evaluated on."""

    model_config = _Strict

    name: str
    where: dict[str, str | list[str]] = Field(default_factory=dict)
    experts: list[str] | None = None
    tasks: list[str] = Field(min_length=1, description="task names or task-set names")


class SamplerConfig(BaseModel):
    model_config = _Strict

    mode: Literal["uniform", "progressive", "groups"]
    sizes: list[int | Literal["all"]] = Field(default_factory=list)
    subsets_per_size: int | Literal["all"] = Field(1, description="uniform: subsets per size; progressive: chains")
    seed: int = 0
    order: Literal["pool", "seeded"] = Field(
        "seeded", description="progressive: chain 0 follows the pool order if 'pool'"
    )
    count_base: bool = Field(False, description="a size counts the base as one of the merged models (as in the Fisher–Rao merging paper)")
    groups: list[GroupSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self):
        if self.mode in ("uniform", "progressive") and not self.sizes:
            raise ValueError(f"mode {self.mode!r} needs sizes")
        if self.mode == "groups" and not self.groups:
            raise ValueError("mode 'groups' needs groups")
        if self.mode != "groups" and self.groups:
            raise ValueError("groups are only used with mode 'groups'")
        if self.mode == "progressive" and self.subsets_per_size == "all":
            raise ValueError("progressive: subsets_per_size is the number of chains and cannot be 'all'")
        if isinstance(self.subsets_per_size, int) and self.subsets_per_size < 1:
            raise ValueError("subsets_per_size must be >= 1")
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise ValueError("group names must be unique")
        return self


class EvalConfig(BaseModel):
    model_config = _Strict

    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    batch_size: int | Literal["auto"] = 16
    apply_chat_template: bool = False


class ReferencesConfig(BaseModel):
    """Unmerged models evaluated once per pool (cached): the base and every expert."""

    model_config = _Strict

    base: bool = True
    experts: bool = True


class MethodDefaults(BaseModel):
    """Hyperparameters a paper used for one method, and where it says so."""

    model_config = _Strict

    params: dict[str, Any] = Field(default_factory=dict)
    source: str = ""
    note: str = ""


class Profile(BaseModel):
    """One concrete configuration of a suite (paper / embedded / quick)."""

    model_config = _Strict

    name: str = ""
    description: str = ""
    pools: list[str] = Field(min_length=1)
    expert_filter: Selector | None = None
    tasks: list[TaskSpec] = Field(min_length=1)
    task_sets: dict[str, list[str]] = Field(default_factory=dict)
    sampler: SamplerConfig
    docs: DocsConfig = Field(default_factory=DocsConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    eval_scope: Literal["all", "members"] = Field(
        "all", description="'members': a merge is scored only on its members' own tasks (as in the merging-collapse study)"
    )
    references: ReferencesConfig = Field(default_factory=ReferencesConfig)
    methods: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="overrides of the suite's method params"
    )
    normalization: Literal["none", "chance", "openllm_v2"] = "none"
    report: list[str] = Field(default_factory=lambda: ["avg"])
    budget_minutes: float | None = Field(None, gt=0, description="target wall time of one method on 2 CPU cores")
    deviations: str = Field("", description="how this profile differs from the paper (printed by the CLI)")

    @field_validator("tasks", mode="before")
    @classmethod
    def _task_strings(cls, v):
        if isinstance(v, list):
            return [{"name": t} if isinstance(t, str) else t for t in v]
        return v

    @model_validator(mode="after")
    def _check(self):
        names = [t.name for t in self.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"tasks listed twice: {', '.join(dup)}")
        for set_name, members in self.task_sets.items():
            unknown = [m for m in members if m not in names]
            if unknown:
                raise ValueError(f"task_sets.{set_name}: not among the profile's tasks: {', '.join(unknown)}")
        for g in self.sampler.groups:
            unknown = [t for t in g.tasks if t not in names and t not in self.task_sets]
            if unknown:
                raise ValueError(f"sampler.groups.{g.name}.tasks: unknown task or task set: {', '.join(unknown)}")
        bad = [r for r in self.report if r not in REPORT_METRICS]
        if bad:
            raise ValueError(f"report: unknown metric(s) {', '.join(bad)}; known: {', '.join(REPORT_METRICS)}")
        if "merging_loss" in self.report and not self.references.experts:
            raise ValueError("report merging_loss needs references.experts: true")
        return self

    # ---------------------------------------------------------------- tasks

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise SuiteError(f"profile {self.name!r} has no task {name!r}; it has: {', '.join(t.name for t in self.tasks)}")

    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def _expand(self, names: Sequence[str]) -> list[TaskSpec]:
        out: list[TaskSpec] = []
        for n in names:
            for t in self.task_sets.get(n, [n]):
                spec = self.task(t)
                if spec not in out:
                    out.append(spec)
        return out

    def _own_tasks(self, pool: Pool, expert: str) -> list[TaskSpec]:
        """Tasks an expert was fine-tuned for, from its ``task``/``tasks`` tag."""
        e = pool.expert(expert)
        tagged = tag_values(e.tags.get("task", e.tags.get("tasks")))
        return [t for t in self.tasks if any(x in t.aliases for x in tagged)]

    def tasks_for(self, subset: Subset, pool: Pool) -> list[TaskSpec]:
        """Tasks a merged subset is evaluated on."""
        if subset.kind == "group":
            for g in self.sampler.groups:
                if g.name == subset.label:
                    return self._expand(g.tasks)
            raise SuiteError(f"profile {self.name!r} has no group {subset.label!r}")
        if self.eval_scope == "members":
            out: list[TaskSpec] = []
            for m in subset.members:
                out += [t for t in self._own_tasks(pool, m) if t not in out]
            return out
        return list(self.tasks)

    def reference_tasks(self, pool: Pool, expert: str | None = None) -> list[TaskSpec]:
        """Tasks a reference model (the base if ``expert`` is None) is evaluated on."""
        if expert is not None and self.eval_scope == "members":
            return self._own_tasks(pool, expert)
        return list(self.tasks)

    def doc_sample(self, task: TaskSpec | str, n_docs: int, subtask: str | None = None) -> DocSample:
        """Seeded document indices of ``task`` (pass them to lm-eval's ``samples=``).

        lm-eval keys ``samples`` by leaf task: for a group (``mmlu``, ``leaderboard_bbh``) call this
        once per subtask with ``subtask=`` its name; each subtask gets the group's budget.
        """
        spec = self.task(task) if isinstance(task, str) else task
        budget = spec.docs if spec.docs is not None else self.docs.budget
        return sampling.doc_sample(subtask or spec.name, n_docs, budget, self.docs.seed, self.docs.split)

    # ---------------------------------------------------------------- experts and subsets

    def experts(self, pool: Pool) -> list[str]:
        """The pool's experts this profile may merge (pool order)."""
        f = self.expert_filter
        if f is None:
            return pool.expert_names()
        names = pool.select(f.where or None, f.names)
        if f.single_task:
            names = [n for n in names if _single_task(pool, n) and len(self._own_tasks(pool, n)) == 1]
        if f.one_per_task:
            seen: set[str] = set()
            kept = []
            for n in names:
                own = tuple(t.name for t in self._own_tasks(pool, n))
                if own and not seen.intersection(own):
                    seen.update(own)
                    kept.append(n)
            names = kept
        if not names:
            raise SuiteError(
                f"profile {self.name!r}: no expert of pool {pool.name!r} passes the expert filter {f.model_dump()}"
            )
        return names

    def subsets(self, pool: Pool) -> list[Subset]:
        """Every subset to merge, identical for every method (see :mod:`mergebench.config.sampling`)."""
        s = self.sampler
        experts = self.experts(pool)
        try:
            if s.mode == "uniform":
                return sampling.uniform_subsets(experts, s.sizes, s.subsets_per_size, s.seed, count_base=s.count_base)
            if s.mode == "progressive":
                return sampling.progressive_subsets(
                    experts, s.sizes, int(s.subsets_per_size), s.seed, order=s.order, count_base=s.count_base
                )
            groups = {}
            for g in s.groups:
                chosen = pool.select(g.where or None, g.experts)
                groups[g.name] = [n for n in chosen if n in experts]
            return sampling.group_subsets(experts, groups, count_base=s.count_base)
        except sampling.SamplingError as exc:
            raise SuiteError(f"profile {self.name!r} on pool {pool.name!r}: {exc}") from None

    def plan_counts(self, pool: Pool, n_docs: Mapping[str, int] | None = None) -> dict:
        """How much work a run is: merges, model x task evaluations, documents (when known)."""
        subsets = self.subsets(pool)
        n_docs = n_docs or {}

        def docs(tasks: Sequence[TaskSpec]) -> int | None:
            total = 0
            for t in tasks:
                if t.name not in n_docs:
                    return None
                total += len(self.doc_sample(t, n_docs[t.name]).indices)
            return total

        merged = [(s, self.tasks_for(s, pool)) for s in subsets]
        refs = []
        if self.references.base:
            refs.append(("base", self.reference_tasks(pool)))
        if self.references.experts:
            refs += [(e, self.reference_tasks(pool, e)) for e in self.experts(pool)]
        merged_docs = [docs(t) for _, t in merged]
        ref_docs = [docs(t) for _, t in refs]
        return {
            "merges": len(subsets),
            "sizes": sorted({s.size for s in subsets}),
            "merged_task_evals": sum(len(t) for _, t in merged),
            "reference_models": len(refs),
            "reference_task_evals": sum(len(t) for _, t in refs),
            "merged_docs": None if None in merged_docs else sum(merged_docs),
            "reference_docs": None if None in ref_docs else sum(ref_docs),
        }

    def describe(self) -> dict:
        s = self.sampler
        return {
            "name": self.name,
            "description": self.description.strip(),
            "pools": list(self.pools),
            "tasks": [{"name": t.name, "fewshot": t.fewshot, "metric": t.metric} for t in self.tasks],
            "sampler": {
                "mode": s.mode,
                "sizes": list(s.sizes),
                "subsets_per_size": s.subsets_per_size,
                "seed": s.seed,
                "count_base": s.count_base,
                "groups": [g.name for g in s.groups],
            },
            "docs_per_task": self.docs.budget,
            "eval_scope": self.eval_scope,
            "report": list(self.report),
            "budget_minutes": self.budget_minutes,
            "deviations": self.deviations.strip(),
        }


def _single_task(pool: Pool, expert: str) -> bool:
    tags = pool.expert(expert).tags
    return len(tag_values(tags.get("task", tags.get("tasks")))) == 1


class Suite(BaseModel):
    """A versioned evaluation suite with its profiles and the paper's method hyperparameters."""

    model_config = _Strict

    name: str
    version: int | str
    title: str = ""
    paper: str | None = Field(None, description="key of the suite's paper in suites/papers/papers.yaml")
    reference: str = ""
    description: str = ""
    default_profile: str = "embedded"
    methods: dict[str, MethodDefaults] = Field(default_factory=dict)
    profiles: dict[str, Profile]

    _file: Path | None = PrivateAttr(None)

    _legacy_seed = model_validator(mode="before")(papers.legacy_seed)
    _paper_key = field_validator("paper")(papers.paper_key)

    @property
    def seed(self) -> str | None:
        """Maintainer-only: the seed number of :attr:`paper` (old files said ``seed: "001"``)."""
        return papers.seed_of(self.paper)

    @model_validator(mode="after")
    def _check(self):
        for key, prof in self.profiles.items():
            if prof.name and prof.name != key:
                raise ValueError(f"profiles.{key}.name is {prof.name!r}; it must match its key")
            prof.name = key
        if self.default_profile not in self.profiles:
            raise ValueError(
                f"default_profile {self.default_profile!r} is not among the profiles ({', '.join(self.profiles)})"
            )
        return self

    @property
    def file(self) -> Path | None:
        return self._file

    @property
    def id(self) -> str:
        """``name@version`` (stored with every result row)."""
        return f"{self.name}@{self.version}"

    def profile(self, name: str | None = None, pool: str | None = None) -> Profile:
        """The named profile; with no name, the first profile using ``pool`` (if given), else
        the default (embedded) profile."""
        if name is not None:
            if name not in self.profiles:
                raise SuiteError(f"suite {self.name!r} has no profile {name!r}; profiles: {', '.join(self.profiles)}")
            prof = self.profiles[name]
            if pool is not None and pool not in prof.pools:
                raise SuiteError(
                    f"profile {self.name}:{name} runs on pool(s) {', '.join(prof.pools)}, not {pool!r}"
                )
            return prof
        if pool is not None:
            for prof in self.profiles.values():
                if pool in prof.pools:
                    return prof
            raise SuiteError(
                f"no profile of suite {self.name!r} uses pool {pool!r}; "
                + "; ".join(f"{k}: {', '.join(p.pools)}" for k, p in self.profiles.items())
            )
        return self.profiles[self.default_profile]

    def method_params(self, method: str, profile: str | Profile | None = None) -> dict[str, Any]:
        """The paper's hyperparameters for ``method`` (profile overrides applied); {} if none."""
        params = dict(self.methods[method].params) if method in self.methods else {}
        prof = self.profile(profile) if isinstance(profile, str) or profile is None else profile
        params.update(prof.methods.get(method, {}))
        return params

    def describe(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "id": self.id,
            "title": self.title,
            "paper": self.paper,
            "reference": self.reference,
            "file": str(self._file) if self._file else None,
            "default_profile": self.default_profile,
            "methods": {k: {"params": dict(v.params), "source": v.source} for k, v in self.methods.items()},
            "profiles": {k: p.describe() for k, p in self.profiles.items()},
        }

    def check(self, pools: bool = True, methods: bool = False) -> list[str]:
        """Cross-file problems: unknown pools, embedded tasks that do not exist, and (with
        ``methods``) method names or parameters the registry does not know."""
        from mergebench.config.pools import pool_names

        problems = []
        known_pools = set(pool_names()) if pools else set()
        embedded = set(embedded_task_names())
        for key, prof in self.profiles.items():
            if pools:
                problems += [f"profiles.{key}.pools: unknown pool {p!r}" for p in prof.pools if p not in known_pools]
            if "smol" in prof.pools:
                problems += [
                    f"profiles.{key}.tasks: {t.name!r} is not an embedded task (suites/embedded/tasks)"
                    for t in prof.tasks if t.name not in embedded
                ]
        if methods:
            from mergebench.methods.registry import get_method

            for key, params in [(k, v.params) for k, v in self.methods.items()] + [
                (k, v) for p in self.profiles.values() for k, v in p.methods.items()
            ]:
                try:
                    spec = get_method(key)
                except KeyError:
                    problems.append(f"methods.{key}: no such method")
                    continue
                known = {p.name for p in spec.params}
                problems += [
                    f"methods.{key}.params.{p}: {key} has no parameter {p!r}" for p in params if p not in known
                ]
        return problems


# --------------------------------------------------------------------------- loading


def _deep_merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _deep_merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    return copy.deepcopy(over)


def _expand_profiles(path: Path, data: dict) -> dict:
    raw = data.get("profiles")
    if not isinstance(raw, dict):
        return data
    done: dict[str, Any] = {}

    def build(key: str, stack: tuple[str, ...]) -> Any:
        if key in done:
            return done[key]
        if key in stack:
            raise ConfigError(f"{path}: profiles.{key}.extends: circular ({' -> '.join(stack + (key,))})")
        if key not in raw:
            raise ConfigError(f"{path}: profiles.{stack[-1]}.extends: no profile {key!r}")
        prof = raw[key]
        if isinstance(prof, dict) and "extends" in prof:
            parent = build(prof["extends"], stack + (key,))
            prof = _deep_merge(parent, {k: v for k, v in prof.items() if k != "extends"})
        done[key] = prof
        return prof

    return {**data, "profiles": {k: build(k, ()) for k in raw}}


def suites_dir() -> Path:
    return suites_root()


def suite_names() -> list[str]:
    d = suites_dir()
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def _load_suite_file(path: Path) -> Suite:
    suite = validate_named_file(Suite, path, _expand_profiles(path, read_yaml(path)), "suite")
    suite._file = path
    return suite


def load_suite(name: str) -> Suite:
    """Load ``suites/<name>.yaml`` (a path to a YAML file is accepted too)."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return _load_suite_file(p)
    path = suites_dir() / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(suite_names()) or "(none)"
        raise SuiteError(f"unknown suite {name!r}; known suites: {known} (in {suites_dir()})")
    return _load_suite_file(path)


def list_suites() -> list[Suite]:
    return [load_suite(n) for n in suite_names()]


def _reported_metrics(entry) -> set[str] | None:
    """Metrics lm-eval reports for one entry of a ``TaskManager``'s index, from its config: a
    task's ``metric_list`` (or lm-eval's defaults for its output type), a group's
    ``aggregate_metric_list``; None where the config does not say (Python tasks, tags)."""
    kind = getattr(entry.kind, "name", str(entry.kind)).upper()
    cfg = entry.cfg or {}
    if kind == "GROUP":
        listed = cfg.get("aggregate_metric_list")
    elif kind == "TASK":
        listed = cfg.get("metric_list")
        if not listed:
            from lm_eval.api.registry import DEFAULT_METRIC_REGISTRY

            return set(DEFAULT_METRIC_REGISTRY.get(cfg.get("output_type"), [])) or None
    else:
        return None
    if isinstance(listed, dict):
        listed = [listed]
    names = {m.get("metric") for m in listed or [] if isinstance(m, dict)}
    return {n for n in names if isinstance(n, str)} or None


def check_task_metrics(suite: Suite, profile: Profile, task_manager) -> None:
    """Every task of ``profile`` is known to ``task_manager`` (the lm-eval ``TaskManager`` a run
    uses) and its config reports the task's headline ``metric`` -- otherwise the task would drop
    out of every headline score without a word. Raises :class:`SuiteError` naming each."""
    index = task_manager.task_index
    embedded = all(t.name.startswith("mb_") for t in profile.tasks)
    problems = []
    for i, t in enumerate(profile.tasks):
        where = f"profiles.{profile.name}.tasks.{i}"
        entry = index.get(t.name)
        if entry is None:
            if embedded:
                known = "embedded tasks: " + ", ".join(sorted(n for n, e in index.items() if e.kind.name != "TAG"))
            else:
                known = "not in the installed lm-eval or suites/lm_eval"
            problems.append(f"{where}: no task, group or tag {t.name!r} ({known})")
            continue
        metrics = _reported_metrics(entry)
        if metrics is not None and t.metric.partition(",")[0] not in metrics:
            problems.append(
                f"{where}: task {t.name!r} reports no metric {t.metric!r} (its lm-eval config lists: "
                f"{', '.join(sorted(metrics))})"
            )
    if problems:
        raise SuiteError(f"{suite.file or suite.name}: " + "; ".join(problems))


_TASK_LINE = re.compile(r"^task:\s*([A-Za-z0-9_.\-]+)\s*$", re.M)


def embedded_task_names() -> list[str]:
    """lm-eval task names declared in ``suites/embedded/tasks/*.yaml``."""
    d = suites_root() / "embedded" / "tasks"
    out = []
    for f in sorted(d.glob("*.yaml")) if d.is_dir() else []:
        m = _TASK_LINE.search(f.read_text())
        if m:
            out.append(m.group(1))
    return out
