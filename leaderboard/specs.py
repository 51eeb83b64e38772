"""Vega-Lite specifications as plain dicts, for the charts of the first page a reader opens.

``st.vega_lite_chart`` draws a dict without Altair, whose import costs the first load of the
ranking page about half a second; the other pages' charts are Altair (:mod:`charts`). Colours
come from :func:`mergebench.report.method_colors`, the map every chart uses.
"""

from __future__ import annotations

import json

import pandas as pd

from mergebench.report import method_colors


def ranking_ci(rank: pd.DataFrame, title: str = "headline score") -> dict:
    """Mean headline score (or merging loss) with its bootstrap CI per ranked variant (reproduced
    rows): a rule from ``ci_low`` to ``ci_high`` and a point at ``score``, best first."""
    d = rank[rank["source"] == "run"] if "source" in rank else rank
    d = d.assign(variant=d["variant"] if "variant" in d else d["method"])
    order = d.sort_values("score", ascending=False)["variant"].tolist()
    cmap = method_colors([m for m in d["method"] if isinstance(m, str)])
    color = {"field": "method", "type": "nominal", "title": "method",
             "scale": {"domain": list(cmap), "range": list(cmap.values())},
             "legend": {"symbolOpacity": 1, "labelLimit": 0}}
    tips = [("method", "nominal", None), ("params_label", "nominal", None), ("score", "quantitative", ".4f"),
            ("ci_low", "quantitative", ".4f"), ("ci_high", "quantitative", ".4f"), ("rank_label", "nominal", None),
            ("rank_low", "quantitative", None), ("rank_high", "quantitative", None), ("n_units", "quantitative", None),
            ("params", "nominal", None)]
    tooltip = [{"field": f, "type": t, **({"format": fmt} if fmt else {}),
                **({"title": "params (JSON)"} if f == "params" else {})} for f, t, fmt in tips if f in d]
    cols = ["variant", "method", "score", "ci_low", "ci_high"] + [t["field"] for t in tooltip]
    values = json.loads(d[list(dict.fromkeys(c for c in cols if c in d))].to_json(orient="records"))  # plain JSON types
    y = {"field": "variant", "type": "nominal", "sort": order, "title": None,
         "axis": {"labelLimit": 0, "titleLimit": 0}}
    return {
        "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
        "data": {"values": values},
        "height": {"step": 32},
        "layer": [
            {"mark": {"type": "rule", "strokeWidth": 3, "opacity": 0.5},
             "encoding": {"y": y, "x": {"field": "ci_low", "type": "quantitative",
                                        "title": f"{title} (mean, 95% bootstrap CI)", "scale": {"zero": False}},
                          "x2": {"field": "ci_high"}, "color": color}},
            {"mark": {"type": "point", "filled": True, "size": 70, "opacity": 1},
             "encoding": {"y": y, "x": {"field": "score", "type": "quantitative"}, "color": color,
                          "tooltip": tooltip}},
        ],
    }
