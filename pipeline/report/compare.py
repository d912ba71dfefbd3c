"""The report's sections across runs: the comparison of the selections (overlap, cost, the
verify losses of each), the verify runs (tables, held-out losses, training curves) and every
manifest with its stages' cost. Each `*_section(ctx)` takes the report's `build.ReportContext`
and returns (anchor, title, HTML) or None when its data is missing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from thresher.pipeline.report import figures as figs
from thresher.pipeline.report.data import Selection, VerifyRun
from thresher.pipeline.report.html import details, esc, figure, json_block, section, table


def cost(sel: Selection) -> tuple[float | None, float | None]:
    """(seconds, FLOPs) of a selection: its stages' sums, else the recorded total time."""
    stages = sel.manifest.get("stages")
    if isinstance(stages, list) and stages:
        secs = sum(float(s.get("seconds") or 0) for s in stages)
        flops = sum(float(s.get("flops") or 0) for s in stages)
        return secs, flops or None
    return sel.manifest.get("timings", {}).get("total"), None


def _verify_losses(ctx, sel: Selection) -> dict[str, float]:
    """Held-out loss per eval set of the verify run that trained on this selection."""
    for v in ctx.verifies:
        for name, subset in v.data.get("subsets", {}).items():
            if Path(subset).name == sel.path.name and name in v.data.get("runs", {}):
                return {e: ev["loss"] for e, ev in v.data["runs"][name]["evals"].items()}
    return {}


def comparison_section(ctx):
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


def verify_section(ctx):
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


def manifest_section(ctx):
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
