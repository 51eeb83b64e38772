"""Cached DuckDB queries behind the leaderboard pages (thin wrappers over mergebench.report).

The connection is cached per results directory and store signature (Streamlit's cache_resource);
every query result is cached per (directory, signature, filters) with st.cache_data, so switching
pages or filters back and forth is instant, and results landing while the app runs (a new
signature) are picked up on the next rerun.
"""

from __future__ import annotations

import os
from pathlib import Path

import streamlit as st

from mergebench import report
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
    dirs = [root / "paper"] + [d for kind in ("runs", "provenance", "diagnostics") for d in root.glob(f"{kind}/*/*")]
    return tuple(sorted((str(d), d.stat().st_mtime_ns) for d in dirs if d.is_dir()))


@st.cache_resource(show_spinner=False, max_entries=4)
def _connection(path: str, sig: tuple):
    return report.connect(path)


def connection(path: str, sig: tuple | None = None):
    return _connection(path, signature(path) if sig is None else sig)


def _f(filters: dict) -> report.Filters:
    return report.Filters(**filters)


@st.cache_data(show_spinner=False)
def choices(path: str, sig: tuple) -> dict:
    return report.choices(connection(path, sig))


@st.cache_data(show_spinner=False)
def run_groups(path: str, sig: tuple):
    return report.run_groups(connection(path, sig))


@st.cache_data(show_spinner="Ranking methods ...")
def ranking(path: str, sig: tuple, filters: dict, seed: int = report.BOOT_SEED):
    return report.ranking(connection(path, sig), _f(filters), seed=seed)


@st.cache_data(show_spinner=False)
def task_scores(path: str, sig: tuple, filters: dict, seed: int = report.BOOT_SEED):
    """The per-task table of the ranking page, in the ranking's order."""
    return report.task_scores(connection(path, sig), _f(filters), ranking(path, sig, filters, seed))


@st.cache_data(show_spinner=False)
def tuned(path: str, sig: tuple, filters: dict):
    """Per (method, params): `tuned (trials, validation docs)` for settings chosen by `mergebench sweep --tune`;
    params as the ranking shows them (:func:`report.config_params`)."""
    from mergebench.sweep.tune import tuned_variants

    where, params = _f(filters).where()
    t = tuned_variants(connection(path, sig), where, params)
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



