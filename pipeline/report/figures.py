"""The report's figures (plotly), each titled, with labelled axes and a legend where it helps.

Every function takes plain lists / arrays and returns a `plotly.graph_objects.Figure`; the
report (`pipeline/report/build.py`) decides which to draw from the data that exists.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
from thresher.pipeline.report.html import CATEGORICAL, CONTINUOUS, OTHER, SELECTED_SYMBOLS

MAX_CATEGORIES = len(CATEGORICAL)
INNER_LEGEND = {"x": 0.99, "xanchor": "right", "y": 0.98, "yanchor": "top",
                "bgcolor": "rgba(255,255,255,0.8)"}
TOP_LEGEND = {"orientation": "h", "yanchor": "bottom", "y": 1.02, "xanchor": "right", "x": 1}


def colour_of(i: int) -> str:
    return CATEGORICAL[i % len(CATEGORICAL)]


def funnel(steps_by_run: dict[str, list[tuple[str, int]]]) -> go.Figure:
    """Rows left after each step (read -> kept -> candidates -> dedup -> selected), one bar
    per selection and step, labelled with the count and its share of the rows read."""
    fig = go.Figure()
    for i, (name, steps) in enumerate(steps_by_run.items()):
        first = steps[0][1] or 1
        fig.add_trace(go.Bar(name=name, y=[s for s, _ in steps], x=[v for _, v in steps],
                             orientation="h", marker={"color": colour_of(i)},
                             text=[f"{v:,} ({100 * v / first:.0f}%)" for _, v in steps],
                             textposition="outside", cliponaxis=False))
    fig.update_layout(title="From input rows to the selected subset", barmode="group",
                      xaxis_title="rows", yaxis_title="step", legend=TOP_LEGEND)
    fig.update_yaxes(autorange="reversed", automargin=True)
    return fig


def grouped_bars(title: str, xlabel: str, categories: list[str],
                 series: dict[str, list[float]], ylabel: str = "rows") -> go.Figure:
    """Bars per category, one colour per series; a series named "pool..." is grey."""
    fig, i = go.Figure(), 0
    for name, values in series.items():
        pool = name.startswith("pool")
        fig.add_trace(go.Bar(name=name, x=categories, y=values,
                             marker={"color": OTHER if pool else colour_of(i)}))
        i += 0 if pool else 1
    fig.update_layout(title=title, barmode="group", xaxis_title=xlabel, yaxis_title=ylabel,
                      legend=TOP_LEGEND)
    fig.update_xaxes(tickangle=-30, automargin=True)
    return fig


def hbars(title: str, labels: list[str], values: list[int], xlabel: str) -> go.Figure:
    fig = go.Figure(go.Bar(x=values[::-1], y=labels[::-1], orientation="h",
                           marker={"color": CATEGORICAL[6]}, name="rows"))
    fig.update_layout(title=title, xaxis_title=xlabel, yaxis_title="reason", showlegend=False)
    fig.update_yaxes(automargin=True)
    return fig


@dataclass
class Colouring:
    """One way to colour the map: categorical labels or numeric values per point."""

    label: str
    categorical: list[str] | None = None
    numeric: np.ndarray | None = None


def _category_traces(xy: np.ndarray, labels: list[str], hover: list[str],
                     visible: bool) -> list[go.Scatter]:
    """One trace per frequent category (largest first), the rest folded into "other"."""
    values, counts = np.unique(np.asarray(labels, dtype=object).astype(str), return_counts=True)
    order = [values[i] for i in np.argsort(-counts, kind="stable")]
    keep = order[:MAX_CATEGORIES] if len(order) > MAX_CATEGORIES + 1 else order
    lab = np.asarray(labels, dtype=object).astype(str)
    groups = [(v, lab == v, colour_of(i)) for i, v in enumerate(keep)]
    if len(keep) < len(order):
        groups.append((f"other ({len(order) - len(keep)})", ~np.isin(lab, keep), OTHER))
    return [go.Scatter(x=xy[m, 0], y=xy[m, 1], mode="markers", name=str(v), meta="pool",
                       marker={"size": 6, "color": c, "opacity": 0.85},
                       text=[hover[j] for j in np.flatnonzero(m)], hoverinfo="text",
                       visible=visible)
            for v, m, c in groups if m.any()]


def _numeric_traces(xy: np.ndarray, values: np.ndarray, label: str, hover: list[str],
                    visible: bool) -> list[go.Scatter]:
    ok = np.isfinite(values)
    traces = [go.Scatter(x=xy[ok, 0], y=xy[ok, 1], mode="markers", name=label, meta="pool",
                         marker={"size": 6, "color": values[ok], "colorscale": CONTINUOUS,
                                 "showscale": True, "colorbar": {"title": {"text": label}}},
                         text=[hover[j] for j in np.flatnonzero(ok)], hoverinfo="text",
                         visible=visible)]
    if (~ok).any():
        traces.append(go.Scatter(x=xy[~ok, 0], y=xy[~ok, 1], mode="markers", meta="pool",
                                 name="no score", marker={"size": 5, "color": OTHER},
                                 text=[hover[j] for j in np.flatnonzero(~ok)],
                                 hoverinfo="text", visible=visible))
    return traces


def umap_map(xy: np.ndarray, colourings: list[Colouring], hover: list[str],
             selected: dict[str, np.ndarray], title: str) -> go.Figure:
    """The pool's 2-D map; a dropdown picks the colouring; selected rows get open markers."""
    fig, groups = go.Figure(), []
    for k, c in enumerate(colourings):
        traces = (_category_traces(xy, c.categorical, hover, k == 0) if c.categorical is not None
                  else _numeric_traces(xy, c.numeric, c.label, hover, k == 0))
        groups.append(len(traces))
        fig.add_traces(traces)
    for i, (name, mask) in enumerate(selected.items()):
        fig.add_trace(go.Scatter(x=xy[mask, 0], y=xy[mask, 1], mode="markers", meta="selected",
                                 name=f"selected by {name} ({int(mask.sum())})",
                                 hoverinfo="skip", marker={
                                     "symbol": SELECTED_SYMBOLS[i % len(SELECTED_SYMBOLS)],
                                     "size": 10, "color": "#000000", "line": {"width": 1.2}}))
    n_sel = len(selected)
    buttons = []
    for k, c in enumerate(colourings):
        vis = [g == k for g, n in enumerate(groups) for _ in range(n)] + [True] * n_sel
        buttons.append({"label": f"colour by {c.label}", "method": "update",
                        "args": [{"visible": vis}]})
    fig.update_layout(title=title, xaxis_title="UMAP 1", yaxis_title="UMAP 2",
                      legend={"itemsizing": "constant"},
                      updatemenus=[{"buttons": buttons, "direction": "down", "x": 1.0,
                                    "xanchor": "right", "y": 1.13, "yanchor": "top",
                                    "showactive": True}] if len(buttons) > 1 else [])
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False)
    return fig


def score_histogram(column: str, all_values: np.ndarray | None, selected: np.ndarray,
                    cuts: list[float], run: str) -> go.Figure:
    """All candidates (grey) and the selected rows (colour), the cut(s) as dashed lines."""
    fig = go.Figure()
    if all_values is not None:
        fig.add_trace(go.Histogram(x=all_values, name="all candidates", nbinsx=40,
                                   marker={"color": OTHER}, opacity=0.9))
    fig.add_trace(go.Histogram(x=selected, name="selected", nbinsx=40,
                               marker={"color": CATEGORICAL[0]}, opacity=0.75))
    for c in cuts:
        fig.add_vline(x=c, line={"dash": "dash", "color": CATEGORICAL[6], "width": 2},
                      annotation_text=f"cut {c:.4g}", annotation_position="top")
    scope = "" if all_values is not None else " (selected rows only)"
    fig.update_layout(title=f"{run}: {column}{scope}", barmode="overlay", xaxis_title=column,
                      yaxis_title="rows", legend=INNER_LEGEND)
    return fig


QUADRANT_COLOURS = {"Q1": CATEGORICAL[6], "Q2": CATEGORICAL[0], "Q3": CATEGORICAL[5],
                    "Q4": CATEGORICAL[2], "-": OTHER}
QUADRANT_NAMES = {"Q1": "Q1 high ppl, high entropy (noise)",
                  "Q2": "Q2 high ppl, low entropy (misconceptions)",
                  "Q3": "Q3 low ppl, low entropy (known)",
                  "Q4": "Q4 low ppl, high entropy (calibration)", "-": "between thresholds"}


def eu_plane(ppl: np.ndarray, ent: np.ndarray, quadrant: np.ndarray, selected: np.ndarray,
             thresholds: tuple[float, float, float, float] | None, run: str) -> go.Figure:
    """Perplexity (log x) against entropy, points by quadrant, selected rows ringed."""
    fig = go.Figure()
    for q, colour in QUADRANT_COLOURS.items():
        m = quadrant == q
        if m.any():
            fig.add_trace(go.Scatter(x=ppl[m], y=ent[m], mode="markers", name=QUADRANT_NAMES[q],
                                     marker={"size": 6, "color": colour, "opacity": 0.8}))
    fig.add_trace(go.Scatter(x=ppl[selected], y=ent[selected], mode="markers",
                             name=f"selected ({int(selected.sum())})", hoverinfo="skip",
                             marker={"symbol": "circle-open", "size": 10, "color": "#000"}))
    if thresholds is not None:
        p_lo, p_hi, e_lo, e_hi = thresholds
        for x in {p_lo, p_hi}:
            fig.add_vline(x=x, line={"dash": "dot", "color": "#555"})
        for y in {e_lo, e_hi}:
            fig.add_hline(y=y, line={"dash": "dot", "color": "#555"})
    fig.update_layout(title=f"{run}: error-uncertainty plane", xaxis_title="perplexity (log)",
                      yaxis_title="mean token entropy", xaxis_type="log",
                      legend=TOP_LEGEND)
    return fig


def cluster_bars(title: str, clusters: list[str], series: dict[str, list[float]],
                 line: tuple[str, list[float]] | None = None) -> go.Figure:
    """Per-cluster bars (size, budget, selected...), optionally a line on a second axis
    (PASER's degradation)."""
    fig = grouped_bars(title, "cluster", clusters, series)
    if line is not None:
        fig.add_trace(go.Scatter(x=clusters, y=line[1], name=line[0], yaxis="y2",
                                 mode="lines+markers", marker={"color": CATEGORICAL[6]}))
        fig.update_layout(yaxis2={"title": line[0], "overlaying": "y", "side": "right"})
    return fig


def overlap_heatmap(names: list[str], counts: np.ndarray, jaccard: np.ndarray) -> go.Figure:
    text = [[f"{int(counts[i, j])}<br>J={jaccard[i, j]:.2f}" for j in range(len(names))]
            for i in range(len(names))]
    fig = go.Figure(go.Heatmap(z=jaccard, x=names, y=names, text=text, texttemplate="%{text}",
                               colorscale="Cividis", zmin=0, zmax=1,
                               colorbar={"title": {"text": "Jaccard"}}))
    fig.update_layout(title="Overlap of the selections (shared rows, Jaccard)",
                      xaxis_title="selection", yaxis_title="selection")
    fig.update_yaxes(autorange="reversed")
    return fig


def heldout_dots(runs: list[str], evals: dict[str, list[float]]) -> go.Figure:
    """Held-out loss of each trained run, one marker series per eval set (a dot plot: the
    differences that matter are small next to the loss itself, so no bars from zero)."""
    fig = go.Figure()
    for i, (name, values) in enumerate(evals.items()):
        fig.add_trace(go.Scatter(x=runs, y=values, mode="markers+text", name=name,
                                 text=[f"{v:.4f}" for v in values], textposition="top center",
                                 cliponaxis=False,
                                 marker={"size": 12, "color": colour_of(i),
                                         "symbol": SELECTED_SYMBOLS[i % 5].replace("-open", "")}))
    fig.update_layout(title="Held-out loss by training subset (lower is better)",
                      xaxis_title="trained on", yaxis_title="held-out loss (response tokens)",
                      legend=TOP_LEGEND)
    return fig


def train_curves(logs: dict[str, list[dict]]) -> go.Figure:
    fig = go.Figure()
    for i, (name, steps) in enumerate(logs.items()):
        fig.add_trace(go.Scatter(x=[s["step"] for s in steps], y=[s["loss"] for s in steps],
                                 mode="lines+markers", name=name, marker={"color": colour_of(i)}))
    longest = max((len(s) for s in logs.values()), default=1)
    fig.update_layout(title="Training loss per optimizer step", xaxis_title="step",
                      yaxis_title="training loss (response tokens)", legend=TOP_LEGEND)
    fig.update_xaxes(dtick=max(1, longest // 10))
    return fig
