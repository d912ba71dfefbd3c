"""`thresher report RUN...`: one self-contained HTML file showing what was selected and why.

    write_report([Path("out/semdedup.jsonl"), Path("out/random.jsonl")], Path("out/report.html"))

The file inlines plotly.js (see `html.py` for why plotly) and opens offline. Sections
appear when their data exists; what each reads (RUN arguments: see `data.py`):

| section | reads |
|---|---|
| Funnel | pool `pool.json` (read, quarantined, duplicate_ids), `quarantine.jsonl` (reasons), each manifest's `counts` (candidates, selected) and, when a method reports them (top level, `counts`, `notes`, `stats` or `config.method`), `exact_duplicates` and `near_duplicates` (or `semantic_duplicates`); per source and per `capability` (an original field) from the pool and the sidecar ids |
| Map | the pool's embeddings artifact (`embed` stage in the manifest's `workdir`; computed with `--embedder` when missing), projected by the cached UMAP stage (`pipeline/stages/umap2d.py`); clusters from the manifest's `artifacts` (a k-means output directory with `labels.npy`; or `config.method.clusters`) or a k-means over the same embeddings; scores from the sidecar / score frame |
| Scores | numeric columns of the sidecar `X.jsonl.selection.parquet` (id, rank, reason, scores) and, for every candidate, of the score frame the manifest names under `scores` (or `config.method.decisions`): a Parquet of id + score columns (+ optional `reason`, `kept`) |
| Error-uncertainty plane | `ppl` and `entropy` columns (+ `quadrant`), alpha from `alpha_found` / `alpha` |
| Filter rules | a filter method's per-rule counts (`config.method.rules`, `pipeline/filtering.py`) and its score frame's `keep`, `reason` and value columns: counts table, each threshold rule's histogram with its cut, seeded removed rows and the kept rows nearest each threshold (`report/rules.py`) |
| Clusters | the map's cluster labels vs selected rows; a method's `cluster_table` (list of {cluster, size, and any of budget, selected, degradation, label}; `cluster_table_kind`: "capability" for PASER, "trajectory" for S2L) |
| Near-duplicate clusters | a fuzzy-dedup selection's decisions (dup_cluster_id, dup_cluster_size, dup_kept, keep) and its clusters stage's `pairs.parquet` (`pipeline/report/dedup.py`) |
| Quality | for a cut on a quality score (`quality_score`, `rating` in the score frame): rows at the top, on both sides of the cut and at the bottom, with their text (`report/quality.py`) |
| Examples | the sidecar's first and last ranks, with reasons; row text from the pool |
| Comparison | with two or more selections: overlaps of sidecar ids; `budget`, `tokens.selected`, cost from `stages` (sum of seconds and flops; `timings.total` otherwise), verify losses |
| Verify | `verify.json` (runs, evals: loss, ppl, exact_match), `runs/<name>/train_log.jsonl` |
| Manifest | every manifest in full; its `stages` list ({stage, config, rows_in, rows_out, tokens, seconds, device, flops, cached}) as a table |

This module loads the runs (`ReportContext`) and assembles the page; the sections are built in
`sections.py` (funnel, map, scores, clusters, examples), `compare.py` (comparison, verify,
manifests), `rules.py`, `dedup.py` and `quality.py`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import polars as pl
from thresher.pipeline.report.data import (
    Selection,
    VerifyRun,
    first_user_turn,
    load_runs,
    open_pool,
    workdir,
)
from thresher.pipeline.report.html import is_report, page

log = logging.getLogger(__name__)


def write_report(runs: list[Path], out: Path | str, *, embedder: str | None = None,
                 compute_embeddings: bool = True, max_points: int | None = None) -> Path:
    """Write the HTML report of the given runs to `out` and return its path.

    `compute_embeddings=False` draws the map only from embeddings already cached (verify uses
    this so it never embeds the pool just for a picture); `max_points` caps the map's sample.
    The pool is the one each manifest records (an absolute path), refused when its fingerprint
    is not the manifest's; `out` is never one of the files read, nor inside a pool or cache."""
    from thresher.pipeline.artifacts import atomic_path
    from thresher.pipeline.io.guard import check_outputs, check_replace_file, file_output
    from thresher.pipeline.stages.umap2d import MAX_POINTS

    out = file_output(out)
    check_replace_file(out, is_report, "a thresher report")
    selections, verifies = load_runs([Path(r) for r in runs])
    ctx = ReportContext(selections, verifies, embedder, compute_embeddings,
                        max_points or MAX_POINTS)
    check_outputs([out], [p for s in selections for p in s.files()] +
                  [v.path / "verify.json" for v in verifies] +
                  ([ctx.pool.path, *ctx.pool.input_files()] if ctx.pool is not None else []))
    from thresher.pipeline.report.compare import (
        comparison_section,
        manifest_section,
        verify_section,
    )
    from thresher.pipeline.report.dedup import dedup_section
    from thresher.pipeline.report.quality import quality_section
    from thresher.pipeline.report.rules import rules_section
    from thresher.pipeline.report.sections import (
        clusters_section,
        examples_section,
        funnel_section,
        map_section,
        scores_section,
    )

    parts = [s for s in (funnel_section(ctx), map_section(ctx), scores_section(ctx),
                         rules_section(ctx), dedup_section(ctx), quality_section(ctx),
                         clusters_section(ctx), examples_section(ctx), comparison_section(ctx),
                         verify_section(ctx), manifest_section(ctx)) if s is not None]
    names = ", ".join(s.name for s in selections) or "verify"
    title = f"thresher report: {names}"
    pool = ctx.pool.path if ctx.pool is not None else "-"
    subtitle = f"pool {pool} · {len(selections)} selection(s) · {len(verifies)} verify run(s)"
    with atomic_path(out) as tmp:
        tmp.write_text(page(title, subtitle, parts), encoding="utf-8")
    return out


class ReportContext:
    """The loaded runs, their pool and the per-row facts several sections share."""

    def __init__(self, selections: list[Selection], verifies: list[VerifyRun],
                 embedder: str | None, compute_embeddings: bool, max_points: int):
        self.selections, self.verifies = selections, verifies
        self.embedder, self.compute_embeddings, self.max_points = embedder, compute_embeddings, max_points
        pools = [p for p in (open_pool(s) for s in selections) if p is not None]
        self.pool = pools[0] if pools else None
        if len({p.fingerprint for p in pools}) > 1:
            log.warning("selections come from different pools; pool sections use %s", pools[0].path)
        self.rows = None        # id, source, capability?, row  (whole pool, no text)
        if self.pool is not None:
            self.rows = self.pool.frame(["id", "source"]).with_row_index("row")
            cap = self.pool.meta_field("capability")
            if cap.null_count() < len(cap):
                self.rows = self.rows.with_columns(cap.fill_null("(none)"))
        self.cluster_labels: np.ndarray | None = None    # set by the map section

    def store(self):
        from thresher.pipeline.artifacts import ArtifactStore
        from thresher.pipeline.select import default_workdir

        w = next((workdir(s) for s in self.selections if workdir(s) is not None), None)
        return ArtifactStore(w or default_workdir(self.pool.path))

    def texts(self, ids: list[str]) -> dict[str, str]:
        if self.pool is None or not ids:
            return {}
        found = self.pool.scan().filter(pl.col("id").is_in(pl.Series(ids).implode())) \
            .select("id", "kind", "messages", "text").collect()
        return {r["id"]: first_user_turn(r) for r in found.to_dicts()}


def default_out(runs: list[Path]) -> Path:
    """X.jsonl -> X.jsonl.report.html; a directory -> DIR/report.html."""
    first = Path(runs[0]) if runs else Path(".")
    if first.is_dir():
        return first / "report.html"
    from thresher.pipeline.report.data import selection_base

    base = selection_base(first)
    return Path(f"{base}.report.html") if base else first.with_name("report.html")
