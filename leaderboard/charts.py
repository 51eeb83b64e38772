"""Altair charts of the leaderboard (pure functions: DataFrame in, chart out)."""

from __future__ import annotations

import altair as alt
import pandas as pd

SOURCE_COLORS = alt.Scale(domain=["run", "paper"], range=["#1f77b4", "#ff7f0e"])


def ranking_ci(rank: pd.DataFrame, title: str = "headline score") -> alt.Chart:
    """Mean headline score (or merging loss) with its bootstrap CI per method (reproduced rows)."""
    d = rank[rank["source"] == "run"]
    order = d.sort_values("score", ascending=False)["method"].tolist()
    base = alt.Chart(d).encode(y=alt.Y("method:N", sort=order, title=None))
    bars = base.mark_rule(strokeWidth=3, color="#9ecae1").encode(
        x=alt.X("ci_low:Q", title=f"{title} (mean, 95% bootstrap CI)", scale=alt.Scale(zero=False)), x2="ci_high:Q")
    pts = base.mark_point(filled=True, size=70, color="#1f77b4").encode(
        x="score:Q", tooltip=["method", alt.Tooltip("score:Q", format=".4f"), alt.Tooltip("ci_low:Q", format=".4f"),
                              alt.Tooltip("ci_high:Q", format=".4f"), "rank_low", "rank_high", "n_units"])
    return (bars + pts).properties(height=alt.Step(32))


def scaling(d: pd.DataFrame, paper: pd.DataFrame | None = None, y_title: str = "headline score") -> alt.Chart:
    """Score (or another per-unit quantity) vs n, one line per method with a ±1 std band; the
    base model as a dashed rule."""
    merged = d[d["role"] != "base"].assign(lo=lambda x: x["mean"] - x["std"], hi=lambda x: x["mean"] + x["std"])
    color = alt.Color("method:N", title="method", scale=alt.Scale(scheme="tableau10"))
    x = alt.X("n:Q", title="models merged (n)", axis=alt.Axis(tickMinStep=1), scale=alt.Scale(padding=14))
    band = alt.Chart(merged).mark_area(opacity=0.15).encode(x=x, y="lo:Q", y2="hi:Q", color=color)
    line = alt.Chart(merged).mark_line(point=True).encode(
        x=x, y=alt.Y("mean:Q", title=y_title, scale=alt.Scale(zero=False)), color=color,
        tooltip=["method", "n", alt.Tooltip("mean:Q", format=".4f"), alt.Tooltip("std:Q", format=".4f"), "n_units"])
    layers = [band, line] if not merged.empty else []
    base = d[d["role"] == "base"]
    if not base.empty:
        layers.append(alt.Chart(base).mark_rule(strokeDash=[6, 4], color="black").encode(
            y="mean:Q", tooltip=[alt.Tooltip("mean:Q", title="base model", format=".4f")]))
    if paper is not None and not paper.empty:
        layers.append(alt.Chart(paper.assign(series=lambda x: x["method"] + " (paper)")).mark_line(
            strokeDash=[4, 3], point=alt.OverlayMarkDef(shape="diamond")).encode(
            x=x, y="mean:Q", color=color, detail="series:N",
            tooltip=["table", "pool", "method", "n", alt.Tooltip("mean:Q", format=".3f")]))
    return alt.layer(*layers).properties(height=380) if layers else alt.Chart(pd.DataFrame()).mark_point()


def heatmap(d: pd.DataFrame) -> alt.Chart:
    """Method x task mean headline metric."""
    h = d.groupby(["method", "task"], as_index=False)["value"].mean()
    enc = dict(x=alt.X("task:N", title=None, axis=alt.Axis(labelAngle=-35)), y=alt.Y("method:N", title=None))
    rect = alt.Chart(h).mark_rect().encode(**enc, color=alt.Color("value:Q", scale=alt.Scale(scheme="viridis"),
                                                                 title="score"),
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
        color=alt.Color("method:N", scale=alt.Scale(scheme="tableau10")),
        tooltip=["method", "task", "n", alt.Tooltip("value:Q", format=".4f")]).properties(height=300)


def pareto(d: pd.DataFrame, cost: str = "merge_wall_s", title: str = "merge wall time (s, mean per unit)") -> alt.Chart:
    """Quality vs a cost column; the Pareto front is drawn as a step line."""
    pts = alt.Chart(d).mark_circle(size=110).encode(
        x=alt.X(f"{cost}:Q", title=title, scale=alt.Scale(type="log")),
        y=alt.Y("score:Q", title="headline score", scale=alt.Scale(zero=False)),
        color=alt.Color("pareto:N", title="Pareto-optimal", scale=alt.Scale(domain=[True, False],
                                                                            range=["#d62728", "#9e9e9e"])),
        tooltip=["method", alt.Tooltip("score:Q", format=".4f"), alt.Tooltip("merge_wall_s:Q", format=".2f"),
                 alt.Tooltip("eval_wall_s:Q", format=".1f"), alt.Tooltip("merge_peak_gib:Q", format=".2f")])
    labels = alt.Chart(d).mark_text(align="left", dx=8, fontSize=11).encode(x=f"{cost}:Q", y="score:Q",
                                                                            text="method:N")
    front = alt.Chart(d[d["pareto"]].sort_values(cost)).mark_line(
        interpolate="step-after", color="#d62728", strokeDash=[4, 3]).encode(x=f"{cost}:Q", y="score:Q")
    return (front + pts + labels).properties(height=420)


def layer_curve(d: pd.DataFrame) -> alt.Chart:
    """A diagnostic metric vs layer index, one line per model."""
    return alt.Chart(d).mark_line(point=True).encode(
        x=alt.X("layer_index:Q", title="layer"), y=alt.Y("value:Q", scale=alt.Scale(zero=False), title="value"),
        color="model:N", tooltip=["model", "layer", alt.Tooltip("value:Q", format=".4f")]).properties(height=320)
