"""The results store: append-only Parquet files plus a DuckDB view layer.

Layout under a results directory (default ``results/``)::

    runs/suite=<suite>/method=<method>/part-<run_id>-<unit_id>.parquet       # RESULTS_SCHEMA rows
    provenance/suite=<suite>/method=<method>/prov-<run_id>-<unit_id>.parquet # PROVENANCE_SCHEMA rows
    samples/suite=<suite>/method=<method>/samples-<run_id>-<unit_id>.parquet # SAMPLES_SCHEMA: per-document outcomes
    paper/<table>.csv                                                        # published numbers (source='paper')

One file per *unit of work* (one merged subset, or one reference model), written to a hidden
temporary name and renamed into place, so an interrupted run keeps every unit it finished, a
reader never sees half a file, and concurrent writers never share a file. Folder names are for
people and for path pruning only: every column lives inside the files (DuckDB reads them with
``hive_partitioning=false``), so a folder name can never disagree with the data.

A unit's id is a content hash (:func:`unit_id`): a resumed or repeated run computes the same id,
:func:`has_unit` says it is done, and :func:`write_unit` refuses to write it twice.

Robustness (docs/results-store.md, "Damage, concurrency and repair"): every reader skips a damaged file
with a :class:`StoreWarning` naming it (a cheap footer check, cached per process); a unit's rows
are committed before its provenance, and provenance without rows is never shown;
:func:`claim_unit` keeps concurrent runs from computing one unit twice; :func:`check_store` finds
what a crash left behind and :func:`fix_store` moves it to ``quarantine/``; :func:`sql` runs on a
connection that can read the store's files and write none.
"""

from __future__ import annotations

import datetime as _dt
import errno
import glob as _glob
import hashlib
import json
import os
import platform
import re
import secrets
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq

from mergebench.errors import MergebenchError
from mergebench.memory import peak_rss_bytes, reset_peak_rss
from mergebench.paths import CHECKOUT, file_above

SCHEMA_VERSION = "1"
DEFAULT_RESULTS_DIR = Path("results")
#: The repository's committed results (paper tables live in ``PAPER_DIR``); useful when a caller's
#: ``--results`` points elsewhere but the published numbers should still be shown.
REPO_RESULTS_DIR = CHECKOUT / "results"
PAPER_DIR = REPO_RESULTS_DIR / "paper"
REFERENCE_METHOD_DIR = "_reference"  # folder for base/expert rows, which belong to no method

ROLES = ("merged", "base", "expert")
SOURCES = ("run", "paper")
QUARANTINE_DIR = "quarantine"  # `mergebench store check --fix` moves files here, never deletes them
CLAIMS_DIR = ".claims"  # one lock file per unit being computed (claim_unit)
#: A hidden temp file untouched this long (seconds) belongs to no live write: a killed writer's leftover.
STALE_TEMP_S = 600
_TABLE_FILES = {  # table -> (folder under the results dir, glob of its files)
    "results": ("runs", "suite=*/method=*/*.parquet"),
    "provenance": ("provenance", "suite=*/method=*/*.parquet"),
    "samples": ("samples", "suite=*/method=*/*.parquet"),
    "diagnostics": ("diagnostics", "pool=*/kind=*/*.parquet"),
    "fidelity": ("fidelity", "suite=*/*.parquet"),
}


# ---------------------------------------------------------------------------------- errors


class StoreError(MergebenchError):
    """The results store cannot do what was asked; the message (one line) names the file or folder."""


class ResultsDirError(StoreError, ValueError):
    """``--results`` is not a usable results folder (a file, under a file, or not writable)."""


class StoreWriteError(StoreError, OSError):
    """Writing a store file failed (disk full, permissions); no temp file is left and nothing half-written."""


class QueryRefusedError(StoreError, ValueError):
    """A ``mergebench sql`` statement that could change files (COPY, EXPORT, ATTACH, CREATE, ...)."""


class StoreWarning(UserWarning):
    """A damaged store file was skipped, or a safeguard is unavailable; the message names the file."""


def warn_store(message: str) -> None:
    # one line (Python's default format adds the source line of a plain warnings.warn)
    warnings.warn_explicit(message, StoreWarning, filename="mergebench store", lineno=0, module="mergebench.results.store")


@contextmanager
def warnings_to(emit):
    """Route the :class:`StoreWarning` s raised inside the block to ``emit(message)`` (e.g. a rich
    console: one ``warning: ...`` line each); other warnings are re-issued unchanged."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", StoreWarning)
        try:
            yield
        finally:
            others = [w for w in seen if not issubclass(w.category, StoreWarning)]
            for w in seen:
                if issubclass(w.category, StoreWarning):
                    emit(str(w.message))
    for w in others:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def check_results_dir(path: str | os.PathLike, *, writable: bool = True) -> Path:
    """``path`` if it can be a results folder (it need not exist yet), else :class:`ResultsDirError`.

    Call it before any work starts: a ``--results`` that is a file, lies under a file or (with
    ``writable``) cannot be written is reported at once, not after the first unit is computed.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ResultsDirError(f"--results {p} is a file, not a results folder")
    if (above := file_above(p)) is not None:
        raise ResultsDirError(f"--results {p} lies under {above}, which is a file, not a folder")
    anc = p.absolute()  # the folder that exists, where the store's folders will be created
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if writable and not os.access(anc, os.W_OK | os.X_OK):
        raise ResultsDirError(f"--results {p}: {anc} is not writable")
    return p


def _write_error(target: Path, exc: OSError) -> StoreWriteError:
    code = getattr(exc, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(exc):
        msg = (f"disk full while writing {target}: nothing of it was stored and the store is unchanged "
               "(free some space, then rerun: finished units are kept)")
    else:
        msg = f"cannot write {target}: {exc.strerror or exc}"
    err = StoreWriteError(msg)
    err.errno = code
    return err


# ----------------------------------------------------------------------------- file health

_HEALTH: dict[str, tuple[int, int, str | None]] = {}  # path -> (size, mtime_ns, problem)
_WARNED: set[tuple[str, int, int]] = set()


def file_problem(path: str | os.PathLike) -> str | None:
    """Why a store Parquet file cannot be read (``"is empty (0 bytes)"``, ``"is truncated ..."``,
    ``"is not a Parquet file ..."``), or None when its header and footer are sound.

    Cheap enough for every file of every connect: one ``stat`` and 12 bytes read, cached by
    (path, size, mtime) for the process. Raises FileNotFoundError if the file is gone.
    """
    key = os.fspath(path)
    st = os.stat(key)
    hit = _HEALTH.get(key)
    if hit is not None and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
        return hit[2]
    problem = _header_problem(key, st.st_size)
    _HEALTH[key] = (st.st_size, st.st_mtime_ns, problem)
    return problem


def _header_problem(path: str, size: int) -> str | None:
    if size == 0:
        return "is empty (0 bytes)"
    if size < 12:
        return f"is truncated ({size} bytes, too small to be a Parquet file)"
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
            fh.seek(-8, os.SEEK_END)
            tail = fh.read(8)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if head != b"PAR1":
        return "is not a Parquet file (no Parquet header)"
    if tail[4:] != b"PAR1":
        return f"is truncated ({size} bytes, no Parquet footer)"
    if int.from_bytes(tail[:4], "little") + 12 > size:
        return "is damaged (its Parquet footer is longer than the file)"
    return None


def _deep_problem(path: Path, schema: pa.Schema) -> str | None:
    """:func:`file_problem`, then the footer parsed and the table's required columns present."""
    problem = file_problem(path)
    if problem is None:
        try:
            names = set(pq.read_schema(path).names)
        except Exception as exc:  # noqa: BLE001 - any reader failure means damaged
            return f"is damaged ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        lacking = [f.name for f in schema if not f.nullable and f.name not in names]
        if lacking:
            problem = f"is not a {schema.metadata[b'table'].decode()} file (lacks {', '.join(lacking)})"
    return problem


def glob_health(root: Path, pattern: str, *, as_str: bool = False) -> tuple[list, list[tuple[Path, str]]]:
    """(sound files, [(damaged file, problem)]) matching ``pattern`` under ``root``, sorted; the
    sound ones as strings with ``as_str`` (this runs over every file of the store: Paths cost)."""
    good: list = []
    bad: list[tuple[Path, str]] = []
    for f in sorted(_glob.glob(os.path.join(_glob.escape(os.fspath(root)), pattern))):
        try:
            problem = file_problem(f)
        except FileNotFoundError:  # removed meanwhile (a race loser, or quarantined)
            continue
        if problem is None:
            good.append(f)
        else:
            bad.append((Path(f), problem))
    return (good if as_str else [Path(f) for f in good]), bad


def _warn_damaged(bad: Iterable[tuple[Path, str]], results_dir: Path | None = None) -> None:
    for f, problem in bad:
        try:
            st = f.stat()
        except OSError:
            continue
        key = (str(f), st.st_size, st.st_mtime_ns)
        if key in _WARNED:
            continue
        _WARNED.add(key)
        where = f" --results {results_dir}" if results_dir is not None and Path(results_dir) != DEFAULT_RESULTS_DIR else ""
        warn_store(f"{f} {problem}: skipped (run `mergebench store check{where} --fix` to move it aside)")


def scan_files(results_dir: Path, folder: str, pattern: str) -> list[Path]:
    """The sound files matching ``pattern`` under ``results_dir/folder``; damaged ones are skipped
    with a warning each."""
    good, bad = glob_health(Path(results_dir) / folder, pattern)
    _warn_damaged(bad, results_dir)
    return good


def read_sound(files: Iterable[Path], results_dir: Path | None = None, **kw) -> list[tuple[Path, pa.Table]]:
    """(file, table) for each of ``files`` that pyarrow reads; the others are skipped with a warning."""
    out = []
    for f in files:
        try:
            out.append((f, pq.read_table(f, **kw)))
        except FileNotFoundError:
            continue
        except (pa.ArrowException, OSError) as exc:
            _warn_damaged([(f, f"is damaged ({(str(exc).splitlines() or [type(exc).__name__])[0]})")], results_dir)
    return out


def quarantine_files(results_dir: Path, items: Sequence[tuple[Path, str]], stamp: str | None = None) -> list[Path]:
    """Move ``items`` ([(file, why)]) to ``quarantine/<stamp>/<path under results_dir>`` (never
    deleting anything) and append each move to that folder's ``moved.tsv``; the new paths."""
    results_dir = Path(results_dir)
    stamp = stamp or _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    box = results_dir / QUARANTINE_DIR / stamp
    moved: list[Path] = []
    for src, why in items:
        try:
            rel = Path(src).resolve().relative_to(results_dir.resolve())
        except ValueError:
            rel = Path(Path(src).name)
        dest = box / rel
        if dest.exists():
            dest = dest.with_name(f"{dest.name}.{uuid.uuid4().hex[:8]}")
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.rename(src, dest)
        except FileNotFoundError:  # gone meanwhile (another process moved it)
            continue
        except OSError as exc:
            raise _write_error(dest, exc) from None
        with open(box / "moved.tsv", "a", encoding="utf-8") as fh:
            fh.write(f"{rel}\t{why}\n")
        moved.append(dest)
    return moved


def schema_field(name: str, type_: pa.DataType, doc: str, nullable: bool = True) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"doc": doc})


#: What was merged, shared by every table keyed by units (results, diagnostics): a join on these
#: columns compares the same configuration whichever table a row comes from.
MERGE_COLUMNS = (
    schema_field("pool", pa.string(), "Name of the model pool the experts come from."),
    schema_field("base_model", pa.string(), "Base model id (HF id or local name) the experts were fine-tuned from; task "
                 "vectors are taken against it."),
    schema_field("method", pa.string(), "Merge method name (registry name); null for rows about no merged model "
                 "(reference rows, diagnostics of experts only)."),
    schema_field("method_version", pa.string(), "MethodSpec.version of `method`; null when `method` is."),
    schema_field("params_json", pa.string(), "Merge hyper-parameters as canonical JSON (sorted keys); '{}' if none."),
)

RESULTS_SCHEMA = pa.schema(
    [
        schema_field("run_id", pa.string(), "Id of the `mergebench eval` invocation that wrote the row (see new_run_id).", False),
        schema_field("unit_id", pa.string(), "Content hash of the unit of work (see unit_id()); equal ids, identical work.",
           False),
        schema_field("source", pa.string(), "'run' for rows measured here, 'paper' for numbers transcribed from a paper.", False),
        schema_field("suite", pa.string(), "Suite name, e.g. 'inthewild'.", False),
        schema_field("suite_version", pa.string(), "Suite version string; results of different versions are not comparable."),
        schema_field("profile", pa.string(), "Suite profile, e.g. 'embedded' or 'paper' (sizes, doc counts)."),
        *MERGE_COLUMNS,
        schema_field("seed", pa.int64(), "Seed of the subset sampler / stochastic merge for this unit."),
        schema_field("subset", pa.list_(pa.string()), "Expert names merged, in merge order; [model] for a reference row."),
        schema_field("n", pa.int32(), "Merge size: number of experts in `subset` (0 for the base model, 1 for an expert)."),
        schema_field("role", pa.string(), "'merged' (a merge of `subset`), 'base' (the base model) or 'expert' (one expert).",
           False),
        schema_field("task", pa.string(), "lm-eval task or subtask name, e.g. 'leaderboard_bbh_navigate'.", False),
        schema_field("metric", pa.string(), "lm-eval metric name without filter suffix, e.g. 'acc_norm'.", False),
        schema_field("value", pa.float64(), "Raw metric value as lm-eval reports it (accuracies in [0, 1]).", False),
        schema_field("stderr", pa.float64(), "lm-eval's standard error of `value`; null when lm-eval gives none."),
        schema_field("n_docs", pa.int64(), "Number of evaluation documents behind `value`."),
        schema_field("normalized_value", pa.float64(),
           "Open LLM Leaderboard v2 normalized value in [0, 1] (metrics.normalize_leaderboard); else null."),
        schema_field("created_at", pa.timestamp("us", tz="UTC"), "When the row's unit was written (UTC).", False),
    ],
    metadata={"mergebench_schema_version": SCHEMA_VERSION, "table": "results"},
)

PROVENANCE_SCHEMA = pa.schema(
    [
        schema_field("run_id", pa.string(), "Run id (joins results.run_id).", False),
        schema_field("unit_id", pa.string(), "Unit id (joins results.unit_id); null for a run-level record."),
        schema_field("suite", pa.string(), "Suite name (also the partition folder)."),
        schema_field("method", pa.string(), "Method name; null for reference units."),
        schema_field("created_at", pa.timestamp("us", tz="UTC"), "When the record was written (UTC).", False),
        schema_field("mergebench_version", pa.string(), "Installed mergebench version."),
        schema_field("torch_version", pa.string(), "Installed torch version."),
        schema_field("transformers_version", pa.string(), "Installed transformers version."),
        schema_field("lm_eval_version", pa.string(), "Installed lm-eval version."),
        schema_field("python_version", pa.string(), "Python version."),
        schema_field("git_sha", pa.string(), "HEAD commit of the mergebench checkout, '+dirty' if modified; null outside git."),
        schema_field("platform", pa.string(), "platform.platform() of the machine."),
        schema_field("cpu_model", pa.string(), "CPU model name (from /proc/cpuinfo or platform)."),
        schema_field("cpu_cores", pa.int32(), "Logical CPU cores usable by the process."),
        schema_field("gpu_name", pa.string(), "CUDA device name used, null on CPU."),
        schema_field("device", pa.string(), "Device the unit ran on ('cpu', 'cuda', 'cuda:0', ...)."),
        schema_field("doc_index_hash", pa.string(), "Hash of the evaluation document indices used (part of unit_id)."),
        schema_field("merge_wall_s", pa.float64(), "Wall time of the merge, seconds (null for reference units)."),
        schema_field("merge_peak_rss_bytes", pa.int64(), "Peak resident memory during the merge, bytes."),
        schema_field("gpu_peak_mem_bytes", pa.int64(), "Peak CUDA memory allocated during merge + eval, bytes; null on CPU."),
        schema_field("eval_wall_s", pa.float64(), "Wall time of the lm-eval evaluation, seconds."),
        schema_field("unit_wall_s", pa.float64(), "Wall time of the whole unit (merge or load, diagnostics, scoring), seconds."),
        schema_field("eval_docs", pa.int64(), "Documents scored in the unit (every task, every group leaf)."),
        schema_field("eval_requests", pa.int64(), "lm-eval requests answered (one per choice of a multiple-choice document)."),
        schema_field("eval_tokens", pa.int64(),
           "Tokens run through the model (each shared context once with the prefix-sharing scorer)."),
        schema_field("eval_docs_per_s", pa.float64(), "Documents scored per second of eval_wall_s."),
        schema_field("scorer", pa.string(), "Log-likelihood scorer: 'shared' (prefix-sharing) or 'hflm' (lm-eval's stock HFLM)."),
        schema_field("threads", pa.int32(), "CPU threads torch used for the unit."),
        schema_field("task_vector_norm", pa.float64(),
           "||theta_model - theta_base||_2 over the tensors shared with the base, in the evaluated dtype "
           "(in-the-wild merging study, Fig. 4); 0 for the base model, null where not measured."),
        schema_field("extra_json", pa.string(), "Anything else worth keeping, as JSON."),
    ],
    metadata={"mergebench_schema_version": SCHEMA_VERSION, "table": "provenance"},
)

#: Extra columns carried only by published (source='paper') rows.
PAPER_EXTRA_SCHEMA = pa.schema(
    [
        schema_field("table", pa.string(),
                     "Origin table, e.g. 'seed000_table1': the paper's file prefix (suites/papers/papers.yaml) "
                     "and the table number."),
        schema_field("label", pa.string(), "The row/column label as printed in the paper."),
        schema_field("n_combinations", pa.int64(),
                     "Number of subsets behind an aggregate (the in-the-wild merging study's k in 'n = m (k)')."),
        schema_field("averaged_metric", pa.string(),
           "For metric 'reported_average'/'reported_std': the metric(s) averaged ('a|b')."),
        schema_field("average_over", pa.string(), "For reported averages: 'task' or 'base_model'."),
        schema_field("derived_from", pa.string(), "Table whose rows a reported average summarizes, when not its own table."),
        schema_field("note", pa.string(),
           "Transcription remarks; a printed value that its own rows do not reproduce says 'inconsistent'."),
    ]
)
PAPER_SCHEMA = pa.schema(list(RESULTS_SCHEMA) + list(PAPER_EXTRA_SCHEMA))

#: The ``diagnostics`` table (written by :mod:`mergebench.diagnostics.store`; defined here, with the
#: other tables, so that the store's views need not import the diagnostics room).
DIAGNOSTICS_SCHEMA = pa.schema(
    [
        schema_field("run_id", pa.string(), "Id of the `mergebench diagnose` invocation that wrote the row.", False),
        schema_field("unit_id", pa.string(), "Content hash of the diagnostic unit (DiagUnit.unit_id).", False),
        schema_field("created_at", pa.timestamp("us", tz="UTC"), "When the unit was written (UTC).", False),
        *MERGE_COLUMNS,
        schema_field("subset", pa.list_(pa.string()), "Experts diagnosed (and merged, when `method` is set), in order."),
        schema_field("seed", pa.int64(), "Seed of the bootstrap / stochastic merge."),
        schema_field("settings_json", pa.string(),
           "Diagnostic settings as canonical JSON (layer, pooling, normalize, n_boot, zero_tol, probe hash...)."),
        schema_field("kind", pa.string(), "'weights', 'representations', 'activations' or 'stats'.", False),
        schema_field("metric", pa.string(), "Metric name, e.g. 'cosine', 'sign_change_ratio', 'hidden_sim', 'mds', "
           "'effective_rank', 'anova_p', 'pearson_r'.", False),
        schema_field("model", pa.string(), "Model the value is about (first of a pair); for stats the factor/metric tested."),
        schema_field("model_b", pa.string(), "Second model of a pairwise metric; null otherwise."),
        schema_field("layer", pa.string(), "'layers.<i>' (weight block), a tensor name, 'hidden.<i>' (hidden state i), "
           "'last'; null for whole-model values."),
        schema_field("scope", pa.string(), "'global', 'block', 'tensor' or 'layer': what `layer` groups."),
        schema_field("task", pa.string(), "Task the value belongs to (MDS per task), when known."),
        schema_field("value", pa.float64(), "The metric (bootstrap mean for activations); null where undefined."),
        schema_field("std", pa.float64(), "Bootstrap standard deviation (activations); null otherwise."),
        schema_field("point", pa.float64(), "Value on all probe inputs, without resampling (activations)."),
        schema_field("n", pa.int64(), "Sample size behind the value: parameters, tensors averaged, bootstrap draws, "
           "observations."),
        schema_field("extra_json", pa.string(), "Anything else, as JSON."),
    ],
    metadata={"mergebench_schema_version": SCHEMA_VERSION, "table": "diagnostics"},
)

#: The ``fidelity`` table: the papers' findings tested on the embedded profiles, written by
#: ``mergebench fidelity`` (:mod:`mergebench.fidelity`; one file per suite, replaced on each
#: run). Derived rows, like the diagnostics' statistics; defined here so the views need not import it.
FIDELITY_DIR = "fidelity"
FIDELITY_SCHEMA = pa.schema(
    [
        schema_field("suite", pa.string(), "Suite whose embedded profile tested the finding.", False),
        schema_field("profile", pa.string(), "Profile tested (the embedded one)."),
        schema_field("pool", pa.string(), "Pool of the tested rows (or of the diagnostics)."),
        schema_field("kind", pa.string(), "'finding' (a published finding) or 'ranking' (rank agreement).", False),
        schema_field("id", pa.string(), "Finding id in suites/papers/findings.yaml.", False),
        schema_field("paper", pa.string(), "Paper key (suites/papers/papers.yaml)."),
        schema_field("paper_title", pa.string(), "The paper's short title."),
        schema_field("where", pa.string(), "Where the paper states the finding (section, table, figure)."),
        schema_field("claim", pa.string(), "The finding as the paper states it."),
        schema_field("check", pa.string(), "How it is tested (trend, share, method_gap, ..., kendall_tau)."),
        schema_field("quantity", pa.string(), "The quantity or diagnostic tested."),
        schema_field("estimate", pa.float64(), "The embedded result (slope, share, gap, r, tau ...); null if untestable."),
        schema_field("ci_low", pa.float64(), "Lower end of its seeded 95 % bootstrap interval."),
        schema_field("ci_high", pa.float64(), "Upper end of its seeded 95 % bootstrap interval."),
        schema_field("n_obs", pa.int64(), "Observations behind the estimate (units, tasks, pairs, layers, methods)."),
        schema_field("observed", pa.string(), "The embedded numbers in words (per n, per method)."),
        schema_field("verdict", pa.string(), "'reproduced', 'not reproduced' or 'not testable here'.", False),
        schema_field("reason", pa.string(), "Why the verdict."),
        schema_field("seed", pa.int64(), "Bootstrap seed (NumPy PCG64)."),
        schema_field("n_boot", pa.int64(), "Bootstrap resamples."),
        schema_field("inputs_hash", pa.string(), "Fingerprint of the store rows and findings file the row was computed from."),
        schema_field("computed_at", pa.timestamp("us", tz="UTC"), "When `mergebench fidelity` computed the row (UTC)."),
    ],
    metadata={"mergebench_schema_version": SCHEMA_VERSION, "table": "fidelity"},
)

#: The ``samples`` table: each unit's per-document outcomes (lm-eval's per-sample metrics), so two
#: methods are compared paired on identical documents as well as identical subsets. Written with
#: the unit's rows (:func:`write_unit`), one file per unit.
SAMPLES_SCHEMA = pa.schema(
    [
        schema_field("run_id", pa.string(), "Run id (joins results.run_id).", False),
        schema_field("unit_id", pa.string(), "Unit id (joins results.unit_id).", False),
        schema_field("suite", pa.string(), "Suite name.", False),
        schema_field("method", pa.string(), "Method name; null for reference units."),
        schema_field("task", pa.string(), "lm-eval (leaf) task name.", False),
        schema_field("doc_id", pa.int64(), "Index of the document in the task's evaluation split (the sampler's index).",
                     False),
        schema_field("metric", pa.string(), "lm-eval metric name, e.g. 'acc'.", False),
        schema_field("value", pa.float64(), "This document's value of `metric` (1/0 for accuracies); the unit's "
                     "reported value is their mean.", False),
        schema_field("gold_loglik", pa.float64(), "Log-likelihood of the gold choice (multiple choice); null otherwise."),
    ],
    metadata={"mergebench_schema_version": SCHEMA_VERSION, "table": "samples"},
)

_REQUIRED_ROW_COLUMNS = ("task", "metric", "value")
_UNIT_COLUMNS = ("run_id", "unit_id", "source", "suite", "suite_version", "profile", "pool", "base_model", "method",
                 "method_version", "params_json", "seed", "subset", "n", "role", "created_at")
_HEX = re.compile(r"^[0-9a-f]{8,64}$")
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


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


def _stage(table: pa.Table, final: Path) -> Path:
    """Write ``table`` to a hidden, fsynced temp file beside ``final`` (invisible to the
    ``*.parquet`` globs) and return it; on any failure nothing is left behind and an OSError
    (disk full, ...) becomes a one-line :class:`StoreWriteError` naming ``final``."""
    tmp = final.parent / f".{final.name}.{uuid.uuid4().hex}.tmp"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
    except BaseException as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(exc, OSError) and not isinstance(exc, StoreError):
            raise _write_error(final, exc) from None
        raise
    return tmp


def _commit(tmp: Path, final: Path, *, overwrite: bool = False) -> bool:
    """Move the staged ``tmp`` to ``final`` atomically (the temp file is gone afterwards).

    Without ``overwrite``, returns False and commits nothing if ``final`` already exists.
    """
    try:
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
    except OSError as exc:
        raise _write_error(final, exc) from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def atomic_write_table(table: pa.Table, final: Path, *, overwrite: bool = False) -> bool:
    """Write ``table`` to ``final`` via a hidden temp file (:func:`_stage` + :func:`_commit`)."""
    return _commit(_stage(table, final), final, overwrite=overwrite)


def _unit_files(results_dir: Path, uid: str) -> list[Path]:
    """The unit's sound rows files (damaged ones are skipped with a warning)."""
    return scan_files(results_dir, "runs", f"suite=*/method=*/part-*-{uid}.parquet")


def completed_units(results_dir: str | os.PathLike = DEFAULT_RESULTS_DIR) -> set[str]:
    """Ids of every unit with results on disk (one directory scan; use it to plan a resumed run).

    A unit whose rows file is damaged is not counted (a warning names the file), so a resumed
    run computes it again.
    """
    good, bad = glob_health(Path(results_dir) / "runs", "suite=*/method=*/part-*.parquet", as_str=True)
    _warn_damaged(bad, Path(results_dir))
    return {f[: -len(".parquet")].rsplit("-", 1)[1] for f in good}


def has_unit(unit: str | Unit, results_dir: str | os.PathLike = DEFAULT_RESULTS_DIR) -> bool:
    """True when the unit's rows are already stored (a resumed run skips it)."""
    uid = unit.unit_id if isinstance(unit, Unit) else unit
    return bool(_unit_files(Path(results_dir), uid))


def rows_table(rows: Any) -> pa.Table:
    if isinstance(rows, pa.Table):
        return rows
    if isinstance(rows, Mapping):  # columns
        return pa.table(dict(rows))
    if hasattr(rows, "to_dict") and hasattr(rows, "columns"):  # pandas DataFrame
        return pa.Table.from_pandas(rows, preserve_index=False)
    return pa.Table.from_pylist(list(rows))


def conform_table(table: pa.Table, schema: pa.Schema, constants: Mapping[str, Any]) -> pa.Table:
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
    samples: Any = None,
) -> WriteResult:
    """Store one unit's rows (task, metric, value[, stderr, n_docs, normalized_value]) atomically.

    `rows` is a DataFrame, a pyarrow Table, a list of dicts or a dict of columns. The unit's
    constant columns come from `unit`. Idempotent: if the unit is already stored (by any run),
    nothing is written. Writers racing on the same unit (two runs doing the same work at once)
    converge to one file: after committing, each removes every file of the unit but the one
    with the smallest name; readers may see both copies only inside that window, and a call
    that returned ``written=True`` may have had its copy replaced by an identical one
    (:func:`claim_unit` keeps cooperating runs from computing a unit twice in the first place).

    Rows and provenance land together: the provenance record (if any) is staged first (written
    and fsynced under a hidden temp name), the rows are committed, then the provenance is
    renamed into place, and only by the writer whose rows file is the unit's surviving one. A
    failure before the rows commit leaves neither; a kill between the two renames leaves the
    rows and a hidden temp file (``mergebench store check``). A damaged rows file of the unit
    (see :func:`file_problem`) is moved to ``quarantine/`` so that the unit can be stored again.

    With ``exclusive`` (used by sweeps, whose units may be retried or duplicated by many workers)
    the file is named by the unit alone, ``part-unit-<unit_id>.parquet``: racing writers commit
    to the same name with a no-replace hard link, so exactly one wins and the unit is never
    stored twice, not even for an instant. The rows still carry the writer's ``run_id``.

    ``samples`` (task, doc_id, metric, value[, gold_loglik] per document; see
    :func:`mergebench.evaluation.outcomes.doc_outcomes`) lands with the provenance, the same way.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}")
    if not RUN_ID_PATTERN.match(run_id):
        raise ValueError(f"run_id {run_id!r} must match {RUN_ID_PATTERN.pattern}")
    results_dir = Path(results_dir)
    uid = unit.unit_id
    existing, damaged = glob_health(results_dir / "runs", f"suite=*/method=*/part-*-{uid}.parquet")
    if existing:
        return WriteResult(uid, existing[0], False)
    table = rows_table(rows)
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
    table = conform_table(table, RESULTS_SCHEMA, constants)
    dup = table.group_by(["task", "metric"]).aggregate([("value", "count")])
    if dup.num_rows != table.num_rows:
        raise ValueError(f"unit {uid}: rows repeat a (task, metric) pair")
    part = _partition(results_dir, "runs", unit.suite, unit.method)
    final = part / (f"part-unit-{uid}.parquet" if exclusive else f"part-{run_id}-{uid}.parquet")
    prov = None if provenance is None else _provenance_table(provenance, run_id=run_id, unit=unit,
                                                             results_dir=results_dir)
    docs = None if samples is None else _samples_table(samples, run_id=run_id, unit=unit, results_dir=results_dir)
    rows_tmp = _stage(table, final)
    prov_tmp = docs_tmp = None
    try:
        prov_tmp = None if prov is None else _stage(*prov)
        docs_tmp = None if docs is None else _stage(*docs)
        for moved in quarantine_files(results_dir, damaged):
            warn_store(f"moved the damaged rows file of unit {uid} to {moved}; storing the unit again")
        if not _commit(rows_tmp, final):
            return WriteResult(uid, final, False)
        # Race resolution: of all committed files of a unit, the lexicographically smallest
        # survives. Every writer removes the others it sees after its own commit, and the last one
        # to commit sees them all, so the store converges to one file per unit.
        files = _unit_files(results_dir, uid)
        for extra in files[1:]:
            extra.unlink(missing_ok=True)
        if files and files[0] != final:
            return WriteResult(uid, files[0], False)
        if prov_tmp is not None:
            _commit(prov_tmp, prov[1], overwrite=True)  # the same run re-recording a unit keeps the newest
        if docs_tmp is not None:
            _commit(docs_tmp, docs[1], overwrite=True)
        return WriteResult(uid, final, True)
    finally:
        for tmp in (rows_tmp, prov_tmp, docs_tmp):
            if tmp is not None:
                tmp.unlink(missing_ok=True)


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
    table, final = _provenance_table(record, run_id=run_id, unit=unit, suite=suite, results_dir=results_dir)
    atomic_write_table(table, final, overwrite=True)  # the same run re-recording a unit keeps the newest
    return final


def _provenance_table(record: Mapping[str, Any], *, run_id: str, unit: Unit | None = None, suite: str | None = None,
                      results_dir: str | os.PathLike = DEFAULT_RESULTS_DIR) -> tuple[pa.Table, Path]:
    """One provenance row as a PROVENANCE_SCHEMA table, and the file it belongs in."""
    rec = dict(record)
    extra = {k: rec.pop(k) for k in list(rec) if k not in PROVENANCE_SCHEMA.names}
    if extra:
        prev = json.loads(rec.get("extra_json") or "{}")
        rec["extra_json"] = canonical_json({**prev, **extra})
    for k in ("run_id", "unit_id", "suite", "method", "created_at"):
        rec.pop(k, None)
    if unit is None and suite is None:
        raise ValueError("write_provenance needs a unit or a suite")
    if not RUN_ID_PATTERN.match(run_id):
        raise ValueError(f"run_id {run_id!r} must match {RUN_ID_PATTERN.pattern}")
    suite = unit.suite if unit is not None else suite
    uid = unit.unit_id if unit is not None else None
    if unit is not None and rec.get("doc_index_hash") is None:
        rec["doc_index_hash"] = unit.doc_index_hash
    constants = {"run_id": run_id, "unit_id": uid, "suite": suite, "method": unit.method if unit else None,
                 "created_at": _dt.datetime.now(_dt.UTC)}
    row = pa.Table.from_pylist([rec]) if rec else pa.table({"extra_json": pa.array([None], pa.string())})
    table = conform_table(row, PROVENANCE_SCHEMA, constants)
    part = _partition(Path(results_dir), "provenance", suite, unit.method if unit else None)
    return table, part / f"prov-{run_id}-{uid or 'run'}.parquet"


def _samples_table(samples: Any, *, run_id: str, unit: Unit, results_dir: str | os.PathLike) -> tuple[pa.Table, Path]:
    """A unit's per-document outcomes as a SAMPLES_SCHEMA table, and the file it belongs in."""
    table = rows_table(samples)
    missing = [c for c in ("task", "doc_id", "metric", "value") if c not in table.column_names]
    if missing:
        raise ValueError(f"unit {unit.unit_id}: per-document samples lack column(s) {missing}")
    constants = {"run_id": run_id, "unit_id": unit.unit_id, "suite": unit.suite, "method": unit.method}
    table = conform_table(table, SAMPLES_SCHEMA, constants)
    part = _partition(Path(results_dir), "samples", unit.suite, unit.method)
    return table, part / f"samples-{run_id}-{unit.unit_id}.parquet"


def _unit_provenance_files(unit: Unit, results_dir: str | os.PathLike) -> list[Path]:
    """The unit's sound provenance files, none if the unit has no rows (damaged ones skipped, warned)."""
    part = _partition(Path(results_dir), "provenance", unit.suite, unit.method)
    files = scan_files(Path(results_dir), "provenance", f"{part.parent.name}/{part.name}/prov-*-{unit.unit_id}.parquet")
    return files if files and has_unit(unit, results_dir) else []


def read_unit_provenance(unit: Unit, results_dir: str | os.PathLike = DEFAULT_RESULTS_DIR) -> list[dict[str, Any]]:
    """The provenance records of one stored unit (one per run that evaluated it), as dicts; none
    for a unit without rows (provenance left by a failed write is not a record of the unit)."""
    return [row for _, t in read_sound(_unit_provenance_files(unit, results_dir), results_dir) for row in t.to_pylist()]


def update_provenance(unit: Unit, values: Mapping[str, Any],
                      results_dir: str | os.PathLike = DEFAULT_RESULTS_DIR) -> list[Path]:
    """Set PROVENANCE_SCHEMA columns of a stored unit's provenance records (each file rewritten
    atomically, brought to the current schema): for a measurement added after the unit ran,
    such as ``task_vector_norm``. Returns the files rewritten (none if the unit has no record)."""
    bad = [k for k in values if k not in PROVENANCE_SCHEMA.names or k in ("run_id", "unit_id", "suite", "method")]
    if bad:
        raise ValueError(f"cannot set provenance columns {bad}")
    files = []
    for file, table in read_sound(_unit_provenance_files(unit, results_dir), results_dir):
        files.append(file)
        cols = {name: table.column(name) if name in table.column_names else pa.nulls(table.num_rows, f.type)
                for name, f in zip(PROVENANCE_SCHEMA.names, PROVENANCE_SCHEMA)}
        for k, v in values.items():
            cols[k] = pa.array([v] * table.num_rows, PROVENANCE_SCHEMA.field(k).type)
        arrays = [cols[f.name].cast(f.type) for f in PROVENANCE_SCHEMA]
        atomic_write_table(pa.Table.from_arrays(arrays, schema=PROVENANCE_SCHEMA), file, overwrite=True)
    return files


# ------------------------------------------------------------------------------ provenance


def package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _git_sha() -> str | None:
    root = CHECKOUT
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
        "mergebench_version": package_version("mergebench"),
        "torch_version": package_version("torch"),
        "transformers_version": package_version("transformers"),
        "lm_eval_version": package_version("lm_eval") or package_version("lm-eval"),
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


def _sql_str(value: Any) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _parquet_view(con, name: str, results_dir: Path, schema: pa.Schema, *, pinned: bool,
                  where: Callable[[bool], str] | None = None) -> tuple[list[Path], bool]:
    """Create view ``name`` over the table's sound files (rows filtered by ``where(dynamic)``, if
    given): (the files it reads, whether it reads them through the glob, i.e. is dynamic).

    A healthy table is read through its glob, so files written after connect are seen; once a
    damaged file had to be skipped (or with ``pinned``) the view reads the sound files found now.
    """
    import duckdb

    folder, pattern = _TABLE_FILES[name]
    root = results_dir / folder
    files, bad = glob_health(root, pattern)
    _warn_damaged(bad, results_dir)
    con.register(f"_{name}_schema", schema.empty_table())  # the union adds columns older files lack, as NULL
    while files:
        dynamic = not (bad or pinned)
        src = (_sql_str(root / pattern) if dynamic
               else "[" + ", ".join(_sql_str(os.path.abspath(f) if pinned else f) for f in files) + "]")
        body = (f"SELECT * FROM read_parquet({src}, union_by_name=true, hive_partitioning=false) "
                f"UNION ALL BY NAME SELECT * FROM _{name}_schema")
        if where is not None:  # one view: a view over a view would read every file's footer twice
            body = f"SELECT * FROM ({body}) WHERE {where(dynamic)}"
        try:
            con.execute(f"CREATE OR REPLACE VIEW {name} AS {body}")
            return files, dynamic
        except duckdb.Error as exc:
            # a file whose header and footer look sound but do not parse: find it with pyarrow
            deep = [(f, why) for f in files if (why := _deep_problem(f, schema)) is not None]
            if not deep:
                raise StoreError(f"cannot read the {name} files under {root}: {str(exc).splitlines()[0]}") from None
            _warn_damaged(deep, results_dir)
            bad = [*bad, *deep]
            files = [f for f in files if f not in dict(deep)]
    # DuckDB errors on a glob without matches; an empty typed table keeps queries valid
    con.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM _{name}_schema")
    return files, False


def connect(results_dir: str | os.PathLike = DEFAULT_RESULTS_DIR, paper_dir: str | os.PathLike | None = None,
            *, include_paper: bool = True, read_only: bool = False):
    """An in-memory DuckDB connection with views over the store.

    Views: ``results`` (all measured rows), ``provenance`` (records of units that have rows, and
    run-level records), ``samples`` (per-document outcomes of units that have rows), ``diagnostics``, ``fidelity`` (the rows `mergebench fidelity` stored last),
    ``paper`` (published rows; from `paper_dir`, default
    ``<results_dir>/paper``) and ``all_results`` (results UNION ALL BY NAME paper: run rows have
    null paper-only columns). File lists are resolved per query, but a directory that was empty
    at connect time stays an empty view (reconnect after the first write), and so does a table
    in which a damaged file was skipped (a :class:`StoreWarning` names it).

    ``read_only``: the connection may open the store's files for reading and no other file
    (DuckDB's ``enable_external_access`` off, ``allowed_paths`` = those files, configuration
    locked); views read the files found at connect time. It can still overwrite those very files
    (DuckDB's allowed paths are read-write): :func:`sql` also refuses every statement but SELECT.
    """
    import duckdb

    results_dir = Path(results_dir)
    con = duckdb.connect(":memory:")
    con.execute("SET TimeZone = 'UTC'")  # timestamps come back in UTC whatever the machine's zone

    read = {"results": _parquet_view(con, "results", results_dir, RESULTS_SCHEMA, pinned=read_only)}
    runs, runs_dynamic = read["results"]

    def with_rows(dynamic: bool) -> str:
        """Provenance of a unit without rows (a write that failed half way, in an older version) is hidden."""
        if dynamic and runs_dynamic:
            glob = _sql_str(results_dir / _TABLE_FILES["results"][0] / "suite=*/method=*/part-*.parquet")
            return rf"unit_id IS NULL OR unit_id IN (SELECT regexp_extract(file, '-([0-9a-f]+)\.parquet$', 1) FROM glob({glob}))"
        con.register("_units_with_rows", pa.table({"unit_id": sorted({f.stem.rsplit("-", 1)[-1] for f in runs})}))
        return "unit_id IS NULL OR unit_id IN (SELECT unit_id FROM _units_with_rows)"

    read["provenance"] = _parquet_view(con, "provenance", results_dir, PROVENANCE_SCHEMA, pinned=read_only,
                                       where=with_rows)
    # the outcomes of the very run whose rows are stored (a unit recomputed after damage has two)
    read["samples"] = _parquet_view(con, "samples", results_dir, SAMPLES_SCHEMA, pinned=read_only,
                                    where=lambda _: "(unit_id, run_id) IN (SELECT DISTINCT unit_id, run_id FROM results)")
    read["diagnostics"] = _parquet_view(con, "diagnostics", results_dir, DIAGNOSTICS_SCHEMA, pinned=read_only)
    read["fidelity"] = _parquet_view(con, "fidelity", results_dir, FIDELITY_SCHEMA, pinned=read_only)
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
    if read_only:
        allowed = "[" + ", ".join(_sql_str(os.path.abspath(f)) for files, _ in read.values() for f in files) + "]"
        con.execute(f"SET allowed_paths = {allowed}")
        con.execute("SET enable_external_access = false")
        con.execute("SET python_enable_replacements = false")  # no scans of the caller's Python variables
        con.execute("SET lock_configuration = true")
    return con


#: The only statements :func:`sql` runs: reading queries (SELECT, WITH, FROM, VALUES, DESCRIBE,
#: SHOW, SUMMARIZE all parse as SELECT). COPY, EXPORT, ATTACH, CREATE, INSTALL/LOAD, SET, PRAGMA,
#: CALL, EXPLAIN (whose ANALYZE runs its statement) and the rest are refused.
_READ_STATEMENTS = ("SELECT",)


def check_query(con, query: str) -> None:
    """Raise :class:`QueryRefusedError` unless every statement of ``query`` only reads (DuckDB's
    own parser decides; a syntax error is DuckDB's ParserException)."""
    statements = con.extract_statements(query)
    if not statements:
        raise QueryRefusedError("the query is empty: give a SELECT statement")
    for st in statements:
        kind = getattr(st.type, "name", str(st.type))
        if kind not in _READ_STATEMENTS:
            first = (st.query.split() or [kind])[0].upper()
            raise QueryRefusedError(f"{first} statements are refused: `mergebench sql` only reads the store (SELECT "
                                    "queries; save a result with --out FILE.csv or FILE.parquet)")


def sql(query: str, results_dir: str | os.PathLike = DEFAULT_RESULTS_DIR, paper_dir: str | os.PathLike | None = None,
        params: Sequence[Any] | None = None) -> "pd.DataFrame":  # noqa: F821
    """Run the reading `query` against the views of :func:`connect` and return a pandas DataFrame.

    The connection is ``read_only`` and every statement must be a query (:func:`check_query`):
    nothing can write a file, inside the results folder or anywhere else.
    """
    import duckdb

    con = connect(results_dir, paper_dir, read_only=True)
    try:
        check_query(con, query)
        with warnings.catch_warnings():  # duckdb's own DataFrame conversion uses deprecated pandas API
            warnings.filterwarnings("ignore", message="The inplace keyword", category=Warning)
            return con.execute(query, params or []).df()
    except duckdb.PermissionException as exc:
        raise QueryRefusedError(f"{str(exc).splitlines()[0]}: `mergebench sql` reads only the store's views (results, "
                                "provenance, diagnostics, fidelity, paper, all_results)") from None
    finally:
        con.close()


def write_export(frame: "pd.DataFrame", path: str | os.PathLike,  # noqa: F821
                 results_dir: str | os.PathLike = DEFAULT_RESULTS_DIR) -> Path:
    """Write a query result to ``path`` (``.csv`` or ``.parquet``) atomically; refused inside the
    results folder, which only mergebench's own writers change. List cells (``subset``) are
    written to CSV as ``a|b``, as in ``results/paper``."""
    path = Path(path)
    kind = path.suffix.lower()
    if kind not in (".csv", ".parquet"):
        raise StoreError(f"--out {path}: give a file ending in .csv or .parquet")
    res, target = Path(results_dir).resolve(), path.resolve()
    if target == res or target.is_relative_to(res):
        raise StoreError(f"--out {path} is inside the results folder {results_dir}: query output is never written "
                         "into the store; choose a file elsewhere")
    if not target.parent.is_dir():
        raise StoreError(f"--out {path}: folder {path.parent} does not exist")
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
    try:
        if kind == ".parquet":
            pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp)
        else:
            lists = {c: frame[c].map(lambda v: v if v is None or isinstance(v, (str, bytes)) or not hasattr(v, "__iter__")
                                     else "|".join(map(str, v))) for c in frame.columns if frame[c].dtype == object}
            frame.assign(**lists).to_csv(tmp, index=False)
        os.replace(tmp, target)
    except OSError as exc:
        raise _write_error(target, exc) from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def read_results(results_dir: str | os.PathLike = DEFAULT_RESULTS_DIR, where: str | None = None,
                 params: Sequence[Any] | None = None) -> "pd.DataFrame":  # noqa: F821
    """Rows of the ``results`` view (optionally filtered by a SQL `where` clause) as a DataFrame."""
    q = "SELECT * FROM results" + (f" WHERE {where}" if where else "")
    return sql(q, results_dir, params=params)


# ---------------------------------------------------------------------------------- claims

_HELD: set[str] = set()  # claim files this process holds (flock on NFS may be per process, not per open)
_HELD_LOCK = threading.Lock()
_NO_LOCKS: set[str] = set()  # claim folders whose filesystem has no file locks (warned once)


@dataclass(frozen=True)
class Claim:
    """What :func:`claim_unit` yields: truthy when this process holds the unit; else ``holder``
    says who does (``"pid 4242 on node-1 since 2025-01-01T12:00:00+00:00 (run ...)"``)."""

    unit_id: str
    acquired: bool
    holder: str | None = None

    def __bool__(self) -> bool:
        return self.acquired


def _claim_path(results_dir: str | os.PathLike, uid: str) -> Path:
    return Path(results_dir) / CLAIMS_DIR / f"{uid}.claim"


def _claim_holder(path: Path, *, since: bool = True) -> str:
    try:
        info = json.loads(path.read_text())
        who = f"pid {info['pid']} on {info['host']}" + (f" since {info['since']}" if since else "")
        return who + (f" (run {info['run_id']})" if info.get("run_id") else "")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on ``path`` (created if missing), or None if another
    process holds it. OSError if the filesystem has no locks."""
    import fcntl

    for _ in range(20):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # its holder released and removed it between our open and our lock: again
    raise StoreError(f"cannot claim {path}: it keeps being replaced")


@contextmanager
def claim_unit(unit: str | Unit, results_dir: str | os.PathLike = DEFAULT_RESULTS_DIR, *, run_id: str | None = None):
    """Claim a unit of work for the duration of the block, so that concurrent runs (two ``eval``
    or ``sweep`` processes, Ray workers) never compute it twice.

    Yields a :class:`Claim`: truthy when this process now holds the unit (check :func:`has_unit`
    again inside the block, since another process may have finished it in the meantime, then
    compute and write it), falsy when a live process holds it (skip the unit and report
    ``claim.holder``). The claim is an exclusive ``flock`` on ``<results>/.claims/<unit_id>.claim``
    (which also records pid, host, start time and run); the kernel releases it when its process
    dies, however it dies, so a claim left by a killed run is taken over at once (``store check``
    lists such leftover files). The file is removed when the block ends. Where the filesystem has
    no file locks, a warning says so once and every claim succeeds (rows are still stored once).
    """
    uid = unit.unit_id if isinstance(unit, Unit) else str(unit)
    if not _HEX.match(uid):
        raise ValueError(f"unit id {uid!r} must be 8-64 lowercase hex digits")
    path = _claim_path(results_dir, uid)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _write_error(path.parent, exc) from None
    key = str(path.resolve())
    with _HELD_LOCK:
        held_here = key in _HELD
        _HELD.add(key)
    if held_here:
        yield Claim(uid, False, f"pid {os.getpid()} on {platform.node()} (this process)")
        return
    fd = None
    try:
        try:
            fd = _try_lock(path)
        except OSError as exc:
            if str(path.parent) not in _NO_LOCKS:
                _NO_LOCKS.add(str(path.parent))
                warn_store(f"{path.parent} has no file locks ({exc.strerror or exc}): units are not claimed, concurrent "
                      "runs may compute a unit twice (its rows are still stored once)")
            yield Claim(uid, True)
            return
        if fd is None:
            yield Claim(uid, False, _claim_holder(path))
            return
        info = {"pid": os.getpid(), "host": platform.node(), "run_id": run_id,
                "since": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, canonical_json(info).encode(), 0)
        yield Claim(uid, True)
    finally:
        if fd is not None:
            try:
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    path.unlink()  # still holding the lock: nobody can have taken it over
            except OSError:
                pass
            os.close(fd)
        with _HELD_LOCK:
            _HELD.discard(key)


# -------------------------------------------------------------------------- check and repair


@dataclass(frozen=True)
class StoreProblem:
    """One thing ``mergebench store check`` found; ``kind`` is a key of :data:`PROBLEM_KINDS`."""

    kind: str
    path: Path
    detail: str


#: kind -> heading of its section in the report.
PROBLEM_KINDS = {
    "damaged": "damaged or unreadable files (skipped by every reader)",
    "orphan": "provenance without result rows (hidden from the provenance view)",
    "duplicate": "duplicated units (a second file of a stored unit; the smallest name is kept)",
    "temp": f"stale temp files (hidden, untouched for over {STALE_TEMP_S // 60} min: a killed write)",
    "claim": "stale claims (left by a process that died)",
}


@dataclass
class StoreCheck:
    """What :func:`check_store` found in ``results_dir``."""

    results_dir: Path
    problems: list[StoreProblem] = field(default_factory=list)
    files: dict[str, int] = field(default_factory=dict)  # table -> files scanned
    notes: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        """The report: per kind of problem, each folder (relative to the results folder) once,
        then each file name and what is wrong with it on lines of their own, so that it fits 100
        columns with the store's own file names."""
        out = [f"store check of {self.results_dir}",
               "  " + ", ".join(f"{n} {t}" for t, n in self.files.items()) + " file(s)"]
        for kind, heading in PROBLEM_KINDS.items():
            items = [p for p in self.problems if p.kind == kind]
            if items:
                out.append(f"{heading}: {len(items)}")
                folder = None
                for p in items:
                    rel = Path(_rel(p.path, self.results_dir))
                    if rel.parent != folder:
                        folder = rel.parent
                        out.append(f"  {folder}/")
                    out += [f"    {rel.name}", f"      {p.detail}"]
        out += [f"note: {n}" for n in self.notes]
        if self.clean:
            out.append("no problems found")
        return out


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def check_store(results_dir: str | os.PathLike = DEFAULT_RESULTS_DIR) -> StoreCheck:
    """Find damaged or unreadable files (header, footer and schema of every Parquet file of the
    three tables), provenance whose unit has no readable rows, units stored in two files, stale
    hidden temp files and stale claims. Reads and changes nothing else; :func:`fix_store` repairs."""

    results_dir = Path(results_dir)
    report = StoreCheck(results_dir)
    schemas = {"results": RESULTS_SCHEMA, "provenance": PROVENANCE_SCHEMA, "samples": SAMPLES_SCHEMA,
               "diagnostics": DIAGNOSTICS_SCHEMA, "fidelity": FIDELITY_SCHEMA}
    sound: dict[str, list[Path]] = {}
    for table, schema in schemas.items():
        folder, pattern = _TABLE_FILES[table]
        root = results_dir / folder
        files = sorted(root.glob(pattern)) if root.is_dir() else []
        report.files[table] = len(files)
        sound[table] = []
        for f in files:
            try:
                problem = _deep_problem(f, schema)
            except FileNotFoundError:
                continue
            if problem is None:
                sound[table].append(f)
            else:
                report.problems.append(StoreProblem("damaged", f, problem.removeprefix("is ")))
    units: dict[str, list[Path]] = {}
    for table in ("results", "diagnostics"):
        by_uid: dict[str, list[Path]] = {}
        for f in sound[table]:
            by_uid.setdefault(f.stem.rsplit("-", 1)[-1], []).append(f)
        for uid, fs in by_uid.items():
            keep, *extra = sorted(fs)
            report.problems += [StoreProblem("duplicate", f, f"its unit is also in {keep.name} (kept)") for f in extra]
        if table == "results":
            units = by_uid
    for f in sound["provenance"] + sound["samples"]:
        uid = f.stem.rsplit("-", 1)[-1]
        if uid != "run" and uid not in units:
            report.problems.append(StoreProblem("orphan", f, f"unit {uid} has no readable rows file"))
    recorded = {f.stem.rsplit("-", 1)[-1] for f in sound["provenance"]}
    without = sum(1 for uid in units if uid not in recorded)
    if without:
        report.notes.append(f"{without} unit(s) have rows but no readable provenance record (the rows are valid)")
    now = time.time()
    live = 0
    for tmp in sorted(results_dir.rglob(".*.tmp")) if results_dir.is_dir() else []:
        if QUARANTINE_DIR in tmp.relative_to(results_dir).parts[:1]:
            continue
        try:
            age = now - tmp.stat().st_mtime
        except FileNotFoundError:
            continue
        if age > STALE_TEMP_S:
            report.problems.append(StoreProblem("temp", tmp, f"{tmp.stat().st_size} bytes, last written "
                                                             f"{age / 3600:.1f} h ago"))
        else:
            live += 1
    for claim in sorted((results_dir / CLAIMS_DIR).glob("*.claim")) if (results_dir / CLAIMS_DIR).is_dir() else []:
        try:
            fd = _try_lock(claim)
        except OSError:
            continue  # no file locks here: a claim's liveness cannot be told
        if fd is None:
            live += 1
            continue
        os.close(fd)  # released at once: a claimant arriving meanwhile retries (claim_unit)
        report.problems.append(StoreProblem("claim", claim, f"left by {_claim_holder(claim, since=False)}, now gone"))
    if live:
        report.notes.append(f"{live} write(s) or claim(s) in progress now (left alone)")
    return report


def fix_store(report: StoreCheck) -> tuple[Path, list[tuple[StoreProblem, Path]]]:
    """Move every file of ``report.problems`` to ``<results>/quarantine/<UTC timestamp>/`` under
    its path in the store (nothing is deleted; ``moved.tsv`` there lists why each file was
    moved). Returns that folder and (problem, new path) for each file moved; a file that is gone,
    or a claim that is held again, is left alone."""
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    moved = []
    for p in report.problems:
        fd = None
        if p.kind == "claim":  # moved while locked, so that no claimant can take it over meanwhile
            if not p.path.exists():
                continue
            try:
                fd = _try_lock(p.path)
            except OSError:
                continue
            if fd is None:
                continue  # claimed again since the check: live now
        try:
            dest = quarantine_files(report.results_dir, [(p.path, f"{p.kind}: {p.detail}")], stamp)
        finally:
            if fd is not None:
                os.close(fd)
        if dest:
            moved.append((p, dest[0]))
    return report.results_dir / QUARANTINE_DIR / stamp, moved
