"""Cached DuckDB queries behind the leaderboard pages (thin wrappers over mergebench.report).

The connection is cached per results directory and store signature (Streamlit's cache_resource);
every query result is cached per (directory, signature, filters) with st.cache_data, so switching
pages or filters back and forth is instant, and results landing while the app runs (a new
signature) are picked up on the next rerun.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import streamlit as st
from pyarrow import ArrowException

from mergebench import report
from mergebench.paths import suites_root
from mergebench.results import store

ENV_RESULTS = "MERGEBENCH_RESULTS"


def results_dir(argv: list[str] | None = None) -> Path:
    """`--results DIR` after `streamlit run app.py --`, else $MERGEBENCH_RESULTS, else ./results."""
    argv = list(argv or [])
    if "--results" in argv and argv.index("--results") + 1 < len(argv):
        return Path(argv[argv.index("--results") + 1])
    return Path(os.environ.get(ENV_RESULTS) or store.DEFAULT_RESULTS_DIR)


def signature(path: str) -> tuple:
    """Cheap fingerprint of the store: modification times of its partition folders (adding a unit file
    changes its folder's mtime), so caches refresh when results land while the app runs."""
    root = Path(path)
    dirs = ([root / "paper"] + [d for kind in ("runs", "provenance", "diagnostics") for d in root.glob(f"{kind}/*/*")]
            + list(root.glob("fidelity/*")))
    files = sorted((root / "paper").glob("*.csv"))  # a table edited in place leaves its folder's mtime alone
    return tuple(sorted((str(d), d.stat().st_mtime_ns) for d in dirs if d.is_dir())) + tuple(
        (f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)


# ------------------------------------------------------------------------------ disk cache
#: The ranking page's tables are also kept on disk (Parquet and JSON under
#: ``$MERGEBENCH_CACHE/leaderboard``), keyed by the store's signature and the code that computes
#: them, so a restarted server over an unchanged store draws its first page without connecting
#: to the store at all. ``MERGEBENCH_LEADERBOARD_CACHE=off`` disables it.
DISK_CACHE_ENV = "MERGEBENCH_LEADERBOARD_CACHE"
DISK_CACHE_DAYS = 14  # entries unused this long are removed when a new one is written


def _disk_dir() -> Path | None:
    """``$MERGEBENCH_LEADERBOARD_CACHE`` (``off``: no disk cache), else ``leaderboard/`` in
    ``$MERGEBENCH_CACHE`` or ``~/.cache/mergebench``."""
    env = os.environ.get(DISK_CACHE_ENV, "")
    if env.lower() in ("off", "0", "no"):
        return None
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get(report.CATALOG_ENV) or Path.home() / ".cache" / "mergebench").expanduser() / "leaderboard"


@functools.lru_cache(maxsize=1)
def code_key() -> str:
    """The code and definitions the cached tables depend on: mergebench's own modules, the
    leaderboard's and the suite files (names, sizes, mtimes), and the installed methods."""
    pkg = Path(report.__file__).resolve().parent
    files = sorted([*pkg.rglob("*.py"), *Path(__file__).resolve().parent.glob("*.py"),
                    *suites_root().glob("*.yaml")])
    parts = [report.catalog_path().name] + [f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _disk(name: str, path: str, sig: tuple, args: tuple, compute, *, kind: str = "parquet"):
    """`compute()`, or its result stored by an earlier server for the same store state and code."""
    folder = _disk_dir()
    if folder is None:
        return compute()
    key = hashlib.sha256(json.dumps([name, str(Path(path).resolve()), sig, args, code_key()],
                                    default=str).encode()).hexdigest()[:24]
    target = folder / f"{name}-{key}.{kind}"
    try:
        if kind == "parquet":
            table = pq.read_table(target)
            frame = table.to_pandas()
            dtypes = json.loads((table.schema.metadata or {}).get(b"mergebench_dtypes", b"{}"))
            for c, dt in dtypes.items():  # text columns come back as they were computed: object (None) or str
                if dt == "object" and c in frame and frame[c].dtype != object:
                    frame[c] = frame[c].astype(object).where(frame[c].notna(), None)
            return frame
        return json.loads(target.read_text(encoding="utf-8"))
    except (OSError, ValueError, ArrowException):
        pass
    value = compute()
    tmp = folder / f".{target.name}.{os.getpid()}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if kind == "parquet":
            table = pa.Table.from_pandas(value, preserve_index=False)
            meta = {**(table.schema.metadata or {}),
                    b"mergebench_dtypes": json.dumps({str(c): str(t) for c, t in value.dtypes.items()}).encode()}
            pq.write_table(table.replace_schema_metadata(meta), tmp)
        else:
            tmp.write_text(json.dumps(value), encoding="utf-8")
        os.replace(tmp, target)
        cutoff = time.time() - DISK_CACHE_DAYS * 86400
        for old in folder.glob("*.*"):
            if old.stat().st_atime < cutoff:
                old.unlink(missing_ok=True)
    except (OSError, ValueError, TypeError, ArrowException):  # a cache: an unwritable folder costs time only
        tmp.unlink(missing_ok=True)
    return value


@st.cache_resource(show_spinner=False, max_entries=4)
def _connection(path: str, sig: tuple):
    return report.connect(path)


def connection(path: str, sig: tuple | None = None):
    return _connection(path, signature(path) if sig is None else sig)


def _f(filters: dict) -> report.Filters:
    return report.Filters(**filters)


@st.cache_data(show_spinner=False)
def choices(path: str, sig: tuple) -> dict:
    return _disk("choices", path, sig, (), lambda: report.choices(connection(path, sig)), kind="json")


@st.cache_data(show_spinner=False)
def run_groups(path: str, sig: tuple):
    return _disk("groups", path, sig, (), lambda: report.run_groups(connection(path, sig)))


@st.cache_data(show_spinner="Ranking methods ...")
def ranking(path: str, sig: tuple, filters: dict, seed: int = report.BOOT_SEED):
    return _disk("ranking", path, sig, (sorted(filters.items()), seed),
                 lambda: report.ranking(connection(path, sig), _f(filters), seed=seed))


@st.cache_data(show_spinner=False)
def task_scores(path: str, sig: tuple, filters: dict, seed: int = report.BOOT_SEED):
    """The per-task table of the ranking page, in the ranking's order."""
    return _disk("tasks", path, sig, (sorted(filters.items()), seed),
                 lambda: report.task_scores(connection(path, sig), _f(filters), ranking(path, sig, filters, seed)))


@st.cache_data(show_spinner=False)
def tuned(path: str, sig: tuple, filters: dict):
    """Per (method, params): `tuned (trials, validation docs)` for settings chosen by `mergebench sweep --tune`;
    params as the ranking shows them (:func:`report.config_params`)."""
    count = _disk("tuning", path, sig, (), lambda: {"k": int(report.df(
        connection(path, sig), "SELECT count(*) AS k FROM provenance WHERE extra_json LIKE '%\"tuning\"%'")["k"].iloc[0])},
        kind="json")
    if not count["k"]:
        return pd.DataFrame(columns=["method", "params", "tuned"])  # nothing tuned: no need to load the sweep room
    con = connection(path, sig)
    from mergebench.sweep.tune import tuned_variants  # imports torch (via the method API): only when needed

    where, params = _f(filters).where()
    t = tuned_variants(con, where, params)
    t = t.assign(params=t["params"].map(report.config_params))
    return t.groupby(["method", "params"], as_index=False)["tuned"].agg(
        lambda x: "; ".join(sorted(set(x) - {"default"})) or "default")


def _paper(filters: dict) -> report.Filters:
    """Published rows: the suite's in any profile and pool (the papers' own models)."""
    return report.Filters(**{**filters, "profile": None, "pool": None})


@st.cache_data(show_spinner=False)
def scaling(path: str, sig: tuple, filters: dict):
    con = connection(path, sig)
    return report.scaling(con, _f(filters)), report.paper_scaling(con, _paper(filters))


@st.cache_data(show_spinner=False)
def task_vector_norms(path: str, sig: tuple, filters: dict):
    return report.task_vector_norms(connection(path, sig), _f(filters))


@st.cache_data(show_spinner=False)
def per_task(path: str, sig: tuple, filters: dict):
    return report.per_task(connection(path, sig), _f(filters))


@st.cache_data(show_spinner=False)
def paper_per_task(path: str, sig: tuple, filters: dict):
    return report.paper_per_task(connection(path, sig), _paper(filters))


@st.cache_data(show_spinner=False)
def method_rows(path: str, sig: tuple, method: str):
    return report.method_rows(connection(path, sig), method)


@st.cache_data(show_spinner=False)
def paper_method_rows(path: str, sig: tuple, method: str):
    return report.df(connection(path, sig), """
        SELECT "table", suite, profile, pool, n, label, metric, value, note FROM paper
        WHERE method = ? ORDER BY "table", pool, n, metric""", [method])


@st.cache_data(show_spinner=False)
def method_info():
    return report.method_info()





@st.cache_data(show_spinner="Testing the papers' findings on this suite ...")
def fidelity(path: str, sig: tuple, suite: str) -> tuple[pd.DataFrame, str]:
    """(the suite's fidelity rows, where they come from): the rows `mergebench fidelity` stored when
    they were computed from what the store holds now, else computed here (same seed, same digits)."""
    from mergebench import fidelity as fid  # scipy: loaded only for this page

    con = connection(path, sig)
    stored = report.df(con, "SELECT * FROM fidelity WHERE suite = ?", [suite])
    if len(stored) and set(stored["inputs_hash"]) == {fid.inputs_hash(con)}:
        when = pd.Timestamp(stored["computed_at"].max()).strftime("%Y-%m-%d %H:%M UTC")
        return stored[fid.COLUMNS], f"stored by `mergebench fidelity` on {when}"
    try:
        frame = fid.fidelity_table(con, suite)
    except fid.FidelityError:
        return pd.DataFrame(columns=fid.COLUMNS), ""
    why = "no stored rows" if stored.empty else "the stored rows predate the store's current results"
    return frame, f"computed now ({why}; `mergebench fidelity` stores them)"
