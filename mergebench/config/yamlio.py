"""Reading the YAML files under ``suites/``: every problem is one :class:`ConfigError` line naming
the file (and, for a schema violation, each field), shared by pools, suites and the paper registry."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from mergebench.errors import MergebenchError

__all__ = ["ConfigError", "format_validation_error", "read_yaml", "validation_summary"]


class ConfigError(MergebenchError, ValueError):
    """A pool or suite file is missing or invalid; the message names the file and field."""



def validation_summary(exc: ValidationError) -> str:
    """A pydantic error as one line: ``field.path: message; other.field: message``."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ())) or "(top level)"
        parts.append(f"{loc}: {err.get('msg')}")
    return "; ".join(parts)


def format_validation_error(path: Path | str, exc: ValidationError) -> str:
    n = len(exc.errors())
    return f"{path}: " + (f"invalid ({n} problems): " if n > 1 else "") + validation_summary(exc)


#: libyaml's parser where PyYAML was built with it (the same safe schema, ~10x faster: suite files
#: are read on every leaderboard start and every command)
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.load(path.read_text(), Loader=_LOADER)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        why = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise ConfigError(f"{path}: not valid YAML{where}: {why}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data
