"""The report's sections on each selection: the funnel (input to subset, per source and
capability), the map of the pool, the scores and the selection's cut, the clusters and example
rows. Each `*_section(ctx)` takes the report's `build.ReportContext` and returns (anchor, title,
HTML) or None when its data is missing; `pipeline/report/build.py` lists what each one reads.
"""

from __future__ import annotations

import numpy as np
import polars as pl
from thresher.pipeline.report import figures as figs
from thresher.pipeline.report.data import (
    Selection,
    count_lines,
    cuts,
    quarantine_reasons,
    score_columns,
)
from thresher.pipeline.report.html import esc, figure, section, table

MAX_SCORE_PLOTS = 4
EXAMPLES = 5


# ------------------------------------------------------------------ funnel

def funnel_steps(sel: Selection) -> list[tuple[str, int]]:
    c = sel.manifest.get("counts", {})
    read, quarantined = c.get("read", 0), c.get("quarantined", 0)
    steps = [("read", read), ("kept (not quarantined)", read - quarantined)]
    cand = c.get("candidates", read - quarantined)
    if cand != read - quarantined:
        steps.append(("candidates", cand))
    exact = sel.lookup("exact_duplicates")
    near = sel.lookup("near_duplicates") or sel.lookup("semantic_duplicates")
    left = cand
    if isinstance(exact, int) and exact:
        left -= exact
        steps.append(("after exact dedup", left))
    if isinstance(near, int) and near:
        left -= near
        steps.append(("after near dedup", left))
    steps.append(("selected", c.get("selected", sel.chosen.height)))
    return steps


def _by_group(ctx, column: str) -> tuple[list[str], dict[str, list[int]]]:
    pool_counts = ctx.rows[column].value_counts().sort(["count", column], descending=[True, False])
    groups = pool_counts[column].to_list()
    series = {"pool": pool_counts["count"].to_list()}
    for s in ctx.selections:
        got = dict(ctx.rows.join(s.chosen.select("id"), on="id")[column].value_counts().iter_rows())
        series[f"selected by {s.name}"] = [got.get(g, 0) for g in groups]
    return [str(g) for g in groups], series


def funnel_section(ctx):
    if not ctx.selections:
        return None
    body = [figure(figs.funnel({s.name: funnel_steps(s) for s in ctx.selections}), "funnel")]
    notes = []
    if ctx.pool is not None:
        info = ctx.pool.info
        notes.append(f"Pool: read {info['read']:,} rows, kept {info['kept']:,}, quarantined "
                     f"{info['quarantined']:,}; {count_lines(ctx.pool.path / 'duplicate_ids.jsonl'):,}"
                     " repeated ids kept under a new id.")
        reasons = quarantine_reasons(ctx.pool.path)
        if reasons:
            body.append(figure(figs.hbars("Why rows were quarantined (top reasons)",
                                          [r for r, _ in reasons], [n for _, n in reasons],
                                          "rows"), "quarantine", height=320))
        plots = [figure(figs.grouped_bars("Rows per source: pool and selected", "source",
                                          *_by_group(ctx, "source")), "by-source")]
        if "capability" in ctx.rows.columns:
            plots.append(figure(figs.grouped_bars("Rows per capability: pool and selected",
                                                  "capability", *_by_group(ctx, "capability")),
                                "by-capability"))
        body.append(f"<div class='grid'>{''.join(plots)}</div>")
    return ("funnel", "Funnel", section("funnel", "Funnel: from input to subset", "".join(body),
                                        " ".join(notes)))


# ------------------------------------------------------------------ scores

def all_scores(sel: Selection) -> pl.DataFrame | None:
    """Every candidate's scores when the method saved them (the score frame / decisions)."""
    if sel.decisions is None or "id" not in sel.decisions.columns:
        return None
    return sel.decisions


def _values(frame: pl.DataFrame | None, column: str) -> np.ndarray | None:
    if frame is None or column not in frame.columns:
        return None
    return frame[column].cast(pl.Float64).fill_null(np.nan).to_numpy()


def _histograms(sel: Selection) -> list[str]:
    full = all_scores(sel)
    columns = score_columns(sel.chosen)
    if full is not None:
        columns = list(dict.fromkeys(columns + score_columns(full)))
    plots = []
    for col in columns[:MAX_SCORE_PLOTS]:
        every = _values(full, col)
        if full is not None and "kept" in full.columns and col not in sel.chosen.columns:
            chosen = _values(full.filter(pl.col("id").is_in(sel.chosen["id"].implode())), col)
        else:
            chosen = _values(sel.chosen, col)
        if chosen is None:
            continue
        fig = figs.score_histogram(col, every, chosen, cuts(every, chosen), sel.name)
        plots.append(figure(fig, f"hist-{sel.name}-{col}", height=340))
    return plots


def _eu_plane(sel: Selection) -> str | None:
    frame = all_scores(sel)
    frame = frame if frame is not None and {"ppl", "entropy"} <= set(frame.columns) else sel.chosen
    if not {"ppl", "entropy"} <= set(frame.columns):
        return None
    ppl, ent = _values(frame, "ppl"), _values(frame, "entropy")
    quadrant = (frame["quadrant"].fill_null("-").to_numpy().astype(str)
                if "quadrant" in frame.columns else np.full(len(ppl), "-"))
    selected = frame["id"].is_in(sel.chosen["id"].implode()).to_numpy()
    alpha = sel.lookup("alpha_found") or sel.lookup("alpha")
    thresholds = None
    if alpha and frame is not sel.chosen:
        a = float(alpha)
        thresholds = (float(np.quantile(ppl, a)), float(np.quantile(ppl, 1 - a)),
                      float(np.quantile(ent, a)), float(np.quantile(ent, 1 - a)))
    fig = figs.eu_plane(ppl, ent, quadrant, selected, thresholds, sel.name)
    return figure(fig, f"eu-{sel.name}", height=460)


def scores_section(ctx):
    body = []
    for sel in ctx.selections:
        plots = _histograms(sel)
        eu = _eu_plane(sel)
        if not plots and eu is None:
            continue
        scope = ("every candidate's score is known" if all_scores(sel) is not None else
                 "the method saved scores of the selected rows only")
        body.append(f"<h3>{esc(sel.name)} ({esc(sel.method)})</h3><p class='note'>{scope}</p>")
        body.append(f"<div class='grid'>{''.join(plots)}</div>")
        if eu is not None:
            body.append(eu)
    if not body:
        return None
    return ("scores", "Scores", section("scores", "Scores and the selection's cut", "".join(body),
                                        "Grey: all candidates; colour: selected rows; dashed "
                                        "lines: where the selected range ends."))


# ------------------------------------------------------------------ examples

def _score_text(row: dict, columns: list[str]) -> str:
    parts = [f"{c}={row[c]:.4g}" if isinstance(row[c], float) else f"{c}={row[c]}"
             for c in columns if row.get(c) is not None]
    return ", ".join(parts)


def examples_section(ctx):
    if not ctx.selections:
        return None
    body = []
    for sel in ctx.selections:
        ranked = sel.chosen.sort("rank")
        n = ranked.height
        picks = ranked.head(EXAMPLES) if n <= 2 * EXAMPLES else \
            pl.concat([ranked.head(EXAMPLES), ranked.tail(EXAMPLES)])
        texts = ctx.texts(picks["id"].to_list())
        cols = score_columns(sel.chosen)
        source = dict(ctx.rows.select("id", "source").iter_rows()) if ctx.rows is not None else {}
        rows = [[r["rank"], r["id"], source.get(r["id"], "-"), texts.get(r["id"], ""),
                 _score_text(r, cols), r.get("reason", "")] for r in picks.to_dicts()]
        body.append(f"<h3>{esc(sel.name)}: the {min(EXAMPLES, n)} highest- and lowest-ranked "
                    f"of {n:,} selected rows</h3>")
        body.append(table(["rank", "id", "source", "first user turn", "scores", "reason"], rows,
                          text_cols=(3, 5)))
    return ("examples", "Examples", section("examples", "Example rows", "".join(body)))


# ------------------------------------------------------------------ map and clusters

def map_section(ctx):
    from thresher.pipeline.io.cachefiles import cache_guard
    from thresher.pipeline.report.map import map_figure

    if ctx.pool is None:
        return None
    root = ctx.store().root
    with cache_guard(lambda: [root], root):    # a damaged cached embedding is named
        got = map_figure(ctx)
    if got is None:
        if ctx.pool is None:
            return None
        body = ("<p class='note'>No embeddings of this pool are cached; run <code>thresher "
                "report</code> (it embeds with all-MiniLM-L6-v2) or <code>thresher embed "
                f"{esc(ctx.pool.path)}</code> to draw the map.</p>")
        return ("map", "Map", section("map", "Map of the pool", body))
    fig, points, total = got
    note = (f"{points:,} points{' (a seeded uniform sample)' if points < total else ''}. Open "
            "markers: selected rows (one symbol per selection; click a legend entry to hide it). "
            "Hover a point for its first user turn and why it was chosen or not; the menu at "
            "the top right changes the colouring.")
    return ("map", "Map", section("map", "Map of the pool (UMAP)",
                                  f"<div id='map-wrap' data-points='{points}'>"
                                  f"{figure(fig, 'map', height=640)}</div>", note))


def _cluster_table_plot(sel: Selection) -> str | None:
    rows = sel.lookup("cluster_table")
    if not isinstance(rows, list) or not rows or not isinstance(rows[0], dict):
        return None
    kind = sel.lookup("cluster_table_kind") or ("capability" if "degradation" in rows[0] else "")
    title = {"capability": f"{sel.name}: capability clusters (size, budget, degradation)",
             "trajectory": f"{sel.name}: loss-trajectory cluster sizes"}.get(
        kind, f"{sel.name}: per-cluster statistics")
    names = [str(r.get("label") or r.get("cluster")) for r in rows]
    series = {k: [r.get(k, 0) for r in rows] for k in ("size", "budget", "selected")
              if any(k in r for r in rows)}
    series = {("pool size" if k == "size" else k): v for k, v in series.items()}
    line = ("degradation (mean JSD)", [r.get("degradation") for r in rows]) \
        if any("degradation" in r for r in rows) else None
    return figure(figs.cluster_bars(title, names, series, line), f"clusters-{sel.name}")


def clusters_section(ctx):
    body = [p for p in (_cluster_table_plot(s) for s in ctx.selections) if p]
    if ctx.cluster_labels is not None and ctx.selections:
        labels = ctx.cluster_labels
        sizes = np.bincount(labels)
        order = [int(c) for c in np.argsort(-sizes, kind="stable")[:30] if sizes[c] > 0]
        series = {"pool": [int(sizes[c]) for c in order]}
        row_of = dict(zip(ctx.rows["id"].to_list(), ctx.rows["row"].to_list()))
        for s in ctx.selections:
            got = np.bincount(labels[[row_of[i] for i in s.chosen["id"].to_list() if i in row_of]],
                              minlength=len(sizes))
            series[f"selected by {s.name}"] = [int(got[c]) for c in order]
        body.append(figure(figs.grouped_bars(
            "Rows per embedding cluster (the map's clusters): pool and selected",
            "cluster", [f"cluster {c}" for c in order], series), "clusters-map"))
    if not body:
        return None
    return ("clusters", "Clusters", section("clusters", "Clusters", "".join(body)))
