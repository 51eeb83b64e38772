"""What the leaderboard and `mergebench report` show: seeded bootstrap, ties, one suite at a time,
URL-mirrored filters, table layout, paper matching, colours, report formats, the server's lifetime."""

from __future__ import annotations

import base64
import html.parser
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from mergebench.leaderboard import charts, synthetic  # noqa: E402
from mergebench.results import metrics, store  # noqa: E402
from mergebench import report  # noqa: E402
from mergebench.cli import app as cli  # noqa: E402

APP = str(ROOT / "leaderboard" / "app.py")
runner = CliRunner()


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    d = tmp_path_factory.mktemp("out") / "results"
    synthetic.small_store(d, methods={"linear": 0.0, "ties": 0.05, "karcher": 0.08, "slerp": -0.03}, sizes=(2, 3))
    return d


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """karcher repeats linear's rows exactly: the two tie on every unit."""
    d = tmp_path_factory.mktemp("tie") / "results"
    synthetic.small_store(d, methods={"linear": 0.05, "karcher": 0.05, "ties": -0.05}, sizes=(2,),
                          clones={"karcher": "linear"})
    return d


def run_app(results_dir, monkeypatch, **query) -> AppTest:
    monkeypatch.setenv("MERGEBENCH_RESULTS", str(results_dir))
    at = AppTest.from_file(APP, default_timeout=90)
    for k, v in query.items():
        at.query_params[k] = v
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def md_table(md: str, after: str) -> pd.DataFrame:
    """The first Markdown table after the line containing `after`, as text cells."""
    lines = md[md.index(after):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return pd.DataFrame(rows[2:], columns=rows[0])


# ------------------------------------------------------------------------------ bootstrap


def test_bootstrap_is_seeded_recorded_and_matches_a_pcg64_reference(syn):
    f = report.Filters(suite="inthewild", profile="embedded", pool="smol")
    with report.connect(syn) as con:
        a = report.run_ranking(con, f)
    with report.connect(syn) as con:  # a second load of the store
        b = report.run_ranking(con, f)
        c = report.run_ranking(con, f, seed=1)
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert a.attrs["bootstrap"] == {"seed": 0, "n_boot_ci": report.N_BOOT_CI, "n_boot_rank": report.N_BOOT_RANK}
    assert not np.array_equal(a["ci_low"], c["ci_low"])  # the seed is really used
    # independent reference: each method's unit means, sorted, resampled by Generator(PCG64(0))
    units = store.sql("""SELECT unit_id, any_value(method) AS method, avg(value) AS s FROM results
                         WHERE role = 'merged' AND metric = 'acc' GROUP BY unit_id""", syn)
    for row in a.itertuples():
        x = np.sort(units[units["method"] == row.method]["s"].to_numpy(np.float64))
        rng = np.random.Generator(np.random.PCG64(0))
        means = x[rng.integers(0, x.size, size=(report.N_BOOT_CI, x.size))].mean(axis=1)
        lo, hi = np.quantile(means, [0.025, 0.975])
        assert (row.ci_low, row.ci_high) == (lo, hi), row.method
    with pytest.raises(metrics.BootstrapError, match="seed must be a non-negative integer, got None"):
        report.run_ranking(report.connect(syn), f, seed=None)


def test_app_and_report_show_identical_intervals(syn, monkeypatch, tmp_path):
    at = run_app(syn, monkeypatch)
    shown = at.dataframe[0].value.set_index("method")
    md = runner.invoke(cli, ["report", "--results", str(syn), "--suite", "inthewild"])
    assert md.exit_code == 0, md.output
    rep = md_table(md.stdout, "inthewild / embedded / smol").set_index("method")
    assert list(rep.index) == list(shown.index)
    assert rep["95% CI"].tolist() == shown["ci"].tolist()  # the same digits, to the last one
    assert rep["rank interval"].tolist() == shown["ranks"].tolist()
    assert rep["P(best)"].tolist() == [f"{v:.2f}" for v in shown["p_best"]]
    note = report.bootstrap_note(0)
    assert note in [c.value for c in at.caption] and note in md.stdout and "seed 0" in note and "1,000" in note
    # the CSV carries the unrounded interval: equal to a direct call bit for bit
    csv = report.write_report(syn, suite="inthewild", fmt="csv", out=tmp_path / "r.csv")
    t = pd.read_csv(tmp_path / "r.csv")
    run = t[t["source"] == "run"].set_index("variant")
    direct = report.run_ranking(report.connect(syn), report.Filters(suite="inthewild", profile="embedded",
                                                                     pool="smol")).set_index("variant")
    assert run.loc[direct.index, "ci_low"].tolist() == direct["ci_low"].tolist()
    assert run.loc[direct.index, "ci_high"].tolist() == direct["ci_high"].tolist()
    assert set(run["bootstrap_seed"]) == {0} and set(run["n_boot_ci"]) == {report.N_BOOT_CI}
    assert csv == (tmp_path / "r.csv").read_text()


def test_report_seed_option_changes_the_intervals(syn):
    a = runner.invoke(cli, ["report", "--results", str(syn), "--suite", "inthewild", "--seed", "7"])
    assert a.exit_code == 0 and report.bootstrap_note(7) in a.stdout
    b = runner.invoke(cli, ["report", "--results", str(syn), "--suite", "inthewild"])
    assert md_table(a.stdout, "inthewild / embedded")["95% CI"].tolist() != \
        md_table(b.stdout, "inthewild / embedded")["95% CI"].tolist()


# ----------------------------------------------------------------------------------- ties


def test_exact_ties_share_the_rank_and_split_p_best(tied, monkeypatch):
    with report.connect(tied) as con:
        r = report.run_ranking(con, report.Filters(suite="inthewild")).set_index("method")
    assert r.loc["linear", "score"] == r.loc["karcher", "score"]  # the same unit values
    assert r["rank_label"].to_dict() == {"linear": "=1", "karcher": "=1", "ties": "3"}
    assert r.loc["linear", "p_best"] == r.loc["karcher", "p_best"] == pytest.approx(0.5)
    assert r["p_best"].sum() == pytest.approx(1.0, abs=1e-12)
    at = run_app(tied, monkeypatch)
    shown = at.dataframe[0].value.set_index("method")
    assert shown["rank_label"].to_dict() == {"linear": "=1", "karcher": "=1", "ties": "3"}
    assert shown["p_best"].sum() == pytest.approx(1.0, abs=1e-12)
    md = report.write_report(tied, fmt="md")
    t = md_table(md, "inthewild / embedded / smol").set_index("method")
    assert t["rank"].to_dict() == {"linear": "=1", "karcher": "=1", "ties": "3"}
    assert t.loc[["linear", "karcher"], "P(best)"].tolist() == ["0.50", "0.50"]


# ------------------------------------------------------------------------ one suite at once


def test_a_selection_over_two_suites_is_not_ranked(tmp_path):
    synthetic.small_store(tmp_path, methods={"linear": 0.0, "ties": 0.02}, sizes=(2,))
    synthetic.small_store(tmp_path, suite="openllm", methods={"linear": 0.0}, sizes=(2,))
    con = report.connect(tmp_path)
    with pytest.raises(report.SelectionError, match=r"pools 2 result groups \(inthewild@1 / embedded / smol"):
        report.run_ranking(con, report.Filters())
    groups = report.ranking_groups(con, report.Filters())
    assert [g["suite"] for g, _ in groups] == ["inthewild", "openllm"]
    for g, t in groups:
        assert set(t[t["source"] == "run"]["n_units"]) == {15}  # C(6, 2) subsets of this suite only


def test_suite_selector_lists_suites_only_and_reports_a_url_value_matching_nothing(syn, monkeypatch):
    at = run_app(syn, monkeypatch, suite="homogeneous")
    options = at.selectbox(key="suite").options
    assert "(all)" not in options and "inthewild" in options
    warn = " ".join(w.value for w in at.warning)
    assert "`?suite=homogeneous`" in warn and "matches nothing" in warn and "inthewild" in warn
    assert all(s in warn for s in options)  # it says what exists
    assert at.selectbox(key="suite").value == "inthewild" and at.query_params["suite"] == "inthewild"
    at = run_app(syn, monkeypatch, suite="inthewild", n="7")
    assert any("`?n=7`" in w.value and "2, 3" in w.value for w in at.warning)


def test_filters_come_from_and_go_to_the_url(syn, monkeypatch):
    at = run_app(syn, monkeypatch, page="ranking", suite="inthewild", n="3", families=["task vector", "spherical"],
                 data_free="true")
    assert not at.warning
    assert at.selectbox(key="n").value == 3 and at.checkbox(key="data_free").value
    assert at.multiselect(key="families").value == ["task vector", "spherical"]
    run = at.dataframe[0].value
    assert set(run["method"]) == {"ties", "slerp"} and set(run["n_units"]) == {20}  # karcher is not data-free
    at.selectbox(key="n").set_value(2).run()
    assert at.query_params["n"] == "2" and set(at.dataframe[0].value["n_units"]) == {15}
    at.checkbox(key="data_free").uncheck().run()
    assert "data_free" not in at.query_params
    at.multiselect(key="families").set_value(["spherical"]).run()
    assert at.query_params["families"] == "spherical"
    at.selectbox(key="n").set_value("(all)").run()
    assert "n" not in at.query_params
    at.radio(key="page").set_value("scaling").run()
    assert at.query_params["page"] == "scaling" and at.query_params["suite"] == "inthewild"
    # a shared link reproduces the page: a fresh session on the URL the last one left
    again = run_app(syn, monkeypatch, **dict(at.query_params))
    assert again.radio(key="page").value == "scaling" and again.multiselect(key="families").value == ["spherical"]


# --------------------------------------------------------------------------- table layout


def test_ranking_table_columns_labels_and_width(syn, monkeypatch):
    at = run_app(syn, monkeypatch)
    d = at.dataframe[0]
    assert list(d.value.columns) == ["rank_label", "method", "params_label", "score", "ci", "ranks", "p_best",
                                     "p_gt_base", "gain_vs_base_pp", "gain_vs_best_expert_pp", "merge_wall_s",
                                     "eval_wall_s", "n_units"]  # no 'source', no empty 'paper'
    cfg = json.loads(d.proto.columns)
    assert cfg.pop("_index") == {"hidden": True}
    assert set(cfg) == set(d.value.columns) and sum(c["width"] for c in cfg.values()) <= 1300  # 1600 px - sidebar
    labels = d.value.set_index("method")["params_label"].to_dict()
    # lambda = 1.0 is ties' default; karcher and slerp have no lambda, so it is shown
    assert labels == {"linear": "default", "ties": "default", "karcher": "λ=1", "slerp": "λ=1"}
    assert cfg["params_label"]["label"] == "params"
    assert '`λ=1`: `{"lambda":1.0}`' in cfg["params_label"]["help"]  # every label with its full JSON on hover
    assert "`default`: `{}`" in cfg["params_label"]["help"]


def test_glue_ranking_leads_with_the_merging_loss(tmp_path, monkeypatch):
    common = dict(suite="glue", suite_version="1", profile="embedded", pool="smol", base_model="b", seed=0,
                  doc_index_hash="h")
    run = "20260101T000000Z-abcdef"
    own = {"ea": ("mb_capitals", 0.80), "eb": ("mb_elements", 0.60)}
    for e, (t, v) in own.items():
        store.write_unit(store.Unit(role="expert", subset=(e,), **common), [{"task": t, "metric": "acc", "value": v}],
                         run_id=run, results_dir=tmp_path)
    for m, k in {"ties": 0.9, "linear": 0.7}.items():
        store.write_unit(store.Unit(role="merged", subset=("ea", "eb"), method=m, method_version="1", **common),
                         [{"task": own[e][0], "metric": "acc", "value": own[e][1] * k} for e in own],
                         run_id=run, results_dir=tmp_path)
    at = run_app(tmp_path, monkeypatch)
    shown = at.dataframe[0].value
    assert list(shown.columns[:5]) == ["rank_label", "method", "params_label", "merging_loss_pct", "ci"]
    assert shown["merging_loss_pct"].tolist() == pytest.approx([-10.0, -30.0])
    assert re.fullmatch(r"-10\.0 – -10\.0", shown["ci"].iloc[0])  # one unit: a 1-decimal degenerate CI
    md = report.write_report(tmp_path, suite="glue", fmt="md")
    t = md_table(md, "glue / embedded / smol")
    assert list(t.columns[:4]) == ["rank", "method", "params", "merging loss %"]
    assert t["merging loss %"].tolist() == ["-10.0", "-30.0"] and t["95% CI"].iloc[1] == "-30.0 – -30.0"
    tasks = md_table(md, "Per-task merging loss")
    assert tasks.set_index("method").loc["ties", ["mb_capitals", "mb_elements", "average"]].tolist() == \
        ["-10.0", "-10.0", "-10.0"]


def test_params_label_is_short_and_keeps_integers():
    full = json.dumps({"consensus": "sum", "density": 0.1, "lambda": 0.1, "normalize": True, "rescale": None})
    assert report.params_label("ties", full) == "λ=0.1 d=0.1"
    assert report.params_label("karcher", json.dumps({"max_iter": 10.0, "tol": 1e-5, "eta": 1.0})) == "default"
    assert report.params_label("karcher", json.dumps({"max_iter": 25, "eta": 0.5})) == "η=0.5 iters=25"
    assert report.params_label("task_arithmetic", json.dumps({"lambda": 1.0, "normalize": True})) == "norm=on"
    assert report.params_label("no_such_plugin", json.dumps({"a": [0.5, 0.25]})) == "a=[0.5,0.25]"


def test_method_page_blanks_none_and_prints_integers(syn, monkeypatch):
    at = run_app(syn, monkeypatch, page="methods", method="karcher")
    params = at.dataframe[0].value.set_index("name")
    assert params.loc["max_iter", "default"] == "10" and params.loc["tol", "default"] == "1e-05"
    at.selectbox(key="method").set_value("ties").run()
    assert at.query_params["method"] == "ties"
    params = at.dataframe[0].value.set_index("name")
    assert params.loc["rescale", "default"] == ""  # not 'None'
    cfg = at.dataframe[1].value
    assert cfg["params_json"].tolist() == ['{"lambda":1.0}'] and cfg["params_label"].tolist() == ["default"]


# --------------------------------------------------------------------------- paper column


def test_paper_rows_match_on_method_configuration_and_n():
    con = report.connect(ROOT / "results")
    t = report.ranking(con, report.Filters(suite="inthewild", profile="embedded", pool="smol", n=2))
    run, pap = t[t["source"] == "run"], t[t["source"] == "paper"]
    m = report.match_paper(run, pap)
    # ties ran with the in-the-wild study's configuration (lambda 0.1, density 0.1, normalize): matched
    # to the study's TIES rows at n = 2 on all four of its pools, values straight from the CSV
    csv = pd.read_csv(ROOT / "results" / "paper" / "seed001_table1.csv")
    want = csv[(csv.method == "ties") & (csv.n == 2) & (csv.metric == "gain_vs_base_pp")]
    assert set(m["variant"]) == {"ties"} and sorted(m["pool"]) == sorted(want["pool"])
    assert sorted(m["gain_vs_base_pp"]) == pytest.approx(sorted(want["value"]))
    lo, hi = want["value"].min(), want["value"].max()
    assert run.set_index("method").loc["ties", "paper"] == f"Δ base {lo:+.2f}…{hi:+.2f} pp"
    # task arithmetic ran with normalize=false, the study used normalize=true: the name alone never matches
    assert "task_arithmetic" in set(pap["method"]) and run.set_index("method").loc["task_arithmetic", "paper"] == ""
    # all sizes together: no single n, no match
    every = report.ranking(con, report.Filters(suite="inthewild", profile="embedded", pool="smol"))
    assert (every[every["source"] == "run"]["paper"] == "").all()
    assert report.same_configuration("ties", {"lambda": 0.1, "density": 0.1, "consensus": "sum"},
                                     {"lambda": 0.1, "density": 0.1})
    assert not report.same_configuration("ties", {"lambda": 0.2, "density": 0.1}, {"lambda": 0.1, "density": 0.1})


# -------------------------------------------------------------------------------- colours


def test_one_method_colour_map_for_every_chart_and_the_plots(syn):
    builtin = report.method_info()
    builtin = sorted(builtin[builtin["family"] != "plugin"]["method"])
    colours = [report.method_color(m) for m in builtin]
    assert len(builtin) >= 20 and len(set(colours)) == len(colours)  # every built-in its own colour
    assert len(set(report.PALETTE)) == len(report.PALETTE) >= 20
    d = report.scaling(report.connect(syn), report.Filters(suite="inthewild"))
    spec = charts.scaling(d).to_dict()
    scale = next(enc["color"]["scale"] for layer in spec["layer"] for enc in [layer.get("encoding", {})]
                 if "color" in enc)
    assert dict(zip(scale["domain"], scale["range"])) == {m: report.method_color(m) for m in scale["domain"]}
    assert "base model" in scale["domain"] and "single expert" in scale["domain"]  # the base line is in the legend
    legends = [layer["encoding"]["color"]["legend"] for layer in spec["layer"] if "color" in layer.get("encoding", {})]
    assert all(lg["symbolOpacity"] == 1 for lg in legends)
    # error bars at every point, the single experts' n = 1 too
    rules = [layer for layer in spec["layer"] if layer["mark"] == {"type": "rule", "strokeWidth": 1.5}]
    assert len(rules) == 1 and rules[0]["encoding"]["y2"]["field"] == "hi"
    experts = d[d["role"] == "expert"]
    assert len(experts) == 1 and experts["std"].iloc[0] > 0 and int(experts["n"].iloc[0]) == 1
    # matplotlib: the same colours, an error bar at n = 1, the base model dashed in an opaque legend
    fig = report.scaling_figure(d, "t")
    ax = fig.axes[0]
    import matplotlib.colors as mc

    bars = {c.get_label(): c for c in ax.containers}  # one errorbar container per method (and the experts)
    assert set(bars) == set(d[d["role"] != "base"]["method"])
    for m, c in bars.items():
        assert mc.to_hex(c.lines[0].get_color()) == report.method_color(m)
    assert len(bars["single expert"].lines[2]) == 1  # the error bar of the one point at n = 1
    base = [ln for ln in ax.get_lines() if ln.get_label() == "base model"]
    assert len(base) == 1 and base[0].get_linestyle() == "--"
    assert "base model" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert ax.get_legend().get_frame().get_alpha() == 1.0


def test_heatmap_rows_follow_the_ranking_with_an_average_column(syn):
    d = report.per_task(report.connect(syn), report.Filters(suite="inthewild"))
    order = ["karcher", "ties", "linear", "slerp"]
    spec = charts.heatmap(d, order=order).to_dict()
    enc = spec["layer"][0]["encoding"]
    assert enc["y"]["sort"][:4] == order and enc["x"]["sort"][-1] == "average"
    assert enc["x"]["axis"]["labelLimit"] == 0 and enc["y"]["axis"]["labelLimit"] == 0  # never truncated
    data = pd.DataFrame(next(iter(spec["datasets"].values())))
    avg = data[data["task"] == "average"].set_index("method")["value"]
    want = d.groupby(["method", "task"])["value"].mean().groupby("method").mean()
    np.testing.assert_allclose(avg.loc[want.index], want, rtol=1e-12)


# -------------------------------------------------------------------------------- formats


class _Cells(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.cells, self.imgs, self.external = [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("td", "th"):
            self.cells.append((tag, a.get("class"), a.get("title")))
        if tag == "img":
            self.imgs.append(a["src"])
        for k in ("src", "href"):
            if a.get(k, "").startswith(("http:", "https:", "//")):
                self.external.append(a[k])


def test_html_report_is_readable_and_self_contained(syn, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "report.html"
    res = runner.invoke(cli, ["report", "--results", str(syn), "--suite", "inthewild", "--format", "html",
                              "--out", str(out), "--plots", str(tmp_path / "plots")])
    assert res.exit_code == 0, res.output
    text = out.read_text()
    p = _Cells()
    p.feed(text)
    heads = re.findall(r"<th class='(\w+)'>([^<]*)</th>", text)
    labels = [h for _, h in heads]
    assert {"95% CI", "rank interval", "P(&gt;base)", "units"} <= set(labels)
    assert not {"ci_low", "n_units", "gain_vs_base_pp", "source"} & set(labels)
    assert dict((h, c) for c, h in heads)["method"] == "txt" and dict((h, c) for c, h in heads)["score"] == "num"
    assert "td.num,th.num{text-align:right" in text and "td.txt,th.txt{text-align:left}" in text
    titles = [t for tag, _, t in p.cells if t]
    assert '{"lambda":1.0}' in titles  # the full configuration on hover
    assert len(p.imgs) == 2 and not p.external  # both plots embedded, nothing fetched from elsewhere
    for src in p.imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_report_headers_and_precision(syn):
    md = report.write_report(syn, suite="inthewild", fmt="md")
    t = md_table(md, "inthewild / embedded / smol")
    assert list(t.columns[:6]) == ["rank", "method", "params", "score", "95% CI", "rank interval"]
    assert not {"n_units", "ci_low", "ci_high", "rank_low", "source"} & set(t.columns)
    assert all(re.fullmatch(r"0\.\d{4}", s) for s in t["score"])
    assert all(re.fullmatch(r"0\.\d{4} – 0\.\d{4}", s) for s in t["95% CI"])
    assert md.splitlines()[md.splitlines().index("| " + " | ".join(t.columns) + " |") + 1].startswith(
        "| ---: | :--- | :--- | ---: |")  # numbers right, text left
    assert "None" not in md and "nan" not in md


def test_report_without_a_store_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(cli, ["report"])
    assert res.exit_code == 0, res.output
    assert "No results store at results: nothing has been reproduced here yet" in res.stdout
    assert "warning: No results store at results" in res.output  # on stderr too (csv has no room for it)
    assert "published numbers" in res.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    res = runner.invoke(cli, ["report", "--results", str(empty), "--format", "csv"])
    assert res.exit_code == 0 and f"The results store at {empty} holds no merged runs yet" in res.output


# ---------------------------------------------------------------------- the leaderboard CLI


def test_missing_streamlit_points_at_the_real_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "streamlit", None)  # import streamlit -> ImportError
    res = runner.invoke(cli, ["leaderboard", "--port", "1"])
    assert res.exit_code == 2
    assert res.output.startswith("error: the leaderboard needs streamlit") and "pip install 'streamlit>=1.40'" in \
        res.output and "mergebench[leaderboard]" not in res.output and len(res.output.strip().splitlines()) == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _in_group(pgid: int) -> list[int]:
    pids = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                stat = Path(f"/proc/{p}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] != "Z" and int(fields[2]) == pgid:
                pids.append(int(p))
    return pids


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_sigterm_stops_the_leaderboard_server(tmp_path):
    synthetic.small_store(tmp_path / "results", methods={"linear": 0.0}, sizes=(2,))
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mergebench.cli", "leaderboard", "--port", str(port),
                             "--results", str(tmp_path / "results")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=1) as r:
                    assert r.read() == b"ok"
                break
            except OSError:
                assert time.monotonic() < deadline, "the leaderboard did not answer within 60 s"
                time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 5
        while _in_group(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _in_group(proc.pid) == []  # no Streamlit child left behind
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0  # nothing serves the port any more
            s.close()
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a server binds (TIME_WAIT is fine)
            s.bind(("127.0.0.1", port))  # and it can be bound again: no listener holds it
            s.listen()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
