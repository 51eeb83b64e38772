"""Model pools: a base model plus the experts that may be merged, declared in YAML.

A pool file (``suites/pools/<name>.yaml``) names its base and experts by Hugging Face id
(``hf: org/name``, optional ``revision``), local path (``path:``, may hold ``${PLACEHOLDER}``s
that the user supplies) or embedded-zoo name (``zoo:``; the folder comes from
``mergebench.zoo.materialized_path``). Experts carry free-form ``tags`` (domain, task, ...).
Ids transcribed from a seed paper keep the seed's spelling in ``seed_text`` when the paper's text
mangles them, and ids the paper does not print are marked ``inferred: true`` with a note.

Nothing here downloads: hub ids are looked up in the local HF cache only. Before any work,
:func:`validate_pool_compatibility` opens every checkpoint by its headers (through
``mergebench.engine.checkpoint``/``compat``) and reports, in one error, either the models
missing from the cache or the architecture/shape/vocabulary problems.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from mergebench.config import papers
from mergebench.config.yamlio import ConfigError, format_validation_error, read_yaml, validation_summary
from mergebench.errors import MergebenchError
from mergebench.paths import suites_root

__all__ = [
    "CompatibilityReport",
    "ConfigError",
    "MissingModelsError",
    "ModelRef",
    "PlaceholderError",
    "Pool",
    "PoolCompatibilityError",
    "PoolError",
    "config_problem",
    "describe_pools",
    "find_missing",
    "is_plausible_hf_id",
    "list_pools",
    "load_pool",
    "pool_names",
    "pools_dir",
    "suites_root",
    "tag_values",
    "validate_pool_compatibility",
    "validation_summary",
    "zoo_path",
]

TagValue = str | int | float | bool | list[str]


# --------------------------------------------------------------------------- errors


class PoolError(MergebenchError, ValueError):
    """A pool cannot be used as asked."""


class PlaceholderError(PoolError):
    """``${NAME}`` placeholders without a value; ``missing`` lists their names."""

    def __init__(self, message: str, missing: Sequence[str]):
        super().__init__(message)
        self.missing = list(missing)


class MissingModelsError(PoolError):
    """Models not found locally (mergebench never downloads). ``missing`` lists their ids/paths;
    the message's first line says how to get them. The CLI exits with code 3."""

    exit_code = 3

    def __init__(self, message: str, missing: Sequence[str]):
        super().__init__(message)
        self.missing = list(missing)


class PoolCompatibilityError(PoolError):
    """The pool's checkpoints cannot be merged together (architecture, tensors, shapes, vocab)."""


# --------------------------------------------------------------------------- locations


def pools_dir() -> Path:
    return suites_root() / "pools"


# --------------------------------------------------------------------------- ids and placeholders

_HF_PART = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$")
_PLACEHOLDER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def is_plausible_hf_id(text: str) -> bool:
    """``org/name`` with the Hub's character rules (letters, digits, ``-_.``; no ``--``/``..``)."""
    parts = text.split("/")
    if len(parts) != 2 or len(text) > 96 * 2 + 1:
        return False
    return all(_HF_PART.match(p) and "--" not in p and ".." not in p and len(p) <= 96 for p in parts)


def _substitute(text: str, lookup: Callable[[str], str | None], missing: list[str]) -> str:
    """Expand ``${NAME}`` and ``${NAME:-default}`` (defaults may nest placeholders)."""
    out: list[str] = []
    i = 0
    while i < len(text):
        j = text.find("${", i)
        if j < 0:
            out.append(text[i:])
            break
        out.append(text[i:j])
        m = _PLACEHOLDER_NAME.match(text, j + 2)
        if not m:
            raise ValueError(f"malformed placeholder in {text!r} at position {j}")
        name, k = m.group(), m.end()
        default = None
        if text.startswith(":-", k):
            depth, p = 1, k + 2
            while p < len(text) and depth:
                if text.startswith("${", p):
                    depth, p = depth + 1, p + 2
                    continue
                if text[p] == "}":
                    depth -= 1
                p += 1
            if depth:
                raise ValueError(f"unclosed placeholder in {text!r}")
            default, k = text[k + 2 : p - 1], p - 1
        if not text.startswith("}", k):
            raise ValueError(f"malformed placeholder in {text!r} at position {j}")
        value = lookup(name)
        if value is None:
            if default is None:
                if name not in missing:
                    missing.append(name)
                out.append("${" + name + "}")
            else:
                out.append(_substitute(default, lookup, missing))
        else:
            out.append(value)
        i = k + 1
    return "".join(out)


def _lookup(values: Mapping[str, Any] | None, env: Mapping[str, str] | None) -> Callable[[str], str | None]:
    upper = {str(k).upper(): str(v) for k, v in (values or {}).items()}
    env = os.environ if env is None else env

    def get(name: str) -> str | None:
        if name.upper() in upper:
            return upper[name.upper()]
        return env.get(name)

    return get


def _has_placeholder(text: str | None) -> bool:
    return bool(text) and "${" in text


# --------------------------------------------------------------------------- models


class ModelRef(BaseModel):
    """One checkpoint of a pool: exactly one of ``hf``, ``path`` or ``zoo``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = Field(None, description="unique within the pool; defaults to the id / zoo name")
    hf: str | None = Field(None, description="Hugging Face id org/name (read from the local HF cache)")
    path: str | None = Field(None, description="local folder; may contain ${NAME} or ${NAME:-default}")
    zoo: str | None = Field(None, description="name in the embedded zoo (mergebench.zoo.materialized_path)")
    revision: str | None = None
    tags: dict[str, TagValue] = Field(default_factory=dict)
    seed_text: str | None = Field(None, description="the id exactly as printed in the seed, when that differs")
    inferred: bool = Field(False, description="the seed does not print this id; see note")
    note: str | None = None

    @model_validator(mode="after")
    def _one_source(self):
        given = [k for k in ("hf", "path", "zoo") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of hf, path, zoo (got {', '.join(given) or 'none'})")
        if self.hf is not None and not _has_placeholder(self.hf) and not is_plausible_hf_id(self.hf):
            raise ValueError(f"hf id {self.hf!r} is not of the form org/name")
        if self.revision is not None and self.hf is None:
            raise ValueError("revision applies to hf models only")
        if self.name is None:
            if self.path is not None and _has_placeholder(self.path):
                raise ValueError("a model whose path has placeholders needs a name")
            default = self.hf or self.zoo or Path(self.path).name
            object.__setattr__(self, "name", default)
        return self

    @property
    def source(self) -> Literal["hf", "local", "zoo"]:
        return "hf" if self.hf is not None else "zoo" if self.zoo is not None else "local"

    @property
    def spec(self) -> str:
        """What the engine resolves: ``org/name[@revision]``, a path, or ``zoo:name``."""
        if self.hf is not None:
            return f"{self.hf}@{self.revision}" if self.revision else self.hf
        if self.zoo is not None:
            return f"zoo:{self.zoo}"
        return str(self.path)

    def placeholders(self) -> list[str]:
        names: list[str] = []
        for text in (self.hf, self.path):
            if _has_placeholder(text):
                _substitute(text, lambda _n: None, names)
        return names

    def resolved(self, lookup: Callable[[str], str | None], missing: list[str]) -> ModelRef:
        update = {}
        for key in ("hf", "path"):
            text = getattr(self, key)
            if _has_placeholder(text):
                update[key] = _substitute(text, lookup, missing)
        return self.model_copy(update=update) if update else self

    def locate(self) -> Path | None:
        """The local folder of this model, or None if it is not available on this machine."""
        if self.placeholders():
            return None
        if self.source == "zoo":
            return zoo_path(self.zoo)
        from mergebench.engine.checkpoint import CheckpointError, resolve_model_path

        try:  # a path, or (for ``path:``) also a hub id that is in the local cache
            return resolve_model_path(self.spec)
        except CheckpointError:
            return None

    def describe(self, locate: bool = True) -> dict:
        return {
            "name": self.name,
            "source": self.source,
            "id": self.hf if self.source == "hf" else self.zoo if self.source == "zoo" else None,
            "path": self.path,
            "revision": self.revision,
            "tags": dict(self.tags),
            "inferred": self.inferred,
            "local_path": (str(p) if (p := self.locate()) is not None else None) if locate else None,
        }


def zoo_path(name: str) -> Path | None:
    """Folder of a materialized zoo model (``base`` or an expert name), or None.

    Asks the zoo's hook ``materialized_path(name)`` -- ``mergebench.zoo.materialized_path``, else
    ``mergebench.zoo.pool.materialized_path`` -- imported lazily, so pools work (and say "not
    materialized") while the zoo is absent or incomplete. Until a hook exists, the base is found
    where ``mergebench.zoo.base.materialize_base`` writes it.

    Where the hook's module also has ``check_materialized(name, folder)``, a folder counts only when
    that says it is a complete materialization, and a folder whose weights changed since then
    raises its error (one line naming the model and the command that rebuilds it).
    """
    hook = check = None
    for module in ("mergebench.zoo", "mergebench.zoo.pool"):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        hook, check = getattr(mod, "materialized_path", None), getattr(mod, "check_materialized", None)
        if hook is not None:
            break
    if hook is not None:
        try:
            p = hook(name)
        except (LookupError, OSError, ValueError, RuntimeError):
            return None
        if p is None or not Path(p).exists():
            return None
        return Path(p) if check is None or check(name, Path(p)) else None
    try:
        base = importlib.import_module("mergebench.zoo.base")
    except ImportError:
        return None
    if name in ("base", getattr(base, "BASE_NAME", None)):
        folder = base.default_cache_dir() / base.BASE_NAME
        if base.verify_base(folder, check_files=False):
            return folder
    return None


def tag_values(value: Any) -> list[str]:
    """A tag's values as strings: list items, or a comma-separated string split (``"a,b"``)."""
    if value is None:
        return []
    if isinstance(value, (list, tuple, set)):
        return [str(v).strip() for v in value]
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(value)]


# --------------------------------------------------------------------------- pools


class Pool(BaseModel):
    """A base model and the experts that may be merged into it."""

    model_config = ConfigDict(extra="forbid")

    name: str
    title: str = ""
    paper: str | None = Field(None, description="key of the pool's paper in suites/papers/papers.yaml")
    reference: str = Field("", description="where in the paper the pool is listed")
    base: ModelRef
    experts: list[ModelRef] = Field(default_factory=list)
    experts_manifest: str | None = Field(
        None, description="JSON manifest (relative to the suites root) listing zoo experts"
    )
    placeholders: dict[str, str] = Field(default_factory=dict, description="NAME -> what to supply")

    _legacy_seed = model_validator(mode="before")(papers.legacy_seed)
    _paper_key = field_validator("paper")(papers.paper_key)

    @property
    def seed(self) -> str | None:
        """Maintainer-only: the seed number of :attr:`paper` (old files said ``seed: "001"``)."""
        return papers.seed_of(self.paper)

    vocab_policy: Literal["error", "truncate", "base"] = "error"
    notes: str = ""

    _file: Path | None = PrivateAttr(None)

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", v):
            raise ValueError("pool names use lowercase letters, digits and . _ -")
        return v

    @model_validator(mode="after")
    def _check(self):
        if not self.experts and not self.experts_manifest:
            raise ValueError("a pool needs experts (or an experts_manifest)")
        names = [e.name for e in self.experts]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"expert names must be unique; repeated: {', '.join(dup)}")
        used = set(self.base.placeholders()).union(*(e.placeholders() for e in self.experts))
        undocumented = sorted(used - set(self.placeholders))
        if undocumented:
            raise ValueError(f"placeholders used but not documented under 'placeholders': {', '.join(undocumented)}")
        return self

    @property
    def file(self) -> Path | None:
        return self._file

    def models(self) -> list[ModelRef]:
        return [self.base, *self.experts]

    def expert_names(self) -> list[str]:
        return [e.name for e in self.experts]

    def expert(self, name: str) -> ModelRef:
        for e in self.experts:
            if e.name == name:
                return e
        raise PoolError(f"pool {self.name!r} has no expert {name!r}; it has: {', '.join(self.expert_names())}")

    def select(self, where: Mapping[str, Any] | None = None, names: Iterable[str] | None = None) -> list[str]:
        """Expert names (pool order) whose tags match ``where`` (AND over keys; a list value
        means any of; a list-valued tag matches if it contains the value) and, if given, in ``names``."""
        wanted = None if names is None else set(names)
        if wanted is not None:
            for n in wanted:
                self.expert(n)
        out = []
        for e in self.experts:
            if wanted is not None and e.name not in wanted:
                continue
            if where and not all(_tag_matches(e.tags.get(k), v) for k, v in where.items()):
                continue
            out.append(e.name)
        return out

    def unresolved(self, values: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> list[str]:
        """Placeholders that have no value (from ``values``, then the environment)."""
        missing: list[str] = []
        lookup = _lookup(values, env)
        for m in self.models():
            m.resolved(lookup, missing)
        return missing

    def resolved(self, values: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> Pool:
        """A copy with every placeholder filled in; :class:`PlaceholderError` lists the missing ones."""
        missing: list[str] = []
        lookup = _lookup(values, env)
        base = self.base.resolved(lookup, missing)
        experts = [e.resolved(lookup, missing) for e in self.experts]
        if missing:
            named = ", ".join(f"{n} ({self.placeholders[n]})" if self.placeholders.get(n) else n for n in missing)
            example = " ".join(f"--set {n}=..." for n in missing)
            raise PlaceholderError(
                f"pool {self.name!r} needs values for {named}: pass them as `{example}` or set the environment variable(s)",
                missing,
            )
        out = self.model_copy(update={"base": base, "experts": experts})
        out._file = self._file
        return out

    def describe(self, locate: bool = True) -> dict:
        """JSON-ready summary; ``local_path`` is filled for models present on this machine."""
        unresolved = self.unresolved()
        return {
            "name": self.name,
            "title": self.title,
            "paper": self.paper,
            "reference": self.reference,
            "file": str(self._file) if self._file else None,
            "base": self.base.describe(locate),
            "experts": [e.describe(locate) for e in self.experts],
            "n_experts": len(self.experts),
            "placeholders": dict(self.placeholders),
            "unresolved": unresolved,
            "vocab_policy": self.vocab_policy,
            "notes": self.notes.strip(),
        }


def _tag_matches(have: Any, want: Any) -> bool:
    wants = tag_values(want)
    return any(h in wants for h in tag_values(have))


# --------------------------------------------------------------------------- loading


def _manifest_experts(pool_name: str, manifest: Path) -> list[dict]:
    hint = "build/materialize the embedded pool first: `mergebench zoo materialize`"
    if not manifest.is_file():
        raise PoolError(f"pool {pool_name!r}: {hint} (its expert manifest {manifest} does not exist yet)")
    try:
        data = json.loads(manifest.read_text())
    except ValueError as exc:
        raise PoolError(f"pool {pool_name!r}: {manifest} is not valid JSON ({exc}); {hint}") from None
    entries = data.get("experts") if isinstance(data, dict) else None
    if isinstance(entries, dict):
        entries = [{"name": k, **(v if isinstance(v, dict) else {})} for k, v in entries.items()]
    if not isinstance(entries, list) or not entries:
        raise PoolError(
            f"pool {pool_name!r}: {manifest} lists no experts (expected a non-empty 'experts' list); {hint}"
        )
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not entry.get("name"):
            raise PoolError(f"pool {pool_name!r}: {manifest}: experts[{i}] has no name")
        raw_tags = entry.get("tags") or {}
        tags: dict[str, Any] = dict(raw_tags) if isinstance(raw_tags, dict) else {"labels": [str(t) for t in raw_tags]}
        for key in ("domain", "task", "tasks"):
            if key in entry and key not in tags:
                tags[key] = entry[key]
        clean = {}
        for k, v in tags.items():
            if isinstance(v, (list, tuple)):
                clean[str(k)] = [str(x) for x in v]
            elif isinstance(v, (str, int, float, bool)):
                clean[str(k)] = v
            else:
                clean[str(k)] = json.dumps(v, sort_keys=True)
        out.append({"name": str(entry["name"]), "zoo": str(entry.get("zoo", entry["name"])), "tags": clean})
    return out


def validate_named_file(model: type[BaseModel], path: Path, data: dict, kind: str):
    """Validate a config file's content; its ``name`` must match the file's stem (errors name
    the file and field). Shared by pool and suite files."""
    try:
        obj = model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(path, exc)) from None
    if obj.name != path.stem:
        raise ConfigError(
            f"{path}: name: the {kind} is called {obj.name!r} but the file is {path.name} (they must match)"
        )
    return obj


def _load_pool_file(path: Path) -> Pool:
    data = read_yaml(path)
    pool = validate_named_file(Pool, path, data, "pool")
    if pool.experts_manifest:
        if data.get("experts"):
            raise ConfigError(f"{path}: experts: give experts or experts_manifest, not both")
        manifest = Path(pool.experts_manifest)
        if not manifest.is_absolute():
            manifest = suites_root() / manifest
        try:
            pool = Pool.model_validate({**data, "experts": _manifest_experts(pool.name, manifest)})
        except ValidationError as exc:
            raise ConfigError(format_validation_error(manifest, exc)) from None
    pool._file = path
    return pool


def pool_names() -> list[str]:
    d = pools_dir()
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def load_pool(name: str, values: Mapping[str, Any] | None = None) -> Pool:
    """Load ``suites/pools/<name>.yaml``; with ``values``, fill in its placeholders (strictly)."""
    path = pools_dir() / f"{name}.yaml"
    if not path.is_file():
        known = pool_names()
        raise PoolError(f"unknown pool {name!r}; known pools: {', '.join(known) or '(none)'} (in {pools_dir()})")
    pool = _load_pool_file(path)
    return pool.resolved(values) if values is not None else pool


def list_pools(skip_unavailable: bool = True) -> list[Pool]:
    """Every pool that loads (placeholders left as templates). A pool whose experts are not built
    yet (the embedded ``smol`` pool before ``mergebench zoo materialize``) is skipped unless
    ``skip_unavailable`` is False, in which case its error is raised; see :func:`describe_pools`."""
    out = []
    for name in pool_names():
        try:
            out.append(load_pool(name))
        except PoolError:
            if not skip_unavailable:
                raise
    return out


def describe_pools(locate: bool = True) -> list[dict]:
    """``Pool.describe()`` of every pool; a pool that cannot load gives ``{"name", "error"}``."""
    out = []
    for name in pool_names():
        try:
            out.append(load_pool(name).describe(locate))
        except MergebenchError as exc:  # a broken pool file, an unbuilt zoo, a damaged materialized model
            out.append({"name": name, "error": str(exc)})
    return out


# --------------------------------------------------------------------------- compatibility


@dataclass
class CompatibilityReport:
    """What :func:`validate_pool_compatibility` checked (headers only)."""

    pool: str
    paths: dict[str, str]
    fingerprints: dict[str, str]
    n_tensors: int
    architecture: str | None
    vocab_size: int | None
    notes: list[str] = field(default_factory=list)


def _select_models(pool: Pool, experts: Sequence[str] | None) -> list[tuple[str, ModelRef]]:
    chosen = pool.experts if experts is None else [pool.expert(n) for n in experts]
    return [("base", pool.base)] + [(f"expert {e.name}", e) for e in chosen]


def _display(m: ModelRef) -> str:
    """How a missing model is listed: its hub id (``@revision``), ``zoo:name`` or its path."""
    return m.spec


def _hint(m: ModelRef) -> str:
    if m.source == "hf":
        rev = f" --revision {m.revision}" if m.revision else ""
        return f"{m.spec} (not in the local Hugging Face cache; fetch it with `hf download {m.hf}{rev}`)"
    if m.source == "zoo":
        return f"{m.spec} (not materialized; run `mergebench zoo materialize`)"
    return f"{m.path} (no such folder, and not a model id in the local Hugging Face cache)"


def _fixes(models: Iterable[ModelRef]) -> str:
    """What to do about missing models, for the first line of the error (by kind of source)."""
    sources = {m.source for m in models}
    fixes = {
        "zoo": "build the embedded models with `mergebench zoo materialize`",
        "hf": "fetch the hub models with `hf download ID` (each listed below)",
        "local": "fix or supply the local paths listed below",
    }
    return "; ".join(text for kind, text in fixes.items() if kind in sources)


def config_problem(folder: str | os.PathLike) -> str | None:
    """Why transformers could not build a model from ``folder`` (its ``config.json``), or None."""
    cfg = Path(folder) / "config.json"
    if not cfg.is_file():
        return f"{cfg} is missing (transformers needs it to build the model)"
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError) as exc:
        return f"{cfg} is not valid JSON ({exc})"
    if not isinstance(data, dict) or not data.get("model_type"):
        return f"{cfg} has no model_type (transformers cannot tell which architecture to build)"
    return None


def find_missing(
    pool: Pool,
    experts: Sequence[str] | None = None,
    values: Mapping[str, Any] | None = None,
    resolve: Callable[[ModelRef], str | os.PathLike | None] | None = None,
) -> list[str]:
    """Ids/paths of the pool's models that are not on this machine (no download, no error)."""
    pool = pool.resolved(values)
    locate = resolve or ModelRef.locate
    return [_display(m) for _, m in _select_models(pool, experts) if locate(m) is None]


def validate_pool_compatibility(
    pool: Pool,
    resolve: Callable[[ModelRef], str | os.PathLike | None] | None = None,
    *,
    experts: Sequence[str] | None = None,
    values: Mapping[str, Any] | None = None,
    vocab_policy: Literal["error", "truncate", "base"] | None = None,
    allow_pickle: bool = False,
) -> CompatibilityReport:
    """Check, from checkpoint headers and configs only, that the pool's models can be merged.

    ``resolve`` maps a :class:`ModelRef` to its local folder (None: not available); the default
    looks in the local HF cache / filesystem / zoo and never downloads. ``experts`` restricts the
    check to some experts (the base is always included). Raises :class:`PlaceholderError`,
    :class:`MissingModelsError` (``.missing`` lists every missing model, nothing is opened) or
    :class:`PoolCompatibilityError` (every problem found, by model).
    """
    from mergebench.engine.checkpoint import CheckpointError, open_checkpoint
    from mergebench.engine.compat import CompatibilityError, plan_merge

    pool = pool.resolved(values)
    locate = resolve or ModelRef.locate
    chosen = _select_models(pool, experts)
    paths: dict[str, Path] = {}
    missing: list[tuple[str, ModelRef]] = []
    for label, m in chosen:
        try:
            p = locate(m)
        except CheckpointError:
            p = None
        if p is None:
            missing.append((label, m))
        else:
            paths[m.name] = Path(p)
    if missing:
        lines = "\n".join(f"  {label.split(' ')[0] if m.name == m.spec else label}: {_hint(m)}" for label, m in missing)
        raise MissingModelsError(
            f"pool {pool.name!r}: {len(missing)} of {len(chosen)} model(s) are not available locally "
            f"(mergebench reads the local cache only and never downloads); {_fixes(m for _, m in missing)}:\n{lines}",
            [_display(m) for _, m in missing],
        )

    ckpts = []
    problems = []
    try:
        for label, m in chosen:
            # evaluation builds every model with transformers: a config it cannot use fails here,
            # not after the first units of a run are stored
            if why := config_problem(paths[m.name]):
                problems.append(f"{label}: {why}")
            try:
                ckpts.append(open_checkpoint(paths[m.name], f"{pool.name}:{label}", allow_pickle=allow_pickle))
            except CheckpointError as exc:
                if not (why and "config.json" in str(exc)):  # an unreadable config.json is named once
                    problems.append(f"{label} ({m.spec}): {exc}")
        if problems:
            raise PoolCompatibilityError(f"pool {pool.name!r}: cannot load {'; '.join(problems)}")
        policy = vocab_policy or pool.vocab_policy
        # Each expert against the base first, so every incompatible expert is named (not only
        # the first few tensors of the first one), then all together.
        bad = []
        for (label, _), ckpt in zip(chosen[1:], ckpts[1:]):
            try:
                plan_merge(ckpts[0], [ckpt], vocab_policy=policy)
            except CompatibilityError as exc:
                bad.append(f"{label}:\n    " + str(exc).replace("\n", "\n    "))
        if bad:
            raise PoolCompatibilityError(
                f"pool {pool.name!r} is not mergeable: "
                f"{len(bad)} of {len(chosen) - 1} expert(s) do not match the base:\n  "
                + "\n  ".join(bad)
            )
        try:
            plan = plan_merge(ckpts[0], ckpts[1:], vocab_policy=policy)
        except CompatibilityError as exc:
            raise PoolCompatibilityError(f"pool {pool.name!r} is not mergeable: {exc}") from None
        cfg = ckpts[0].config or {}
        arch = (cfg.get("architectures") or [None])[0] or cfg.get("model_type")
        return CompatibilityReport(
            pool=pool.name,
            paths={m.name: str(paths[m.name]) for _, m in chosen},
            fingerprints={m.name: c.fingerprint for (_, m), c in zip(chosen, ckpts)},
            n_tensors=len(plan.tensors),
            architecture=arch,
            vocab_size=plan.vocab_size if plan.vocab_size is not None else cfg.get("vocab_size"),
            notes=list(plan.notes),
        )
    finally:
        for c in ckpts:
            c.close()
