"""The report's quality-score examples: for a selection cut on a quality score (`--method
classifier`'s `quality_score`, `--method lm-rating`'s `rating`), rows at the top of the score,
on both sides of the cut, and at the bottom, with their text, so a reader can judge the score
where it matters. (The score's histogram with the cut is in the Scores section.)"""

from __future__ import annotations

import polars as pl
from thresher.pipeline.report.html import esc, section, table

QUALITY_COLUMNS = ("quality_score", "rating")
PER_BAND = 3


def _bands(frame: pl.DataFrame, column: str, chosen: set[str]) -> list[tuple[str, dict]]:
    ranked = frame.filter(pl.col(column).is_not_null()).sort([column, "id"],
                                                             descending=[True, False])
    rows = ranked.to_dicts()
    kept = [r for r in rows if r["id"] in chosen]
    dropped = [r for r in rows if r["id"] not in chosen]
    out = [("top", r) for r in rows[:PER_BAND]]
    if kept and dropped:
        out += [("last kept", r) for r in kept[-PER_BAND:]]
        out += [("first dropped", r) for r in dropped[:PER_BAND]]
    out += [("bottom", r) for r in rows[-PER_BAND:]]
    seen, unique = set(), []
    for band, r in out:                     # a small pool's bands overlap: show each row once
        if r["id"] not in seen:
            seen.add(r["id"])
            unique.append((band, r))
    return unique


def quality_section(ctx):
    body = []
    for sel in ctx.selections:
        frame = sel.decisions
        column = next((c for c in QUALITY_COLUMNS if frame is not None and c in frame.columns), None)
        if column is None:
            continue
        chosen = set(sel.chosen["id"].to_list())
        picks = _bands(frame, column, chosen)
        texts = ctx.texts([r["id"] for _, r in picks])
        source = dict(ctx.rows.select("id", "source").iter_rows()) if ctx.rows is not None else {}
        rows = [[band, r["id"], source.get(r["id"], "-"), f"{r[column]:.4g}",
                 "kept" if r["id"] in chosen else "dropped", texts.get(r["id"], "")]
                for band, r in picks]
        cut = sel.manifest.get("config", {}).get("selector", {})
        rule = (f"{column} >= {cut['above']:g}" if cut.get("above") is not None
                else f"the top {len(chosen):,} by {column}")
        body.append(f"<h3>{esc(sel.name)} ({esc(sel.method)}): cut at {esc(rule)}</h3>")
        body.append(table(["where", "id", "source", column, "selection", "text"], rows,
                          text_cols=(5,)))
    if not body:
        return None
    return ("quality", "Quality", section(
        "quality", "Quality scores: the top, the cut and the bottom", "".join(body),
        "Rows at the top of the score, the last rows kept and the first dropped at the cut, "
        "and the bottom of the pool, with their first user turn (or text)."))
