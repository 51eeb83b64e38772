"""Altair charts of the leaderboard (pure functions: DataFrame in, chart out).

Every chart colours methods with :func:`mergebench.report.method_color`, the map the static
report's matplotlib plots use too, so a method has one colour everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import altair as alt
import pandas as pd

from mergebench.report import method_colors

SOURCE_COLORS = alt.Scale(domain=["run", "paper"], range=["#1f77b4", "#ff7f0e"])
NO_TRUNCATION = dict(labelLimit=0, titleLimit=0)  # full task and method names on the axes


def color(methods: Sequence[str], title: str = "method") -> alt.Color:
    """A colour encoding of the ``method`` field with the fixed method -> colour map; legend symbols
    at full opacity (whatever the marks' own opacity)."""
    cmap = method_colors([m for m in methods if isinstance(m, str)])
    return alt.Color("method:N", title=title, scale=alt.Scale(domain=list(cmap), range=list(cmap.values())),
                     legend=alt.Legend(symbolOpacity=1, labelLimit=0))


def ranking_ci(rank: pd.DataFrame, title: str = "headline score") -> alt.Chart:
    """Mean headline score (or merging loss) with its bootstrap CI per ranked variant (reproduced rows)."""
    d = rank[rank["source"] == "run"] if "source" in rank else rank
    d = d.assign(variant=d["variant"] if "variant" in d else d["method"])
    order = d.sort_values("score", ascending=False)["variant"].tolist()
    enc = color(d["method"].tolist())
    base = alt.Chart(d).encode(y=alt.Y("variant:N", sort=order, title=None, axis=alt.Axis(**NO_TRUNCATION)))
    bars = base.mark_rule(strokeWidth=3, opacity=0.5).encode(
        x=alt.X("ci_low:Q", title=f"{title} (mean, 95% bootstrap CI)", scale=alt.Scale(zero=False)), x2="ci_high:Q",
        color=enc)
    tips = ["method", "params_label", alt.Tooltip("score:Q", format=".4f"), alt.Tooltip("ci_low:Q", format=".4f"),
            alt.Tooltip("ci_high:Q", format=".4f"), "rank_label", "rank_low", "rank_high", "n_units",
            alt.Tooltip("params:N", title="params (JSON)")]
    pts = base.mark_point(filled=True, size=70, opacity=1).encode(
        x="score:Q", color=enc, tooltip=[t for t in tips if not isinstance(t, str) or t in d])
    return (bars + pts).properties(height=alt.Step(32))


def scaling(d: pd.DataFrame, paper: pd.DataFrame | None = None, y_title: str = "headline score") -> alt.Chart:
    """Score (or another per-unit quantity) vs n, one line per method with a ±1 std band (where a
    method has several sizes) and ±1 std error bars at every point, so the single experts at n = 1
    show theirs; the base model as a dashed rule that has its own legend entry."""
    merged = d[d["role"] != "base"].assign(lo=lambda x: x["mean"] - x["std"], hi=lambda x: x["mean"] + x["std"])
    base = d[d["role"] == "base"]
    names = list(merged["method"]) + (list(paper["method"]) if paper is not None and not paper.empty else [])
    enc = color(names + (["base model"] if not base.empty else []))
    x = alt.X("n:Q", title="models merged (n)", axis=alt.Axis(tickMinStep=1), scale=alt.Scale(padding=14))
    y = alt.Y("mean:Q", title=y_title, scale=alt.Scale(zero=False))
    tips = ["method", "n", alt.Tooltip("mean:Q", format=".4f"), alt.Tooltip("std:Q", format=".4f"), "n_units"]
    layers = []
    if not merged.empty:
        several = merged[merged.groupby("method")["n"].transform("nunique") > 1]
        layers += [alt.Chart(several).mark_area(opacity=0.12).encode(x=x, y="lo:Q", y2="hi:Q", color=enc),
                   alt.Chart(merged).mark_rule(strokeWidth=1.5).encode(x=x, y="lo:Q", y2="hi:Q", color=enc),
                   alt.Chart(merged).mark_line(point=True).encode(x=x, y=y, color=enc, tooltip=tips)]
    if not base.empty:
        layers.append(alt.Chart(base.assign(method="base model")).mark_rule(strokeDash=[6, 4]).encode(
            y=y, color=enc, tooltip=[alt.Tooltip("mean:Q", title="base model", format=".4f")]))
    if paper is not None and not paper.empty:
        layers.append(alt.Chart(paper.assign(series=lambda p: p["method"] + " (paper)")).mark_line(
            strokeDash=[4, 3], point=alt.OverlayMarkDef(shape="diamond")).encode(
            x=x, y="mean:Q", color=enc, detail="series:N",
            tooltip=["table", "pool", "method", "n", alt.Tooltip("mean:Q", format=".3f")]))
    return alt.layer(*layers).properties(height=380) if layers else alt.Chart(pd.DataFrame()).mark_point()


def heatmap(d: pd.DataFrame, order: Sequence[str] | None = None, average: bool = True,
            title: str = "score") -> alt.Chart:
    """Method x task mean value; rows in `order` (ranked methods first, the rest after), an
    ``average`` column (unweighted mean over the tasks) last; labels never truncated."""
    h = d.groupby(["method", "task"], as_index=False)["value"].mean()
    tasks = sorted(h["task"].unique())
    if average and len(tasks) > 1:
        h = pd.concat([h, h.groupby("method", as_index=False)["value"].mean().assign(task="average")],
                      ignore_index=True)
        tasks.append("average")
    rows = [m for m in (order or []) if m in set(h["method"])]
    rows += sorted(set(h["method"]) - set(rows))
    enc = dict(x=alt.X("task:N", title=None, sort=tasks, axis=alt.Axis(labelAngle=-35, **NO_TRUNCATION)),
               y=alt.Y("method:N", title=None, sort=rows, axis=alt.Axis(**NO_TRUNCATION)))
    rect = alt.Chart(h).mark_rect().encode(**enc, color=alt.Color("value:Q", scale=alt.Scale(scheme="viridis"),
                                                                 title=title),
                                           tooltip=["method", "task", alt.Tooltip("value:Q", format=".4f")])
    text = alt.Chart(h).mark_text(fontSize=10).encode(
        **enc, text=alt.Text("value:Q", format=".2f"),
        color=alt.condition(alt.datum.value > h["value"].median() if len(h) else 0, alt.value("black"),
                            alt.value("white")))
    return (rect + text).properties(height=alt.Step(34))


def task_vs_n(d: pd.DataFrame) -> alt.Chart:
    """Per-task score vs n, one line per method."""
    m = d[d["role"] == "merged"]
    return alt.Chart(m).mark_line(point=True).encode(
        x=alt.X("n:Q", axis=alt.Axis(tickMinStep=1), title="n"),
        y=alt.Y("value:Q", scale=alt.Scale(zero=False), title="score"),
        color=color(m["method"].tolist()),
        tooltip=["method", "task", "n", alt.Tooltip("value:Q", format=".4f")]).properties(height=300)


def pareto(d: pd.DataFrame, cost: str = "merge_wall_s", title: str = "merge wall time (s, mean per unit)",
           y_title: str = "headline score") -> alt.Chart:
    """Quality vs a cost column, points in the method colours; Pareto-optimal points are diamonds
    and the front is drawn as a step line."""
    d = d.assign(variant=d["variant"] if "variant" in d else d["method"])
    pts = alt.Chart(d).mark_point(size=140, filled=True, opacity=1).encode(
        x=alt.X(f"{cost}:Q", title=title, scale=alt.Scale(type="log")),
        y=alt.Y("score:Q", title=y_title, scale=alt.Scale(zero=False)),
        color=color(d["method"].tolist()),
        shape=alt.Shape("pareto:N", title="Pareto-optimal", scale=alt.Scale(domain=[True, False],
                                                                            range=["diamond", "circle"])),
        tooltip=["variant", alt.Tooltip("score:Q", format=".4f"), alt.Tooltip("merge_wall_s:Q", format=".2f"),
                 alt.Tooltip("eval_wall_s:Q", format=".1f"), alt.Tooltip("merge_peak_gib:Q", format=".2f")])
    labels = alt.Chart(d).mark_text(align="left", dx=9, fontSize=11).encode(x=f"{cost}:Q", y="score:Q",
                                                                            text="variant:N")
    front = alt.Chart(d[d["pareto"]].sort_values(cost)).mark_line(
        interpolate="step-after", color="#d62728", strokeDash=[4, 3]).encode(x=f"{cost}:Q", y="score:Q")
    return (front + pts + labels).properties(height=420)


def layer_curve(d: pd.DataFrame) -> alt.Chart:
    """A diagnostic metric vs layer index, one line per model."""
    models = d["model"].nunique() if len(d) else 0
    # every model in the legend: two columns once they outnumber what one column shows at this height
    legend = alt.Legend(title="model", symbolOpacity=1, labelLimit=220, columns=2 if models > 12 else 1)
    return alt.Chart(d).mark_line(point=True).encode(
        x=alt.X("layer_index:Q", title="layer"), y=alt.Y("value:Q", scale=alt.Scale(zero=False), title="value"),
        color=alt.Color("model:N", legend=legend),
        tooltip=["model", "layer", alt.Tooltip("value:Q", format=".4f")]).properties(height=max(320, 22 * models))
