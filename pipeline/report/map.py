"""The report's map: the pool's embeddings projected by the cached UMAP stage, coloured by
cluster, source or score, selected rows marked, each point's hover telling why it was chosen.

Embeddings: an `embed` stage output for this pool already in the artifact store (the one a
method made; `conversation` text preferred), else computed with the given embedder (default
all-MiniLM-L6-v2) when allowed. Clusters: the selection's own k-means (its manifest's `artifacts`)
when it has one, else a k-means over the same embeddings (`cluster.default_k`), both cached.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import polars as pl
from thresher.pipeline.report import figures as figs
from thresher.pipeline.report.data import Selection, cuts, first_user_turn, score_columns

log = logging.getLogger(__name__)

HOVER_WRAP = 70


def cached_embeddings(pool, store) -> tuple[np.ndarray, str] | None:
    """(matrix, fingerprint) of a finished embed stage of this pool, or None."""
    found = []
    for spec in sorted((store.root / "embed").glob("*/_SPEC.json")):
        d = spec.parent
        info = json.loads(spec.read_text())
        if info.get("inputs") == [pool.fingerprint] and (d / "_COMPLETE.json").exists() \
                and (d / "embeddings.npy").exists():
            part = info.get("config", {}).get("part")
            found.append((part != "conversation", d))
    if not found:
        return None
    d = min(found)[1]
    return np.load(d / "embeddings.npy", mmap_mode="r"), f"embed:{d.name}"


def pool_embeddings(ctx) -> tuple[np.ndarray, str] | None:
    store = ctx.store()
    got = cached_embeddings(ctx.pool, store)
    if got is None and ctx.compute_embeddings:
        from thresher.pipeline.models.resolve import DEFAULT_EMBEDDER
        from thresher.pipeline.stages.embed import embed_pool

        emb = embed_pool(ctx.pool, store, ctx.embedder or DEFAULT_EMBEDDER, part="conversation")
        got = emb.matrix(), emb.fingerprint
    return got


def cluster_labels(ctx, x: np.ndarray, fingerprint: str) -> np.ndarray:
    """Per pool row: the first selection's own cluster labels, else a cached k-means."""
    for sel in ctx.selections:
        dirs = [sel.method_config.get("clusters"), *sel.manifest.get("artifacts", {}).values()]
        for d in (d for d in dirs if isinstance(d, str) and (Path(d) / "labels.npy").exists()):
            labels = np.load(Path(d) / "labels.npy")
            if len(labels) == x.shape[0]:
                return labels
    from thresher.pipeline.stages.cluster import cluster_matrix, default_k

    return cluster_matrix(ctx.store(), x, default_k(x.shape[0]), fingerprint=fingerprint).labels


def _wrap(text: str, width: int = HOVER_WRAP) -> str:
    import html
    import textwrap

    return "<br>".join(html.escape(line) for line in textwrap.wrap(text, width)[:4])


def _beyond_cut(sel: Selection) -> dict[str, str]:
    """Unselected ids whose value of the selector's column lies beyond the selection's cut."""

    col = (sel.manifest.get("config", {}).get("selector") or {}).get("column")
    d = sel.decisions
    if not col or d is None or col not in d.columns:
        return {}
    values = d.select("id", pl.col(col).cast(pl.Float64)).drop_nulls()
    picked = values.filter(pl.col("id").is_in(sel.chosen["id"].implode()))[col].to_numpy()
    edges = cuts(values[col].to_numpy(), picked)
    if not edges or picked.size == 0:
        return {}
    lo, hi = float(np.nanmin(picked)), float(np.nanmax(picked))
    out = {}
    for i, v in values.iter_rows():
        if v < lo and lo in edges:
            out[i] = f"{col}={v:.4g} below the cut {lo:.4g}"
        elif v > hi and hi in edges:
            out[i] = f"{col}={v:.4g} above the cut {hi:.4g}"
    return out


def _why(sel: Selection, ids: list[str]) -> list[str]:
    """Per id: "selected #rank: reason", or why not: a duplicate, the score frame's reason,
    beyond the cut on the selector's column, or left out by the budget."""
    chosen = dict(zip(sel.chosen["id"].to_list(),
                      zip(sel.chosen["rank"].to_list(), sel.chosen["reason"].to_list())))
    other: dict[str, str] = {}
    d = sel.decisions
    if d is not None and "id" in d.columns:
        for col, say in (("exact_duplicate_of", "exact duplicate of"),
                         ("duplicate_of", "near-duplicate of"), ("reason", "")):
            if col in d.columns:
                for i, v in d.filter(pl.col(col).is_not_null()).select("id", col).iter_rows():
                    other.setdefault(i, f"{say} {v}".strip())
        for i, why in _beyond_cut(sel).items():
            other.setdefault(i, why)
        if "kept" in d.columns:
            for i in d.filter(pl.col("kept"))["id"].to_list():
                other.setdefault(i, "passed the method's filter, left out by the budget")
    out = []
    for i in ids:
        if i in chosen:
            rank, reason = chosen[i]
            out.append(f"selected #{rank}: {reason}")
        else:
            out.append(f"not selected: {other[i]}" if i in other else "not selected")
    return out


def map_score(ctx, ids: list[str]) -> tuple[str, np.ndarray] | None:
    """The first selection's first score column over the mapped rows (NaN where unknown)."""

    for sel in ctx.selections:
        frame = sel.decisions if sel.decisions is not None and score_columns(sel.decisions) \
            else sel.chosen
        cols = score_columns(frame)
        column = (sel.manifest.get("config", {}).get("selector") or {}).get("column")
        cols = [column, *cols] if column in cols else cols     # the column the cut was made on
        if cols and "id" in frame.columns:
            values = dict(frame.select("id", cols[0]).iter_rows())
            return f"{cols[0]} ({sel.name})", np.array(
                [np.nan if values.get(i) is None else float(values[i]) for i in ids])
    return None


def _scores(sel: Selection, ids: list[str], most: int = 3) -> list[str]:
    """Per id: its score columns ("ppl=12.3, entropy=1.1"), from the score frame when the
    method saved one for every candidate, else from the sidecar (selected rows only)."""

    frame = sel.decisions if sel.decisions is not None and "id" in sel.decisions.columns \
        else sel.chosen
    cols = score_columns(frame)[:most]
    if not cols:
        return [""] * len(ids)
    values = {r[0]: r[1:] for r in frame.select("id", *cols).iter_rows()}
    return [", ".join(f"{c}={v:.4g}" if isinstance(v, float) else f"{c}={v}"
                      for c, v in zip(cols, values[i]) if v is not None) if i in values else ""
            for i in ids]


def _hover(ctx, picked: pl.DataFrame, labels: np.ndarray) -> list[str]:
    ids = picked["id"].to_list()
    whys = {s.name: (_why(s, ids), _scores(s, ids)) for s in ctx.selections}
    out = []
    for j, r in enumerate(picked.iter_rows(named=True)):
        head = f"<b>{_wrap(r['id'])}</b> · {r['source']} · cluster {labels[j]}"
        lines = [head, _wrap(first_user_turn(r, 280))]
        for name, (why, score) in whys.items():
            lines.append(f"<i>{name}</i>: {_wrap(why[j])}")
            if score[j]:
                lines.append(f"scores: {_wrap(score[j])}")
        out.append("<br>".join(lines))
    return out


def map_figure(ctx):
    """The map figure, the number of points drawn, and the total pool rows (or None)."""
    from thresher.pipeline.stages.umap2d import project_umap

    if ctx.pool is None:
        return None
    got = pool_embeddings(ctx)
    if got is None:
        return None
    x, fingerprint = got
    proj = project_umap(ctx.store(), x, fingerprint, max_points=ctx.max_points)
    rows, xy = proj.rows, proj.coords
    labels_all = cluster_labels(ctx, x, fingerprint)
    ctx.cluster_labels = labels_all
    picked = (ctx.pool.scan().with_row_index("row")
              .filter(pl.col("row").is_in(pl.Series(rows.tolist(), dtype=pl.UInt32).implode()))
              .select("row", "id", "source", "kind", "messages", "text").collect().sort("row"))
    labels = labels_all[rows]
    ids = picked["id"].to_list()
    colourings = [figs.Colouring("cluster", categorical=[f"cluster {c}" for c in labels]),
                  figs.Colouring("source", categorical=picked["source"].to_list())]
    score = map_score(ctx, ids)
    if score is not None:
        colourings.append(figs.Colouring(score[0], numeric=score[1]))
    id_set = np.asarray(ids, dtype=object)
    selected = {s.name: np.isin(id_set, s.chosen["id"].to_numpy()) for s in ctx.selections}
    title = (f"UMAP of the pool's embeddings ({len(rows):,} of {x.shape[0]:,} rows"
             f"{', a seeded sample' if len(rows) < x.shape[0] else ''})")
    fig = figs.umap_map(xy, colourings, _hover(ctx, picked, labels), selected, title)
    return fig, len(rows), x.shape[0]
