"""The ``diagnostics`` table of the results store: long-format rows, one Parquet file per unit.

Layout under a results directory (beside ``runs/`` and ``provenance/``, see :mod:`mergebench.results.store`)::

    diagnostics/pool=<pool>/kind=<kind>/diag-<run_id>-<unit_id>.parquet

A unit is one diagnostic computation (one kind, one pool, one set of models, one method setting,
one set of diagnostic settings); its id is a content hash (:class:`DiagUnit`), so a repeated run
finds it done and writes nothing. Files are written with :func:`mergebench.results.store.atomic_write_table`
(hidden temp file, then link), exactly like result units: a reader never sees half a file, and a
damaged file is skipped by every reader with a warning naming it (and moved to ``quarantine/``
when its unit is stored again). Folder names are for people only; every column lives in the files.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pyarrow as pa

from mergebench.results.store import (DEFAULT_RESULTS_DIR, DIAGNOSTICS_SCHEMA, RUN_ID_PATTERN, SCHEMA_VERSION, WriteResult,
                     atomic_write_table, canonical_json, conform_table, glob_health, quarantine_files, read_sound,
                     rows_table, scan_files, warn_store)

__all__ = ["DIAGNOSTICS_SCHEMA", "KINDS", "DiagUnit", "has_diagnostics", "read_diagnostics", "write_diagnostics"]

KINDS = ("weights", "representations", "activations", "stats")


_UNIT_COLS = ("run_id", "unit_id", "created_at", "pool", "base_model", "method", "method_version", "params_json",
              "subset", "seed", "settings_json")
_KEY_COLS = ("kind", "metric", "model", "model_b", "layer", "scope", "task")


@dataclass(frozen=True)
class DiagUnit:
    """The constant part of one diagnostic unit; ``fingerprints`` (checkpoint content hashes) and
    ``settings`` enter the id, so changed weights or settings make a new unit."""

    kind: str
    pool: str
    subset: tuple[str, ...]
    base_model: str | None = None
    method: str | None = None
    method_version: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    seed: int | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    fingerprints: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.subset, str):
            raise TypeError("subset must be a sequence of names, not a string")
        object.__setattr__(self, "subset", tuple(self.subset))
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def unit_id(self) -> str:
        payload = {
            "v": SCHEMA_VERSION, "table": "diagnostics", "kind": self.kind, "pool": self.pool,
            "subset": list(self.subset), "base_model": self.base_model,
            "method": None if self.method is None else f"{self.method}@{self.method_version}",
            "params": dict(self.params), "seed": self.seed, "settings": dict(self.settings),
            "fingerprints": dict(self.fingerprints),
        }
        return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:20]


def _root(results_dir: Path) -> Path:
    return Path(results_dir) / "diagnostics"


def _files(results_dir: Path, uid: str) -> list[Path]:
    """The unit's sound files (damaged ones are skipped with a warning)."""
    return scan_files(Path(results_dir), "diagnostics", f"pool=*/kind=*/diag-*-{uid}.parquet")


def has_diagnostics(unit: DiagUnit | str, results_dir: str | os.PathLike = DEFAULT_RESULTS_DIR) -> bool:
    uid = unit.unit_id if isinstance(unit, DiagUnit) else unit
    return bool(_files(Path(results_dir), uid))


def write_diagnostics(
    unit: DiagUnit,
    rows: Any,
    *,
    run_id: str,
    results_dir: str | os.PathLike = DEFAULT_RESULTS_DIR,
) -> WriteResult:
    """Store one unit's rows (kind, metric, value[, model, model_b, layer, scope, task, std, point, n])
    atomically; idempotent like :func:`mergebench.results.store.write_unit` (same race resolution)."""
    if not RUN_ID_PATTERN.match(run_id):
        raise ValueError(f"run_id {run_id!r} must match {RUN_ID_PATTERN.pattern}")
    results_dir = Path(results_dir)
    uid = unit.unit_id
    existing, damaged = glob_health(_root(results_dir), f"pool=*/kind=*/diag-*-{uid}.parquet")
    if existing:
        return WriteResult(uid, existing[0], False)
    if isinstance(rows, (list, tuple)) and rows and isinstance(rows[0], Mapping):
        # pyarrow's from_pylist keeps only the first row's keys: give every row every column
        cols = list(dict.fromkeys(k for r in rows for k in r))
        rows = {c: [r.get(c) for r in rows] for c in cols}
    table = rows_table(rows)
    if table.num_rows == 0:
        raise ValueError(f"diagnostic unit {uid} has no rows to write")
    missing = [c for c in ("kind", "metric") if c not in table.column_names]
    if missing:
        raise ValueError(f"rows lack required column(s) {missing}")
    kinds = set(table.column("kind").to_pylist())
    if kinds != {unit.kind}:
        raise ValueError(f"unit kind is {unit.kind!r} but rows have kind(s) {sorted(map(str, kinds))}")
    constants = {
        "run_id": run_id, "unit_id": uid, "created_at": _dt.datetime.now(_dt.UTC), "pool": unit.pool,
        "base_model": unit.base_model, "method": unit.method, "method_version": unit.method_version,
        "params_json": canonical_json(dict(unit.params)), "subset": list(unit.subset), "seed": unit.seed,
        "settings_json": canonical_json(dict(unit.settings)),
    }
    table = conform_table(table, DIAGNOSTICS_SCHEMA, constants)
    keys = table.select(list(_KEY_COLS)).to_pylist()
    if len({tuple(k.values()) for k in keys}) != len(keys):
        raise ValueError(f"diagnostic unit {uid}: rows repeat a {_KEY_COLS} key")
    part = _root(results_dir) / f"pool={quote(unit.pool, safe='')}" / f"kind={unit.kind}"
    final = part / f"diag-{run_id}-{uid}.parquet"
    for moved in quarantine_files(results_dir, damaged):
        warn_store(f"moved the damaged diagnostics file of unit {uid} to {moved}; storing the unit again")
    if not atomic_write_table(table, final):
        return WriteResult(uid, final, False)
    files = _files(results_dir, uid)  # same convergence rule as store.write_unit
    for extra in files[1:]:
        extra.unlink(missing_ok=True)
    if files and files[0] != final:
        return WriteResult(uid, files[0], False)
    return WriteResult(uid, final, True)


def read_diagnostics(results_dir: str | os.PathLike = DEFAULT_RESULTS_DIR, *, kind: str | None = None,
                     pool: str | None = None):
    """Every stored diagnostic row as a pandas DataFrame (DIAGNOSTICS_SCHEMA columns; empty if
    none); a damaged file is skipped with a warning naming it."""
    pat = f"pool={quote(pool, safe='') if pool else '*'}/kind={kind or '*'}/diag-*.parquet"
    tables = [t for _, t in read_sound(scan_files(Path(results_dir), "diagnostics", pat), Path(results_dir),
                                        schema=DIAGNOSTICS_SCHEMA)]
    if not tables:
        return DIAGNOSTICS_SCHEMA.empty_table().to_pandas()
    return pa.concat_tables(tables).to_pandas()


def unit_rows_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Row count per metric (for log lines)."""
    out: dict[str, int] = {}
    for r in rows:
        out[r["metric"]] = out.get(r["metric"], 0) + 1
    return out
