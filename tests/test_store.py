"""The Parquet results store and its DuckDB views."""

from __future__ import annotations

import threading
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mergebench.results import store
from mergebench.results.store import Unit

BRIEF_COLUMNS = ["run_id", "unit_id", "source", "suite", "suite_version", "profile", "pool", "base_model", "method",
                 "method_version", "params_json", "seed", "subset", "n", "role", "task", "metric", "value", "stderr",
                 "n_docs", "normalized_value", "created_at"]


def merged(subset=("e1", "e2"), method="karcher", **kw) -> Unit:
    base = dict(suite="inthewild", suite_version="1", profile="embedded", pool="smol", base_model="smol-135m",
                method_version="1.0", params={"t": 0.5, "iters": 10}, seed=7, doc_index_hash="abc")
    base.update(kw)
    return Unit(role="merged", subset=subset, method=method, **base)


def ref(role: str, name: str, **kw) -> Unit:
    base = dict(suite="inthewild", suite_version="1", profile="embedded", pool="smol", base_model="smol-135m",
                seed=7, doc_index_hash="abc")
    base.update(kw)
    return Unit(role=role, subset=(name,), **base)


ROWS = [
    {"task": "mb_capitals", "metric": "acc", "value": 0.75, "stderr": 0.04, "n_docs": 120},
    {"task": "mb_capitals", "metric": "acc_norm", "value": 0.70, "stderr": 0.04, "n_docs": 120},
    {"task": "mb_sentiment", "metric": "acc", "value": 0.5, "n_docs": 100},
]


# ---------------------------------------------------------------------------------- schema


def test_schema_has_the_documented_columns():
    assert store.RESULTS_SCHEMA.names == BRIEF_COLUMNS
    for name, type_, doc in store.schema_doc(store.RESULTS_SCHEMA) + store.schema_doc(store.PROVENANCE_SCHEMA):
        assert len(doc) > 10, name
    prov = set(store.PROVENANCE_SCHEMA.names)
    assert {"torch_version", "transformers_version", "lm_eval_version", "mergebench_version", "git_sha", "cpu_model",
            "cpu_cores", "gpu_name", "merge_wall_s", "merge_peak_rss_bytes", "gpu_peak_mem_bytes",
            "eval_wall_s"} <= prov
    assert set(store.collect_environment("cpu")) <= prov


# -------------------------------------------------------------------------------- unit ids


def test_unit_id_is_a_content_hash():
    u = merged()
    assert u.unit_id == merged().unit_id
    assert len(u.unit_id) == 20 and all(c in "0123456789abcdef" for c in u.unit_id)
    # params key order does not matter; every component of the work does
    assert merged(params={"iters": 10, "t": 0.5}).unit_id == u.unit_id
    variants = [
        merged(subset=("e2", "e1")), merged(subset=("e1", "e3")), merged(method="linear"),
        merged(method_version="1.1"), merged(params={"t": 0.6, "iters": 10}), merged(seed=8),
        merged(suite_version="2"), merged(profile="paper"), merged(doc_index_hash="abd"), merged(pool="other"),
        merged(base_model="other"), merged(extra={"lm_eval": "0.4.13"}), merged(suite="openllm"),
    ]
    ids = {v.unit_id for v in variants}
    assert len(ids) == len(variants) and u.unit_id not in ids
    # a pool's base model and its first expert are different units even with the same name
    assert ref("base", "x").unit_id != ref("expert", "x").unit_id


def test_doc_index_hash_ignores_index_order_only():
    a = store.doc_index_hash({"t1": [3, 1, 2], "t2": [0]})
    assert a == store.doc_index_hash({"t2": [0], "t1": [1, 2, 3]})
    assert a != store.doc_index_hash({"t1": [1, 2, 4], "t2": [0]})
    assert a != store.doc_index_hash({"t1": [1, 2, 3], "t3": [0]})


def test_unit_validation():
    with pytest.raises(ValueError, match="role"):
        Unit(suite="s", role="teacher", subset=("a",))
    with pytest.raises(ValueError, match="method"):
        Unit(suite="s", role="merged", subset=("a", "b"))
    with pytest.raises(TypeError):
        store.unit_id(suite="s", suite_version="1", profile=None, role="expert", subset="abc")
    assert ref("base", "b").n == 0 and ref("expert", "e").n == 1 and merged(subset=("a", "b", "c")).n == 3


# ------------------------------------------------------------------------- write and read


def test_write_read_round_trip_and_layout(tmp_path):
    u = merged()
    res = store.write_unit(u, pd.DataFrame(ROWS), run_id="run1", results_dir=tmp_path)
    assert res.written and res.unit_id == u.unit_id
    assert res.path == tmp_path / "runs" / "suite=inthewild" / "method=karcher" / f"part-run1-{u.unit_id}.parquet"
    r = store.write_unit(ref("base", "smol-135m"), ROWS[:1], run_id="run1", results_dir=tmp_path)
    assert r.path.parent.name == "method=_reference"
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob(".*"))

    got = store.sql("SELECT * FROM results WHERE role = 'merged' ORDER BY task, metric", tmp_path)
    assert list(got.columns) == BRIEF_COLUMNS
    assert len(got) == 3
    assert got["value"].tolist() == [0.75, 0.70, 0.5]
    assert got["stderr"].iloc[2] != got["stderr"].iloc[2]  # missing stderr is null
    assert list(got["subset"].iloc[0]) == ["e1", "e2"]
    assert set(got["n"]) == {2} and set(got["params_json"]) == {'{"iters":10,"t":0.5}'}
    assert set(got["source"]) == {"run"} and set(got["run_id"]) == {"run1"}
    assert all(t.utcoffset().total_seconds() == 0 for t in got["created_at"])
    base = store.sql("SELECT method, n, subset, role FROM results WHERE role = 'base'", tmp_path)
    assert base["method"].isna().all() and base["n"].tolist() == [0] and list(base["subset"][0]) == ["smol-135m"]
    # the Parquet file itself carries the schema (types and docs)
    t = pq.read_table(res.path)
    assert t.schema.field("subset").type == pa.list_(pa.string())
    assert t.schema.metadata[b"mergebench_schema_version"] == store.SCHEMA_VERSION.encode()


def test_partition_folders_are_quoted(tmp_path):
    u = merged(method="my/plugin method", suite="a b")
    res = store.write_unit(u, ROWS, run_id="r", results_dir=tmp_path)
    assert res.path.parent.name == "method=my%2Fplugin%20method" and res.path.parent.parent.name == "suite=a%20b"
    got = store.sql("SELECT DISTINCT suite, method FROM results", tmp_path)
    assert got.values.tolist() == [["a b", "my/plugin method"]]  # values come from the file, not the folder


def test_same_unit_twice_is_not_duplicated(tmp_path):
    u = merged()
    assert not store.has_unit(u, tmp_path)
    assert store.write_unit(u, ROWS, run_id="run1", results_dir=tmp_path).written
    assert store.has_unit(u, tmp_path) and store.has_unit(u.unit_id, tmp_path)
    again = store.write_unit(u, ROWS, run_id="run1", results_dir=tmp_path)  # same run retries
    other = store.write_unit(u, ROWS, run_id="run2", results_dir=tmp_path)  # a resumed / repeated run
    assert not again.written and not other.written
    assert store.sql("SELECT count(*) c FROM results", tmp_path)["c"][0] == len(ROWS)
    assert store.completed_units(tmp_path) == {u.unit_id}
    assert len(list((tmp_path / "runs").rglob("*.parquet"))) == 1


def test_concurrent_writers_of_one_unit_leave_one_file(tmp_path):
    u = merged()
    n = 8
    barrier = threading.Barrier(n)
    results = [None] * n

    def go(i):
        barrier.wait()
        results[i] = store.write_unit(u, ROWS, run_id=f"run{i}", results_dir=tmp_path)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    files = list((tmp_path / "runs").rglob("*.parquet"))
    assert len(files) == 1
    assert all(r.unit_id == u.unit_id for r in results) and any(r.written for r in results)
    assert store.sql("SELECT count(*) c FROM results", tmp_path)["c"][0] == len(ROWS)


def test_racing_exclusive_writers_leave_one_provenance_record(tmp_path):
    # only the writer whose rows file won commits its provenance (two sweeps used to leave a
    # provenance file per racer: 18 for 17 units)
    u = merged()
    barrier = threading.Barrier(6)

    def go(i):
        barrier.wait()
        store.write_unit(u, ROWS, run_id=f"run{i}", results_dir=tmp_path, exclusive=True,
                         provenance={"eval_wall_s": float(i)})

    threads = [threading.Thread(target=go, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(list((tmp_path / "runs").rglob("*.parquet"))) == 1
    assert len(list((tmp_path / "provenance").rglob("*.parquet"))) == 1
    (run,) = set(store.sql("SELECT DISTINCT run_id FROM results", tmp_path)["run_id"])
    assert store.sql("SELECT run_id FROM provenance", tmp_path)["run_id"].tolist() == [run]  # the winner's record
    assert not list(tmp_path.rglob("*.tmp"))


def test_concurrent_writers_of_different_units_all_land(tmp_path):
    units = [merged(subset=(f"e{i}", f"e{i + 1}")) for i in range(12)]

    def go(chunk):
        for u in chunk:
            store.write_unit(u, ROWS, run_id="r", results_dir=tmp_path)

    threads = [threading.Thread(target=go, args=(units[i::3],)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.completed_units(tmp_path) == {u.unit_id for u in units}
    assert store.sql("SELECT count(*) c FROM results", tmp_path)["c"][0] == 12 * len(ROWS)


def test_interrupted_write_loses_nothing_already_written(tmp_path, monkeypatch):
    done = merged(subset=("a", "b"))
    store.write_unit(done, ROWS, run_id="r", results_dir=tmp_path)
    real = pq.write_table

    def crash(table, where, **kw):  # die half way through the file
        real(table, where, **kw)
        with open(where, "r+b") as fh:
            fh.truncate(100)
        raise KeyboardInterrupt

    monkeypatch.setattr(pq, "write_table", crash)
    with pytest.raises(KeyboardInterrupt):
        store.write_unit(merged(subset=("c", "d")), ROWS, run_id="r", results_dir=tmp_path)
    monkeypatch.setattr(pq, "write_table", real)
    # the finished unit is intact, the interrupted one is absent (not half-present) and retryable
    assert store.completed_units(tmp_path) == {done.unit_id}
    assert store.sql("SELECT count(*) c FROM results", tmp_path)["c"][0] == len(ROWS)
    assert not list(tmp_path.rglob("*.tmp"))
    assert store.write_unit(merged(subset=("c", "d")), ROWS, run_id="r2", results_dir=tmp_path).written


def test_stray_temp_files_are_invisible(tmp_path):
    store.write_unit(merged(), ROWS, run_id="r", results_dir=tmp_path)
    part = next((tmp_path / "runs").rglob("*.parquet")).parent
    (part / ".part-r-0123456789abcdef0123.parquet.deadbeef.tmp").write_bytes(b"PAR1 garbage")
    assert store.sql("SELECT count(*) c FROM results", tmp_path)["c"][0] == len(ROWS)


@pytest.mark.parametrize("rows, match", [
    ([{"task": "t", "metric": "acc", "value": 0.1, "oops": 1}], "unknown columns"),
    ([{"task": "t", "metric": "acc"}], "required column"),
    ([{"task": "t", "metric": "acc", "value": 0.1}, {"task": "t", "metric": "acc", "value": 0.2}], "repeat"),
    ([], "no rows"),
    ([{"task": "t", "metric": "acc", "value": None}], "null"),
    ([{"task": "t", "metric": "acc", "value": "high"}], "value"),
    ([{"task": "t", "metric": "acc", "value": 0.1, "role": "base"}], "set by the unit"),
])
def test_bad_rows_are_rejected_with_a_reason(tmp_path, rows, match):
    with pytest.raises(ValueError, match=match):
        store.write_unit(merged(), rows, run_id="r", results_dir=tmp_path)
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.parquet"))


def test_bad_run_id_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="run_id"):
        store.write_unit(merged(), ROWS, run_id="a/b", results_dir=tmp_path)
    assert store.new_run_id() != store.new_run_id()


# ----------------------------------------------------------------------------- provenance


def test_provenance_is_written_with_the_unit(tmp_path):
    u = merged()
    prov = {**store.collect_environment("cpu"), "merge_wall_s": 1.5, "merge_peak_rss_bytes": 123, "eval_wall_s": 9.0,
            "n_threads": 2}
    store.write_unit(u, ROWS, run_id="r", results_dir=tmp_path, provenance=prov)
    store.write_provenance({"eval_wall_s": 99.0}, run_id="r", suite="inthewild", results_dir=tmp_path)  # run-level
    got = store.sql("SELECT * FROM provenance ORDER BY unit_id NULLS LAST", tmp_path)
    assert len(got) == 2
    row = got.iloc[0]
    assert row["unit_id"] == u.unit_id and row["method"] == "karcher" and row["doc_index_hash"] == "abc"
    assert row["merge_wall_s"] == 1.5 and row["merge_peak_rss_bytes"] == 123 and row["cpu_cores"] >= 1
    assert row["python_version"].count(".") == 2 and row["torch_version"]
    assert row["extra_json"] == '{"n_threads":2}'
    assert pd.isna(got.iloc[1]["unit_id"]) and got.iloc[1]["eval_wall_s"] == 99.0
    joined = store.sql("SELECT count(*) c FROM results JOIN provenance USING (unit_id)", tmp_path)
    assert joined["c"][0] == len(ROWS)


def test_measure_records_wall_time_and_this_blocks_peak_memory():
    out: dict = {}
    big = np.ones(40_000_000 // 8)  # 40 MB resident before the block
    del big
    with store.measure("merge", out):
        x = np.ones(24_000_000 // 8)
        before_free = store.peak_rss_bytes()
        del x
    assert out["merge_wall_s"] >= 0
    assert out["merge_peak_rss_bytes"] == pytest.approx(before_free, rel=0.05)
    with store.measure("eval", out):
        pass
    assert "eval_wall_s" in out


# ----------------------------------------------------------------------------- the views


def test_empty_directory_has_every_view_with_zero_rows(tmp_path):
    con = store.connect(tmp_path / "nothing_here")
    for view, schema in [("results", store.RESULTS_SCHEMA), ("provenance", store.PROVENANCE_SCHEMA),
                         ("paper", store.PAPER_SCHEMA)]:
        df = con.sql(f"SELECT * FROM {view}").to_arrow_table().to_pandas()
        assert len(df) == 0 and list(df.columns) == schema.names, view
    assert con.execute("SELECT count(*) FROM all_results").fetchone()[0] == 0
    assert len(store.sql("SELECT task, avg(value) FROM results GROUP BY task", tmp_path)) == 0


def test_all_results_unions_runs_and_paper(tmp_path):
    store.write_unit(merged(), ROWS, run_id="r", results_dir=tmp_path)
    paper = tmp_path / "paper"
    paper.mkdir()
    (paper / "t.csv").write_text("table,suite,method,role,n,task,metric,value,note\n"
                                 "seedX_table1,inthewild,karcher,merged,2,mb_capitals,acc,0.8,hand-made\n")
    df = store.sql("SELECT source, method, value, \"table\", note FROM all_results ORDER BY source, value", tmp_path)
    assert df["source"].tolist() == ["paper", "run", "run", "run"]
    assert df["table"].tolist()[0] == "seedX_table1" and df["table"][1:].isna().all()
    both = store.sql("SELECT source, avg(value) v FROM all_results WHERE task = 'mb_capitals' AND metric = 'acc' "
                     "GROUP BY source ORDER BY source", tmp_path)
    assert both["v"].tolist() == [0.8, 0.75]
    rows = store.paper_rows(paper)
    assert len(rows) == 1 and rows["n"].iloc[0] == 2 and rows["source"].iloc[0] == "paper"


def test_views_see_files_written_after_connect_and_old_schema_files(tmp_path):
    store.write_unit(merged(), ROWS, run_id="r", results_dir=tmp_path)
    con = store.connect(tmp_path)
    store.write_unit(merged(subset=("x", "y")), ROWS, run_id="r", results_dir=tmp_path)
    assert con.execute("SELECT count(DISTINCT unit_id) FROM results").fetchone()[0] == 2
    # a file from an older schema (fewer columns) still reads, missing columns as NULL
    old = pa.table({"run_id": ["old"], "unit_id": ["f" * 20], "source": ["run"], "suite": ["inthewild"],
                    "role": ["base"], "task": ["t"], "metric": ["acc"], "value": [0.3]})
    pq.write_table(old, tmp_path / "runs" / "suite=inthewild" / "method=karcher" / f"part-old-{'f' * 20}.parquet")
    got = store.connect(tmp_path).execute("SELECT stderr, subset FROM results WHERE run_id = 'old'").fetchall()
    assert got == [(None, None)]


def test_sql_parameters_and_list_queries(tmp_path):
    for s in [("a", "b"), ("a", "c"), ("b", "c")]:
        store.write_unit(merged(subset=s), ROWS, run_id="r", results_dir=tmp_path)
    df = store.sql("SELECT DISTINCT unit_id FROM results WHERE list_contains(subset, ?)", tmp_path, params=["a"])
    assert len(df) == 2
    assert len(store.read_results(tmp_path, where="n = ?", params=[2])) == 9
