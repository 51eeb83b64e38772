"""Leaderboard ranking page with one million result rows (target: renders in <= 2 s).

Run: ``.venv/bin/pytest benchmarks/bench_leaderboard.py --benchmark-only`` or
``.venv/bin/python benchmarks/bench_leaderboard.py [ROWS]`` (prints the timings).

A synthetic store (20 methods x sizes 2..8 x 31 tasks, plus base/expert references and merge
provenance) is written once; each round then renders the ranking page *cold* in Streamlit's
AppTest: caches cleared, so the DuckDB connection, the headline-metric scan over every row, the
per-unit reduction, references, bootstrap CIs, rank intervals and merge cost are all recomputed
(the leaderboard's disk cache is switched off for it).

First load in a browser (``tests/test_leaderboard_browser.py::test_first_load_of_the_ranking_page_on_the_committed_store``,
a fresh server on the committed ``results/``, request to ranking drawn), 2026-12-01, 2 cores shared
with other jobs (load average 5-7, so wall times are 2-4x an idle machine's):

    store state seen before (disk cache hit): wall 2.94 s, server CPU 0.96 s (a bare Streamlit page
                                              with one table: wall 3.15 s, server CPU 0.75 s, same load)
    first server after a change (miss):       wall 3.7-6.9 s, server CPU 1.8-2.7 s
    before this change (torch imported through the method registry, Styler, Altair, suites parsed
                                              five times): wall 8.3-10.6 s, server CPU 5.5-5.7 s

Server CPU seconds are what an idle machine needs in wall time for the script (the browser adds
its own start-up); the idle target is <= 2 s.

Idle (other jobs paused), 2026-12-01, a slower 2-core AMD EPYC machine, disk cache hit, measured
with a standalone selenium script (request to table drawn):

    a bare Streamlit page with one table, new browser:        2.30-2.38 s (same browser, new server: 0.79-0.88 s)
    the ranking page, `streamlit run` (unwarmed): new browser 4.9-6.4 s, same browser and a new
      server 3.0-3.7 s (the browser test before it started the server as below)
    the ranking page, warmed (`python -m mergebench.leaderboard.serve`, what `mergebench
      leaderboard` runs): new browser 3.6-4.8 s, same browser and a new server 1.63-2.07 s

A new browser pays ~1.5 s compiling Streamlit's front end whatever the page, so <= 2 s holds only
for a reader whose browser has opened the leaderboard before; the app's own script is ~0.5 s of
server CPU of the warmed first load (py-spy).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

APP = str(ROOT / "leaderboard" / "app.py")
TARGET_S = 2.0


def make_store(path: Path, rows: int = 1_000_000) -> dict:
    from mergebench.leaderboard import synthetic

    return synthetic.bulk_store(path, n_rows=rows)


def render_ranking_cold(results_dir: Path) -> float:
    """Seconds for one cold AppTest render of the ranking page (raises on an app exception)."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    os.environ["MERGEBENCH_RESULTS"] = str(results_dir)
    os.environ["MERGEBENCH_LEADERBOARD_CACHE"] = "off"  # cold: recomputed, not read from the disk cache
    st.cache_data.clear()
    st.cache_resource.clear()
    at = AppTest.from_file(APP, default_timeout=120)
    t0 = time.perf_counter()
    at.run()
    dt = time.perf_counter() - t0
    assert not at.exception, [e.message for e in at.exception]
    run = at.dataframe[0].value
    assert (run["source"].str.contains("reproduced")).sum() == 20
    return dt


def ranking_only(results_dir: Path) -> dict:
    """The ranking computation without Streamlit, split into connect and ranking."""
    from mergebench import report

    t0 = time.perf_counter()
    con = report.connect(results_dir)
    t1 = time.perf_counter()
    report.ranking(con, report.Filters(suite="openllm"))
    t2 = time.perf_counter()
    con.close()
    return {"connect_s": t1 - t0, "ranking_s": t2 - t1}


def test_ranking_page_1m_rows(benchmark, tmp_path_factory):
    d = tmp_path_factory.mktemp("lb1m") / "results"
    info = make_store(d)
    assert info["rows"] >= 990_000
    dt = benchmark.pedantic(render_ranking_cold, args=(d,), rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(info, **ranking_only(d))
    assert benchmark.stats.stats.median <= TARGET_S, f"ranking page took {benchmark.stats.stats.median:.2f} s"
    del dt


if __name__ == "__main__":
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "results"
        t = time.perf_counter()
        info = make_store(d, rows)
        print(f"store: {info['rows']:,} rows, {info['units']:,} units, written in {time.perf_counter() - t:.1f} s")
        print("computation only:", {k: round(v, 3) for k, v in ranking_only(d).items()})
        times = [render_ranking_cold(d) for _ in range(4)]
        print("cold AppTest render of the ranking page (s):", [round(x, 3) for x in times],
              f"median of last 3 = {sorted(times[1:])[1]:.3f} s (target {TARGET_S} s)")
