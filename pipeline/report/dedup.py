"""The report's "Near-duplicate clusters" section: for each fuzzy-dedup selection, the largest
clusters, each with the row it kept and an example row it removed, side by side, and the pair's
estimated Jaccard when the clusters stage kept it (its `pairs.parquet`).

Reads the selection's decisions (the score frame: id, dup_cluster_id, dup_cluster_size,
dup_kept, keep) and, from the manifest's `artifacts`, the clusters stage's folder.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
from thresher.pipeline.report.html import esc, section, table

LARGEST = 8
SNIPPET = 300


def _texts(ctx, ids: list[str]) -> dict[str, str]:
    if ctx.pool is None or not ids:
        return {}
    from thresher.pipeline.stages.textnorm import row_key

    found = ctx.pool.scan().filter(pl.col("id").is_in(pl.Series(ids, dtype=pl.String).implode())) \
        .select("id", "kind", "messages", "text").collect()
    return {r["id"]: row_key(r)[:SNIPPET] for r in found.to_dicts()}


def _pair_jaccard(sel) -> dict[tuple[str, str], float]:
    folder = (sel.manifest.get("artifacts") or {}).get("clusters")
    path = Path(folder) / "pairs.parquet" if folder else None
    if path is None or not path.exists():
        return {}
    pairs = pl.read_parquet(path)
    return {(a, b): j for a, b, j in pairs.iter_rows()}


def largest_clusters(decisions: pl.DataFrame, n: int = LARGEST) -> pl.DataFrame:
    """cluster, size, kept id and one removed id, for the n largest clusters (ties: first)."""
    multi = decisions.filter(pl.col("dup_cluster_size") > 1)
    return (multi.group_by("dup_cluster_id", maintain_order=True)
            .agg(pl.col("dup_cluster_size").first().alias("size"),
                 pl.col("dup_kept").first().alias("kept"),
                 pl.col("id").filter(~pl.col("keep")).first().alias("removed"),
                 pl.col("dup_check").first().alias("check"))
            .sort("size", descending=True, maintain_order=True).head(n))


def dedup_section(ctx):
    body = []
    for sel in ctx.selections:
        dec = sel.decisions
        if dec is None or not {"dup_cluster_id", "dup_cluster_size", "dup_kept"} <= set(dec.columns):
            continue
        top = largest_clusters(dec)
        stats = sel.method_config.get("clusters") or {}
        body.append(f"<h3>{esc(sel.name)}: {stats.get('clusters', top.height):,} clusters, "
                    f"{sel.method_config.get('removed', 0):,} rows removed; candidate pairs "
                    f"{stats.get('candidate_pairs', '-')}, kept by the check "
                    f"{stats.get('pairs_kept', '-')}, rejected {stats.get('pairs_rejected', '-')}"
                    "</h3>")
        if top.height == 0:
            body.append("<p>No near-duplicates.</p>")
            continue
        ids = [i for i in top["kept"].to_list() + top["removed"].to_list() if i]
        texts, jac = _texts(ctx, ids), _pair_jaccard(sel)
        rows = []
        for r in top.to_dicts():
            pair = jac.get((r["kept"], r["removed"])) or jac.get((r["removed"], r["kept"]))
            rows.append([r["size"], r["check"], r["kept"], texts.get(r["kept"], ""),
                         r["removed"] or "-", texts.get(r["removed"], "") if r["removed"] else "",
                         f"{pair:.3f}" if pair is not None else "-"])
        body.append(table(["size", "compared by", "kept", "kept text", "removed (example)",
                           "removed text", "est. Jaccard"], rows, text_cols=(3, 5)))
    if not body:
        return None
    return ("dedup", "Duplicates", section(
        "dedup", "Near-duplicate clusters", "".join(body),
        note="The largest clusters of each fuzzy-dedup selection: the row kept and one row "
             "removed (first 300 characters of what was compared), with the pair's estimated "
             "Jaccard when the pair was checked directly (else it joined through other rows)."))
