"""The report's page: one HTML file with plotly.js inlined, sections, tables and figures.

Plotly (plotly.py) draws the figures: it is well kept, its figures are interactive (hover,
zoom, legend toggles, dropdowns) and its whole JavaScript bundle can be written into the page
(`plotly.offline.get_plotlyjs()`, the same bundle `include_plotlyjs=True` embeds), so the file
opens offline with no network; the bundle is inlined once and every figure is a `<div>` plus a
small script. Colours: Paul Tol's "muted" qualitative scheme (distinct under the common colour
blindnesses) for categories, viridis for continuous scores.
"""

from __future__ import annotations

import html
import json
import math
from typing import Any

# Paul Tol, "muted" (colour-blind safe), then a neutral grey for "other"
CATEGORICAL = ["#332288", "#88CCEE", "#44AA99", "#117733", "#999933", "#DDCC77", "#CC6677",
               "#882255", "#AA4499"]
OTHER = "#BBBBBB"
SELECTED_SYMBOLS = ["circle-open", "square-open", "diamond-open", "triangle-up-open",
                    "star-open", "x-thin-open"]
CONTINUOUS = "Viridis"
FIG_CONFIG = {"displaylogo": False, "responsive": True,
              "modeBarButtonsToRemove": ["select2d", "lasso2d"]}

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0;
       color: #222; background: #fafafa; }
header { background: #223; color: #fff; padding: 14px 24px; }
header h1 { margin: 0 0 4px 0; font-size: 22px; }
header p { margin: 0; color: #ccd; font-size: 13px; }
nav { background: #fff; border-bottom: 1px solid #ddd; padding: 6px 24px;
      font-size: 13px; z-index: 10; }
nav a { margin-right: 14px; color: #225; text-decoration: none; }
main { max-width: 1240px; margin: 0 auto; padding: 8px 24px 40px; }
section { background: #fff; border: 1px solid #e3e3e3; border-radius: 6px; padding: 12px 18px;
          margin: 16px 0; }
h2 { font-size: 18px; margin: 4px 0 8px; }
h3 { font-size: 15px; margin: 14px 0 6px; }
p.note { color: #555; font-size: 13px; margin: 4px 0 8px; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(480px, 1fr)); gap: 12px; }
table { border-collapse: collapse; font-size: 13px; margin: 6px 0; }
th, td { border-bottom: 1px solid #e6e6e6; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f2f2f5; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.text { max-width: 520px; white-space: pre-wrap; word-break: break-word; }
.scroll { overflow-x: auto; }
details { margin: 6px 0; }
summary { cursor: pointer; font-weight: 600; }
pre { background: #f5f5f7; padding: 8px; font-size: 12px; overflow-x: auto; max-height: 480px; }
.plot { min-height: 300px; }
"""

# Figures in a grid are drawn as the page is parsed, before their column has its final width:
# fit every figure to its container once the page has loaded (`thresherReady` resolves then).
RESIZE = ("<script>window.addEventListener('load', () => { window.thresherReady = Promise.all("
          "[...document.querySelectorAll('.js-plotly-plot')].map(gd => Plotly.Plots.resize(gd)));"
          " });</script>")


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def fmt(value: Any) -> str:
    """A table cell: floats to 4 significant digits, big numbers with thousands separators."""
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 1e9:
            return f"{value:.3g}"
        return f"{value:,.0f}" if abs(value) >= 1e5 else f"{value:.4g}"
    return str(value)


def table(head: list[str], rows: list[list[Any]], text_cols: tuple[int, ...] = ()) -> str:
    """An HTML table; numbers right-aligned, `text_cols` wrapped (long example text)."""
    out = ["<div class='scroll'><table><thead><tr>",
           *(f"<th>{esc(h)}</th>" for h in head), "</tr></thead><tbody>"]
    for row in rows:
        out.append("<tr>")
        for i, v in enumerate(row):
            cls = "text" if i in text_cols else ("num" if isinstance(v, (int, float)) else "")
            out.append(f"<td class='{cls}'>{esc(fmt(v))}</td>")
        out.append("</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def figure(fig, div_id: str, height: int = 420) -> str:
    """A plotly figure as a div + script (no bundle: the page inlines plotly.js once)."""
    fig.update_layout(height=height, margin={"l": 60, "r": 20, "t": 90, "b": 50},
                      template="plotly_white", font={"size": 12},
                      title={"x": 0.01, "xanchor": "left", "y": 0.98, "yanchor": "top"})
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id,
                       config=FIG_CONFIG, default_width="100%", default_height=f"{height}px")


def section(anchor: str, title: str, body: str, note: str = "") -> str:
    note_html = f"<p class='note'>{note}</p>" if note else ""
    return f"<section id='sec-{esc(anchor)}'><h2>{esc(title)}</h2>{note_html}{body}</section>"


def details(summary: str, body: str, open_: bool = False) -> str:
    return f"<details{' open' if open_ else ''}><summary>{esc(summary)}</summary>{body}</details>"


def json_block(obj: Any) -> str:
    return f"<pre>{esc(json.dumps(obj, indent=2, sort_keys=True, default=str))}</pre>"


REPORT_MARK = b"<title>thresher report"   # `page`'s title comes first in <head>


def is_report(path) -> bool:
    """Whether the file at `path` is an HTML report thresher wrote (its title says so)."""
    with open(path, "rb") as f:
        return REPORT_MARK in f.read(1024)


def page(title: str, subtitle: str, sections: list[tuple[str, str, str]]) -> str:
    """The whole document: sections are (anchor, nav label, html)."""
    from plotly.offline import get_plotlyjs

    nav = "".join(f"<a href='#sec-{esc(a)}'>{esc(label)}</a>" for a, label, _ in sections)
    body = "\n".join(h for _, _, h in sections)
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{esc(title)}</title><style>{CSS}</style>"
            f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>"
            f"<header><h1>{esc(title)}</h1><p>{esc(subtitle)}</p></header>"
            f"<nav>{nav}</nav><main>{body}</main>{RESIZE}</body></html>\n")
