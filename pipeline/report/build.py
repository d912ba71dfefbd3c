"""`thresher report RUN...`: one self-contained HTML file showing what was selected and why.

    write_report([Path("out/semdedup.jsonl"), Path("out/random.jsonl")], Path("out/report.html"))

The file inlines plotly.js (see `report_html.py` for why plotly) and opens offline. Sections
appear when their data exists; what each reads (RUN arguments: see `report_data.py`):

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
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import polars as pl
from thresher.pipeline.report import figures as figs
from thresher.pipeline.report.data import (
    Selection,
    VerifyRun,
    count_lines,
    cuts,
    first_user_turn,
    load_runs,
    open_pool,
    quarantine_reasons,
    score_columns,
    workdir,
)
from thresher.pipeline.report.html import (
    details,
    esc,
    figure,
    is_report,
    json_block,
    page,
    section,
    table,
)

log = logging.getLogger(__name__)

MAX_SCORE_PLOTS = 4
EXAMPLES = 5


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
    from thresher.pipeline.report.dedup import dedup_section
    from thresher.pipeline.report.quality import quality_section
    from thresher.pipeline.report.rules import rules_section

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


def _by_group(ctx: ReportContext, column: str) -> tuple[list[str], dict[str, list[int]]]:
    pool_counts = ctx.rows[column].value_counts().sort(["count", column], descending=[True, False])
    groups = pool_counts[column].to_list()
    series = {"pool": pool_counts["count"].to_list()}
    for s in ctx.selections:
        got = dict(ctx.rows.join(s.chosen.select("id"), on="id")[column].value_counts().iter_rows())
        series[f"selected by {s.name}"] = [got.get(g, 0) for g in groups]
    return [str(g) for g in groups], series


def funnel_section(ctx: ReportContext):
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


def scores_section(ctx: ReportContext):
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


def examples_section(ctx: ReportContext):
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

def map_section(ctx: ReportContext):
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


def clusters_section(ctx: ReportContext):
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


# ------------------------------------------------------------------ comparison

def cost(sel: Selection) -> tuple[float | None, float | None]:
    """(seconds, FLOPs) of a selection: its stages' sums, else the recorded total time."""
    stages = sel.manifest.get("stages")
    if isinstance(stages, list) and stages:
        secs = sum(float(s.get("seconds") or 0) for s in stages)
        flops = sum(float(s.get("flops") or 0) for s in stages)
        return secs, flops or None
    return sel.manifest.get("timings", {}).get("total"), None


def _verify_losses(ctx: ReportContext, sel: Selection) -> dict[str, float]:
    """Held-out loss per eval set of the verify run that trained on this selection."""
    for v in ctx.verifies:
        for name, subset in v.data.get("subsets", {}).items():
            if Path(subset).name == sel.path.name and name in v.data.get("runs", {}):
                return {e: ev["loss"] for e, ev in v.data["runs"][name]["evals"].items()}
    return {}


def comparison_section(ctx: ReportContext):
    sels = ctx.selections
    if len(sels) < 2:
        return None
    ids = [set(s.chosen["id"].to_list()) for s in sels]
    n = len(sels)
    counts = np.array([[len(ids[i] & ids[j]) for j in range(n)] for i in range(n)])
    jac = np.array([[len(ids[i] & ids[j]) / max(1, len(ids[i] | ids[j])) for j in range(n)]
                    for i in range(n)])
    names = [s.name for s in sels]
    losses = {s.name: _verify_losses(ctx, s) for s in sels}
    evals = sorted({e for v in losses.values() for e in v})
    rows = []
    for s in sels:
        secs, flops = cost(s)
        rows.append([s.name, s.method, s.manifest.get("budget"), s.chosen.height,
                     s.manifest.get("tokens", {}).get("selected"), secs, flops,
                     *[losses[s.name].get(e) for e in evals]])
    head = ["selection", "method", "budget", "rows", "tokens", "seconds", "FLOPs",
            *[f"{e} held-out loss" for e in evals]]
    body = figure(figs.overlap_heatmap(names, counts, jac), "overlap",
                  height=max(320, 120 + 60 * n)) + table(head, rows)
    return ("compare", "Comparison", section("compare", "Comparing the selections", body,
                                             "Cells: rows in both selections and their Jaccard "
                                             "index (shared / union)."))


# ------------------------------------------------------------------ verify and manifests

def _verify_table(v: VerifyRun) -> str:
    runs = v.data.get("runs", {})
    evals = list(next(iter(runs.values()))["evals"]) if runs else []
    head = ["run", "rows", "steps", "train seconds"]
    for e in evals:
        head += [f"{e} loss", f"{e} ppl", f"{e} exact match"]
    rows = []
    for name, r in runs.items():
        cells = [name, r.get("rows"), r.get("steps"), r.get("train_seconds")]
        for e in evals:
            ev = r["evals"][e]
            cells += [ev.get("loss"), ev.get("ppl"), ev.get("exact_match")]
        rows.append(cells)
    return table(head, rows)


def verify_section(ctx: ReportContext):
    if not ctx.verifies:
        return None
    body = []
    for k, v in enumerate(ctx.verifies):
        runs = v.data.get("runs", {})
        evals = list(next(iter(runs.values()))["evals"]) if runs else []
        body.append(f"<h3>{esc(v.path)}</h3>{_verify_table(v)}")
        plots = []
        if evals:
            plots.append(figure(figs.heldout_dots(list(runs), {
                e: [r["evals"][e]["loss"] for r in runs.values()] for e in evals}),
                f"heldout-{k}", height=360))
        if v.train_logs:
            plots.append(figure(figs.train_curves(v.train_logs), f"trainloss-{k}", height=360))
        body.append(f"<div class='grid'>{''.join(plots)}</div>")
    note = ("base = the untrained model; random = a seeded random subset of the same size; "
            "held-out loss is over response tokens of the eval rows.")
    return ("verify", "Verify", section("verify", "Verify: training on the subsets",
                                        "".join(body), note))


def _stages_table(stages: list[dict]) -> str:
    head = ["stage", "rows in", "rows out", "tokens", "seconds", "device", "FLOPs", "cached"]
    return table(head, [[s.get("stage"), s.get("rows_in"), s.get("rows_out"), s.get("tokens"),
                         s.get("seconds"), s.get("device"), s.get("flops"),
                         "yes" if s.get("cached") else "no"] for s in stages])


def manifest_section(ctx: ReportContext):
    body = []
    for sel in ctx.selections:
        m = sel.manifest
        stages = m.get("stages")
        inner = (_stages_table(stages) if isinstance(stages, list) and stages else
                 table(["stage", "seconds"], [[k, v] for k, v in m.get("timings", {}).items()]))
        body.append(details(f"{sel.name}: {sel.method}, budget {m.get('budget')}, seed "
                            f"{m.get('seed')}", inner + json_block(m), open_=False))
    for v in ctx.verifies:
        data = {k: v for k, v in v.data.items() if k not in ("runs", "markdown")}
        body.append(details(f"verify {v.path}", json_block(data)))
    if not body:
        return None
    return ("manifest", "Manifest", section("manifest", "Manifests and cost", "".join(body)))


def default_out(runs: list[Path]) -> Path:
    """X.jsonl -> X.jsonl.report.html; a directory -> DIR/report.html."""
    first = Path(runs[0]) if runs else Path(".")
    if first.is_dir():
        return first / "report.html"
    from thresher.pipeline.report.data import selection_base

    base = selection_base(first)
    return Path(f"{base}.report.html") if base else first.with_name("report.html")
