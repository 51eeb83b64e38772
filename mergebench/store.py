"""The results store: append-only Parquet files plus a DuckDB view layer.

Layout under a results directory (default ``results/``)::

    runs/suite=<suite>/method=<method>/part-<run_id>-<unit_id>.parquet       # RESULTS_SCHEMA rows
    provenance/suite=<suite>/method=<method>/prov-<run_id>-<unit_id>.parquet # PROVENANCE_SCHEMA rows
    paper/<table>.csv                                                        # published numbers (source='paper')

One file per *unit of work* (one merged subset, or one reference model), written to a hidden
temporary name and renamed into place, so an interrupted run keeps every unit it finished, a
reader never sees half a file, and concurrent writers never share a file. Folder names are for
people and for path pruning only: every column lives inside the files (DuckDB reads them with
``hive_partitioning=false``), so a folder name can never disagree with the data.

A unit's id is a content hash (:func:`unit_id`): a resumed or repeated run computes the same id,
:func:`has_unit` says it is done, and :func:`write_unit` refuses to write it twice.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import re
import secrets
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq

from .memory import peak_rss_bytes, reset_peak_rss

SCHEMA_VERSION = "1"
DEFAULT_RESULTS_DIR = Path("results")
#: The repository's committed results (paper tables live in ``PAPER_DIR``); useful when a caller's
#: ``--results`` points elsewhere but the published numbers should still be shown.
REPO_RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"
PAPER_DIR = REPO_RESULTS_DIR / "paper"
REFERENCE_METHOD_DIR = "_reference"  # folder for base/expert rows, which belong to no method

ROLES = ("merged", "base", "expert")
SOURCES = ("run", "paper")


def _f(name: str, type_: pa.DataType, doc: str, nullable: bool = True) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"doc": doc})


RESULTS_SCHEMA = pa.schema(
    [
        _f("run_id", pa.string(), "Id of the `mergebench eval` invocation that wrote the row (see new_run_id).", False),
        _f("unit_id", pa.string(), "Content hash of the unit of work (see unit_id()); equal ids, identical work.",
           False),
        _f("source", pa.string(), "'run' for rows measured here, 'paper' for numbers transcribed from a paper.", False),
        _f("suite", pa.string(), "Suite name, e.g. 'inthewild'.", False),
        _f("suite_version", pa.string(), "Suite version string; results of different versions are not comparable."),
        _f("profile", pa.string(), "Suite profile, e.g. 'embedded' or 'paper' (sizes, doc counts)."),
        _f("pool", pa.string(), "Name of the model pool the experts come from."),
        _f("base_model", pa.string(), "Base model id (HF id or local name) the experts were fine-tuned from."),
        _f("method", pa.string(), "Merge method name (registry name); null for reference rows (role base/expert)."),
        _f("method_version", pa.string(), "MethodSpec.version of the method; null for reference rows."),
        _f("params_json", pa.string(), "Merge hyper-parameters as canonical JSON (sorted keys); '{}' if none."),
        _f("seed", pa.int64(), "Seed of the subset sampler / stochastic merge for this unit."),
        _f("subset", pa.list_(pa.string()), "Expert names merged, in merge order; [model] for a reference row."),
        _f("n", pa.int32(), "Merge size: number of experts in `subset` (0 for the base model, 1 for an expert)."),
        _f("role", pa.string(), "'merged' (a merge of `subset`), 'base' (the base model) or 'expert' (one expert).",
           False),
        _f("task", pa.string(), "lm-eval task or subtask name, e.g. 'leaderboard_bbh_navigate'.", False),
        _f("metric", pa.string(), "lm-eval metric name without filter suffix, e.g. 'acc_norm'.", False),
        _f("value", pa.float64(), "Raw metric value as lm-eval reports it (accuracies in [0, 1]).", False),
        _f("stderr", pa.float64(), "lm-eval's standard error of `value`; null when lm-eval gives none."),
        _f("n_docs", pa.int64(), "Number of evaluation documents behind `value`."),
        _f("normalized_value", pa.float64(),
           "Open LLM Leaderboard v2 normalized value in [0, 1] (metrics.normalize_leaderboard); else null."),
        _f("created_at", pa.timestamp("us", tz="UTC"), "When the row's unit was written (UTC).", False),
    ],
    metadata={"mergebench_schema_version": SCHEMA_VERSION, "table": "results"},
)

PROVENANCE_SCHEMA = pa.schema(
    [
        _f("run_id", pa.string(), "Run id (joins results.run_id).", False),
        _f("unit_id", pa.string(), "Unit id (joins results.unit_id); null for a run-level record."),
        _f("suite", pa.string(), "Suite name (also the partition folder)."),
        _f("method", pa.string(), "Method name; null for reference units."),
        _f("created_at", pa.timestamp("us", tz="UTC"), "When the record was written (UTC).", False),
        _f("mergebench_version", pa.string(), "Installed mergebench version."),
        _f("torch_version", pa.string(), "Installed torch version."),
        _f("transformers_version", pa.string(), "Installed transformers version."),
        _f("lm_eval_version", pa.string(), "Installed lm-eval version."),
        _f("python_version", pa.string(), "Python version."),
        _f("git_sha", pa.string(), "HEAD commit of the mergebench checkout, '+dirty' if modified; null outside git."),
        _f("platform", pa.string(), "platform.platform() of the machine."),
        _f("cpu_model", pa.string(), "CPU model name (from /proc/cpuinfo or platform)."),
        _f("cpu_cores", pa.int32(), "Logical CPU cores usable by the process."),
        _f("gpu_name", pa.string(), "CUDA device name used, null on CPU."),
        _f("device", pa.string(), "Device the unit ran on ('cpu', 'cuda', 'cuda:0', ...)."),
        _f("doc_index_hash", pa.string(), "Hash of the evaluation document indices used (part of unit_id)."),
        _f("merge_wall_s", pa.float64(), "Wall time of the merge, seconds (null for reference units)."),
        _f("merge_peak_rss_bytes", pa.int64(), "Peak resident memory during the merge, bytes."),
        _f("gpu_peak_mem_bytes", pa.int64(), "Peak CUDA memory allocated during merge + eval, bytes; null on CPU."),
        _f("eval_wall_s", pa.float64(), "Wall time of the lm-eval evaluation, seconds."),
        _f("task_vector_norm", pa.float64(),
           "||theta_model - theta_base||_2 over the tensors shared with the base, in the evaluated dtype "
           "(seed 001 Fig. 4); 0 for the base model, null where not measured."),
        _f("extra_json", pa.string(), "Anything else worth keeping, as JSON."),
    ],
    metadata={"mergebench_schema_version": SCHEMA_VERSION, "table": "provenance"},
)

#: Extra columns carried only by published (source='paper') rows.
PAPER_EXTRA_SCHEMA = pa.schema(
    [
        _f("table", pa.string(), "Origin table, e.g. 'seed000_table1' (seed number + table number)."),
        _f("label", pa.string(), "The row/column label as printed in the paper."),
        _f("n_combinations", pa.int64(), "Number of subsets behind an aggregate (seed 001's k in 'n = m (k)')."),
        _f("averaged_metric", pa.string(),
           "For metric 'reported_average'/'reported_std': the metric(s) averaged ('a|b')."),
        _f("average_over", pa.string(), "For reported averages: 'task' or 'base_model'."),
        _f("derived_from", pa.string(), "Table whose rows a reported average summarizes, when not its own table."),
        _f("note", pa.string(),
           "Transcription remarks; a printed value that its own rows do not reproduce says 'inconsistent'."),
    ]
)
PAPER_SCHEMA = pa.schema(list(RESULTS_SCHEMA) + list(PAPER_EXTRA_SCHEMA))

_REQUIRED_ROW_COLUMNS = ("task", "metric", "value")
_UNIT_COLUMNS = ("run_id", "unit_id", "source", "suite", "suite_version", "profile", "pool", "base_model", "method",
                 "method_version", "params_json", "seed", "subset", "n", "role", "created_at")
_HEX = re.compile(r"^[0-9a-f]{8,64}$")
_RUN_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


def schema_doc(schema: pa.Schema = RESULTS_SCHEMA) -> list[tuple[str, str, str]]:
    """(name, type, doc) for each column: the single source for docs and the leaderboard."""
    return [(f.name, str(f.type), (f.metadata or {}).get(b"doc", b"").decode()) for f in schema]


# --------------------------------------------------------------------------------------- ids


def canonical_json(obj: Any) -> str:
    """JSON that is byte-identical for equal content (sorted keys, no spaces, tuples as lists)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def unit_id(
    *,
    suite: str,
    suite_version: str | None,
    profile: str | None,
    role: str,
    subset: Sequence[str],
    method: str | None = None,
    method_version: str | None = None,
    params: Mapping[str, Any] | None = None,
    seed: int | None = None,
    doc_index_hash: str | None = None,
    pool: str | None = None,
    base_model: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Content hash (20 hex chars) of one unit of work.

    Covers method@version, the params JSON, the subset (in merge order, since some methods are
    order-sensitive), suite@version, profile, the evaluation-document index hash and the seed, plus
    role, pool and base model so that two pools' base-model references never collide. ``extra``
    (e.g. weight hashes or the lm-eval version for reference caching) is hashed too.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if isinstance(subset, str):
        raise TypeError("subset must be a sequence of expert names, not a string")
    payload = {
        "v": SCHEMA_VERSION,
        "suite": f"{suite}@{suite_version}",
        "profile": profile,
        "role": role,
        "subset": list(subset),
        "method": None if method is None else f"{method}@{method_version}",
        "params": dict(params or {}),
        "seed": seed,
        "docs": doc_index_hash,
        "pool": pool,
        "base_model": base_model,
        "extra": dict(extra or {}),
    }
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:20]


def doc_index_hash(indices: Mapping[str, Iterable[int]]) -> str:
    """Hash of the evaluation document indices per task ({task: [i, ...]}), order-insensitive per task."""
    norm = {task: sorted(int(i) for i in idx) for task, idx in indices.items()}
    return hashlib.sha256(canonical_json(norm).encode()).hexdigest()[:16]


def new_run_id() -> str:
    """Sortable, collision-resistant run id: UTC timestamp + 6 random hex digits."""
    return _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


@dataclass(frozen=True)
class Unit:
    """The constant part of a unit's rows; its :attr:`unit_id` is derived from the content."""

    suite: str
    role: str
    subset: tuple[str, ...]
    suite_version: str | None = None
    profile: str | None = None
    pool: str | None = None
    base_model: str | None = None
    method: str | None = None
    method_version: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    seed: int | None = None
    doc_index_hash: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "subset", tuple(self.subset))
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.role == "merged" and not self.method:
            raise ValueError("a merged unit needs a method")

    @property
    def n(self) -> int:
        return 0 if self.role == "base" else len(self.subset)

    @property
    def unit_id(self) -> str:
        return unit_id(suite=self.suite, suite_version=self.suite_version, profile=self.profile, role=self.role,
                       subset=self.subset, method=self.method, method_version=self.method_version, params=self.params,
                       seed=self.seed, doc_index_hash=self.doc_index_hash, pool=self.pool, base_model=self.base_model,
                       extra=self.extra)


# ------------------------------------------------------------------------------------ writing


def _partition(results_dir: Path, kind: str, suite: str, method: str | None) -> Path:
    return (Path(results_dir) / kind / f"suite={quote(suite, safe='')}"
            / f"method={quote(method or REFERENCE_METHOD_DIR, safe='')}")


def _atomic_write(table: pa.Table, final: Path, *, overwrite: bool = False) -> bool:
    """Write `table` to `final` via a hidden temp file (invisible to the ``*.parquet`` globs).

    Without `overwrite`, returns False and writes nothing if `final` already exists.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.{uuid.uuid4().hex}.tmp"
    try:
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, final)
            return True
        try:
            os.link(tmp, final)  # atomic and, unlike rename, never replaces an existing file
        except FileExistsError:
            return False
        except OSError:  # filesystems without hard links: rename is still atomic
            if final.exists():
                return False
            os.replace(tmp, final)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _unit_files(results_dir: Path, uid: str) -> list[Path]:
    return sorted((Path(results_dir) / "runs").glob(f"suite=*/method=*/part-*-{uid}.parquet"))


def completed_units(results_dir: str | os.PathLike = DEFAULT_RESULTS_DIR) -> set[str]:
    """Ids of every unit with results on disk (one directory scan; use it to plan a resumed run)."""
    root = Path(results_dir) / "runs"
    if not root.is_dir():
        return set()
    return {p.stem.rsplit("-", 1)[1] for p in root.glob("suite=*/method=*/part-*.parquet")}


def has_unit(unit: str | Unit, results_dir: str | os.PathLike = DEFAULT_RESULTS_DIR) -> bool:
    """True when the unit's rows are already stored (a resumed run skips it)."""
    uid = unit.unit_id if isinstance(unit, Unit) else unit
    return bool(_unit_files(Path(results_dir), uid))


def _rows_table(rows: Any) -> pa.Table:
    if isinstance(rows, pa.Table):
        return rows
    if isinstance(rows, Mapping):  # columns
        return pa.table(dict(rows))
    if hasattr(rows, "to_dict") and hasattr(rows, "columns"):  # pandas DataFrame
        return pa.Table.from_pandas(rows, preserve_index=False)
    return pa.Table.from_pylist(list(rows))


def _conform(table: pa.Table, schema: pa.Schema, constants: Mapping[str, Any]) -> pa.Table:
    """Fill constant columns, add missing nullable ones, check and cast to `schema`."""
    unknown = set(table.column_names) - set(schema.names)
    if unknown:
        raise ValueError(f"unknown columns {sorted(unknown)}; the {schema.metadata[b'table'].decode()} schema has "
                         f"{schema.names}")
    clash = set(table.column_names) & set(constants)
    if clash:
        raise ValueError(f"columns {sorted(clash)} are set by the unit and must not be in the rows")
    cols = []
    for f in schema:
        if f.name in constants:
            arr = pa.array([constants[f.name]] * table.num_rows, type=f.type)
        elif f.name in table.column_names:
            arr = table.column(f.name)
            try:
                arr = arr.cast(f.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise ValueError(f"column {f.name!r} cannot be read as {f.type}: {e}") from None
        elif f.nullable:
            arr = pa.nulls(table.num_rows, type=f.type)
        else:
            raise ValueError(f"required column {f.name!r} is missing")
        if not f.nullable and arr.null_count:
            raise ValueError(f"column {f.name!r} has {arr.null_count} null value(s)")
        cols.append(arr)
    return pa.Table.from_arrays(cols, schema=schema)


@dataclass(frozen=True)
class WriteResult:
    unit_id: str
    path: Path | None  # the file holding the unit's rows
    written: bool  # False: the unit was already stored and nothing was written


def write_unit(
    unit: Unit,
    rows: Any,
    *,
    run_id: str,
    results_dir: str | os.PathLike = DEFAULT_RESULTS_DIR,
    provenance: Mapping[str, Any] | None = None,
    source: str = "run",
    exclusive: bool = False,
) -> WriteResult:
    """Store one unit's rows (task, metric, value[, stderr, n_docs, normalized_value]) atomically.

    `rows` is a DataFrame, a pyarrow Table, a list of dicts or a dict of columns. The unit's
    constant columns come from `unit`. Idempotent: if the unit is already stored (by any run),
    nothing is written. Writers racing on the same unit (two runs doing the same work at once)
    converge to one file: after committing, each removes every file of the unit but the one
    with the smallest name; readers may see both copies only inside that window, and a call
    that returned ``written=True`` may have had its copy replaced by an identical one.
    The provenance record (if any) is written first, so a unit with results always has it.

    With ``exclusive`` (used by sweeps, whose units may be retried or duplicated by many workers)
    the file is named by the unit alone, ``part-unit-<unit_id>.parquet``: racing writers commit
    to the same name with a no-replace hard link, so exactly one wins and the unit is never
    stored twice, not even for an instant. The rows still carry the writer's ``run_id``.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}")
    if not _RUN_ID.match(run_id):
        raise ValueError(f"run_id {run_id!r} must match {_RUN_ID.pattern}")
    results_dir = Path(results_dir)
    uid = unit.unit_id
    existing = _unit_files(results_dir, uid)
    if existing:
        return WriteResult(uid, existing[0], False)
    table = _rows_table(rows)
    if table.num_rows == 0:
        raise ValueError(f"unit {uid} has no rows to write")
    missing = [c for c in _REQUIRED_ROW_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"rows lack required column(s) {missing}")
    now = _dt.datetime.now(_dt.UTC)
    constants = {
        "run_id": run_id, "unit_id": uid, "source": source, "suite": unit.suite,
        "suite_version": unit.suite_version, "profile": unit.profile, "pool": unit.pool,
        "base_model": unit.base_model, "method": unit.method, "method_version": unit.method_version,
        "params_json": canonical_json(dict(unit.params)), "seed": unit.seed, "subset": list(unit.subset),
        "n": unit.n, "role": unit.role, "created_at": now,
    }
    table = _conform(table, RESULTS_SCHEMA, constants)
    dup = table.group_by(["task", "metric"]).aggregate([("value", "count")])
    if dup.num_rows != table.num_rows:
        raise ValueError(f"unit {uid}: rows repeat a (task, metric) pair")
    if provenance is not None:
        write_provenance(provenance, run_id=run_id, unit=unit, results_dir=results_dir)
    part = _partition(results_dir, "runs", unit.suite, unit.method)
    final = part / (f"part-unit-{uid}.parquet" if exclusive else f"part-{run_id}-{uid}.parquet")
    if not _atomic_write(table, final):
        return WriteResult(uid, final, False)
    # Race resolution: of all committed files of a unit, the lexicographically smallest survives.
    # Every writer removes the others it sees after its own commit, and the last one to commit sees
    # them all, so the store converges to one file per unit.
    files = _unit_files(results_dir, uid)
    for extra in files[1:]:
        extra.unlink(missing_ok=True)
    if files and files[0] != final:
        return WriteResult(uid, files[0], False)
    return WriteResult(uid, final, True)


def write_provenance(
    record: Mapping[str, Any],
    *,
    run_id: str,
    unit: Unit | None = None,
    suite: str | None = None,
    results_dir: str | os.PathLike = DEFAULT_RESULTS_DIR,
) -> Path:
    """Write one provenance row (for a unit, or for the whole run when `unit` is None).

    `record` holds any PROVENANCE_SCHEMA columns (typically ``collect_environment()`` merged with
    the unit's timings from :func:`measure`); unknown keys go into ``extra_json``.
    """
    rec = dict(record)
    extra = {k: rec.pop(k) for k in list(rec) if k not in PROVENANCE_SCHEMA.names}
    if extra:
        prev = json.loads(rec.get("extra_json") or "{}")
        rec["extra_json"] = canonical_json({**prev, **extra})
    for k in ("run_id", "unit_id", "suite", "method", "created_at"):
        rec.pop(k, None)
    if unit is None and suite is None:
        raise ValueError("write_provenance needs a unit or a suite")
    if not _RUN_ID.match(run_id):
        raise ValueError(f"run_id {run_id!r} must match {_RUN_ID.pattern}")
    suite = unit.suite if unit is not None else suite
    uid = unit.unit_id if unit is not None else None
    if unit is not None and rec.get("doc_index_hash") is None:
        rec["doc_index_hash"] = unit.doc_index_hash
    constants = {"run_id": run_id, "unit_id": uid, "suite": suite, "method": unit.method if unit else None,
                 "created_at": _dt.datetime.now(_dt.UTC)}
    row = pa.Table.from_pylist([rec]) if rec else pa.table({"extra_json": pa.array([None], pa.string())})
    table = _conform(row, PROVENANCE_SCHEMA, constants)
    part = _partition(Path(results_dir), "provenance", suite, unit.method if unit else None)
    final = part / f"prov-{run_id}-{uid or 'run'}.parquet"
    _atomic_write(table, final, overwrite=True)  # the same run re-recording a unit keeps the newest
    return final


def _unit_provenance_files(unit: Unit, results_dir: str | os.PathLike) -> list[Path]:
    return sorted(_partition(Path(results_dir), "provenance", unit.suite, unit.method).glob(
        f"prov-*-{unit.unit_id}.parquet"))


def read_unit_provenance(unit: Unit, results_dir: str | os.PathLike = DEFAULT_RESULTS_DIR) -> list[dict[str, Any]]:
    """The provenance records of one stored unit (one per run that evaluated it), as dicts."""
    return [row for f in _unit_provenance_files(unit, results_dir) for row in pq.read_table(f).to_pylist()]


def update_provenance(unit: Unit, values: Mapping[str, Any],
                      results_dir: str | os.PathLike = DEFAULT_RESULTS_DIR) -> list[Path]:
    """Set PROVENANCE_SCHEMA columns of a stored unit's provenance records (each file rewritten
    atomically, brought to the current schema): for a measurement added after the unit ran,
    such as ``task_vector_norm``. Returns the files rewritten (none if the unit has no record)."""
    bad = [k for k in values if k not in PROVENANCE_SCHEMA.names or k in ("run_id", "unit_id", "suite", "method")]
    if bad:
        raise ValueError(f"cannot set provenance columns {bad}")
    files = _unit_provenance_files(unit, results_dir)
    for file in files:
        table = pq.read_table(file)
        cols = {name: table.column(name) if name in table.column_names else pa.nulls(table.num_rows, f.type)
                for name, f in zip(PROVENANCE_SCHEMA.names, PROVENANCE_SCHEMA)}
        for k, v in values.items():
            cols[k] = pa.array([v] * table.num_rows, PROVENANCE_SCHEMA.field(k).type)
        arrays = [cols[f.name].cast(f.type) for f in PROVENANCE_SCHEMA]
        _atomic_write(pa.Table.from_arrays(arrays, schema=PROVENANCE_SCHEMA), file, overwrite=True)
    return files


# ------------------------------------------------------------------------------ provenance


def _pkg_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _git_sha() -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+dirty" if dirty else "") if sha else None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def collect_environment(device: str | None = None) -> dict[str, Any]:
    """Package versions, git sha and hardware, as PROVENANCE_SCHEMA columns.

    Never imports torch itself (slow); the GPU name is read only if torch is already loaded.
    """
    gpu = None
    torch = sys.modules.get("torch")
    if torch is not None and (device or "").startswith("cuda"):
        try:
            gpu = torch.cuda.get_device_name(torch.device(device))
        except Exception:  # noqa: BLE001 - best effort
            gpu = None
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return {
        "mergebench_version": _pkg_version("mergebench"),
        "torch_version": _pkg_version("torch"),
        "transformers_version": _pkg_version("transformers"),
        "lm_eval_version": _pkg_version("lm_eval") or _pkg_version("lm-eval"),
        "python_version": platform.python_version(),
        "git_sha": _git_sha(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_cores": cores,
        "gpu_name": gpu,
        "device": device,
    }


@contextmanager
def measure(prefix: str, out: dict[str, Any], device: str | None = None):
    """Record ``<prefix>_wall_s`` and, for prefix 'merge', ``merge_peak_rss_bytes`` into `out`.

    The peak RSS is the process high-water mark, reset first through /proc/self/clear_refs
    (Linux >= 4.0) so it reflects this block; where the reset is not allowed it is the peak since
    process start (an upper bound). On CUDA, ``gpu_peak_mem_bytes`` keeps the max over blocks.
    """
    torch = sys.modules.get("torch")
    cuda = torch is not None and (device or "").startswith("cuda") and torch.cuda.is_available()
    reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        out[f"{prefix}_wall_s"] = time.perf_counter() - t0
        if prefix == "merge":
            out["merge_peak_rss_bytes"] = peak_rss_bytes()
        if cuda:
            peak = int(torch.cuda.max_memory_allocated(device))
            out["gpu_peak_mem_bytes"] = max(peak, out.get("gpu_peak_mem_bytes") or 0)


# -------------------------------------------------------------------------------- reading

_PAPER_DTYPES = {"n": "Int64", "n_combinations": "Int64", "value": "float64"}


def paper_rows(paper_dir: str | os.PathLike | None = None) -> "pd.DataFrame":  # noqa: F821
    """Every transcribed table in `paper_dir` (default: the repository's ``results/paper``) as one
    DataFrame with PAPER_SCHEMA columns, source='paper'. Empty (with the columns) if none."""
    import pandas as pd

    paper_dir = PAPER_DIR if paper_dir is None else Path(paper_dir)
    files = sorted(Path(paper_dir).glob("*.csv")) if Path(paper_dir).is_dir() else []
    frames = [pd.read_csv(f, dtype=str, keep_default_na=False) for f in files]
    return _paper_table(pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()).to_pandas(
        types_mapper=_pd_types)


def _pd_types(t: pa.DataType):
    import pandas as pd

    if pa.types.is_integer(t):
        return pd.Int64Dtype()
    return None


def _paper_table(df) -> pa.Table:
    """CSV strings -> PAPER_SCHEMA table (empty strings are nulls)."""
    n = len(df)
    cols = []
    for f in PAPER_SCHEMA:
        if f.name in getattr(df, "columns", []):
            raw = [None if (v is None or v == "") else v for v in df[f.name].tolist()]
            if f.name == "created_at":
                arr = pa.array([_dt.datetime.fromisoformat(v) if v else None for v in raw], f.type)
            elif f.name == "subset":
                arr = pa.array([v.split("|") if v else None for v in raw], f.type)
            else:
                arr = pa.array(raw, pa.string()).cast(f.type)
        elif f.name == "source":
            arr = pa.array(["paper"] * n, f.type)
        else:
            arr = pa.nulls(n, f.type)
        cols.append(arr)
    return pa.Table.from_arrays(cols, schema=PAPER_SCHEMA)


def _parquet_view(con, name: str, root: Path, pattern: str, schema: pa.Schema) -> None:
    files = list(root.glob(pattern)) if root.is_dir() else []
    if files:
        glob = str(root / pattern).replace("'", "''")
        # the union with an empty typed table adds the schema's columns that older files lack, as NULL
        con.register(f"_{name}_schema", schema.empty_table())
        con.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM read_parquet('{glob}', "
                    f"union_by_name=true, hive_partitioning=false) UNION ALL BY NAME SELECT * FROM _{name}_schema")
    else:  # DuckDB errors on a glob without matches; an empty typed table keeps queries valid
        con.register(f"_{name}_empty", schema.empty_table())
        con.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM _{name}_empty")


def connect(results_dir: str | os.PathLike = DEFAULT_RESULTS_DIR, paper_dir: str | os.PathLike | None = None,
            *, include_paper: bool = True):
    """An in-memory DuckDB connection with views over the store.

    Views: ``results`` (all measured rows), ``provenance``, ``paper`` (published rows; from
    `paper_dir`, default ``<results_dir>/paper``) and ``all_results`` (results UNION ALL BY NAME
    paper: run rows have null paper-only columns). File lists are resolved per query, but a
    directory that was empty at connect time stays an empty view: reconnect after the first write.
    """
    import duckdb

    results_dir = Path(results_dir)
    con = duckdb.connect(":memory:")
    con.execute("SET TimeZone = 'UTC'")  # timestamps come back in UTC whatever the machine's zone
    _parquet_view(con, "results", results_dir / "runs", "suite=*/method=*/*.parquet", RESULTS_SCHEMA)
    _parquet_view(con, "provenance", results_dir / "provenance", "suite=*/method=*/*.parquet", PROVENANCE_SCHEMA)
    from .diagnostics.store import DIAGNOSTICS_SCHEMA  # here: diagnostics.store imports this module

    _parquet_view(con, "diagnostics", results_dir / "diagnostics", "pool=*/kind=*/*.parquet", DIAGNOSTICS_SCHEMA)
    pdir = results_dir / "paper" if paper_dir is None else Path(paper_dir)
    if include_paper and pdir.is_dir():
        import pandas as pd

        files = sorted(pdir.glob("*.csv"))
        frames = [pd.read_csv(f, dtype=str, keep_default_na=False) for f in files]
        paper = _paper_table(pd.concat(frames, ignore_index=True) if frames else pd.DataFrame())
    else:
        paper = PAPER_SCHEMA.empty_table()
    con.register("_paper_table", paper)
    con.execute("CREATE OR REPLACE VIEW paper AS SELECT * FROM _paper_table")
    con.execute("CREATE OR REPLACE VIEW all_results AS SELECT * FROM results UNION ALL BY NAME SELECT * FROM paper")
    return con


def sql(query: str, results_dir: str | os.PathLike = DEFAULT_RESULTS_DIR, paper_dir: str | os.PathLike | None = None,
        params: Sequence[Any] | None = None) -> "pd.DataFrame":  # noqa: F821
    """Run `query` against the views of :func:`connect` and return a pandas DataFrame."""
    con = connect(results_dir, paper_dir)
    try:
        with warnings.catch_warnings():  # duckdb's own DataFrame conversion uses deprecated pandas API
            warnings.filterwarnings("ignore", message="The inplace keyword", category=Warning)
            return con.execute(query, params or []).df()
    finally:
        con.close()


def read_results(results_dir: str | os.PathLike = DEFAULT_RESULTS_DIR, where: str | None = None,
                 params: Sequence[Any] | None = None) -> "pd.DataFrame":  # noqa: F821
    """Rows of the ``results`` view (optionally filtered by a SQL `where` clause) as a DataFrame."""
    q = "SELECT * FROM results" + (f" WHERE {where}" if where else "")
    return sql(q, results_dir, params=params)
