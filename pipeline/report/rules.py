"""The report's filter section: what each rule of a filter method removed, and how close the kept
rows came to its threshold.

Reads, per selection (or annotate-only output) whose method reports rule counts
(`config.method.rules`, written by `pipeline/filtering.py`) and whose score frame holds `keep`
and `reason`:
- the counts table: per rule, rows failing it first (the reason), at all, and only it;
- each threshold rule's value histogram (every row with a value in grey, the kept rows in
  colour) with the threshold as a dashed line (`figures.score_histogram`);
- seeded examples (the manifest's seed) of rows each rule removed (its `reason`), and the kept
  rows nearest each threshold.
"""

from __future__ import annotations

import numpy as np
import polars as pl
from thresher.pipeline.report import figures as figs
from thresher.pipeline.report.html import esc, figure, section, table

EXAMPLES = 3


def _rules(sel) -> dict:
    rules = sel.lookup("rules")
    return rules.get("rules", {}) if isinstance(rules, dict) else {}


def _counts_table(rules: dict) -> str:
    rows = [[name, f"{r['op']} {r['threshold']:g}" if r.get("threshold") is not None else "-",
             r["first"], r["any"], r["only"]] for name, r in rules.items()]
    return table(["rule", "fails when", "first failing rule of", "fails", "only rule failed by"],
                 rows)


def _histograms(sel, frame: pl.DataFrame, rules: dict) -> list[str]:
    plots = []
    kept = frame.filter(pl.col("keep").fill_null(False))
    for name, r in rules.items():
        col, thr = r.get("column"), r.get("threshold")
        if col is None or thr is None or col not in frame.columns:
            continue
        every = frame[col].cast(pl.Float64).drop_nulls().to_numpy()
        if every.size == 0:
            continue
        chosen = kept[col].cast(pl.Float64).drop_nulls().to_numpy()
        fig = figs.score_histogram(col, every, chosen, [float(thr)], f"{sel.name} {name}")
        plots.append(figure(fig, f"rule-{sel.name}-{name.replace(':', '-')}", height=300))
    return plots


def _examples(ctx, sel, frame: pl.DataFrame, rules: dict) -> str:
    seed = int(sel.manifest.get("seed", 0) or 0)
    picks: list[tuple[str, str, str, str]] = []      # (rule, what, id, value)
    for i, (name, r) in enumerate(rules.items()):
        col = r.get("column")
        removed = frame.filter(pl.col("reason") == name)
        if removed.height:
            take = np.random.default_rng(seed + i).permutation(removed.height)[:EXAMPLES]
            picks += [(name, "removed", row["id"], _value(row, col))
                      for row in removed[np.sort(take)].to_dicts()]
        if col is None or r.get("threshold") is None or col not in frame.columns:
            continue
        near = frame.filter(pl.col("keep") & pl.col(col).is_not_null()).with_columns(
            gap=(pl.col(col).cast(pl.Float64) - float(r["threshold"])).abs()).sort("gap", "id")
        picks += [(name, "kept, nearest the threshold", row["id"], _value(row, col))
                  for row in near.head(EXAMPLES).to_dicts()]
    if not picks:
        return ""
    texts = ctx.texts(list({p[2] for p in picks}))
    rows = [[rule, what, rid, value, texts.get(rid, "")] for rule, what, rid, value in picks]
    return table(["rule", "example of", "id", "value", "text"], rows, text_cols=(4,))


def _value(row: dict, col: str | None) -> str:
    v = row.get(col) if col else None
    return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))


def rules_section(ctx):
    body = []
    for sel in ctx.selections:
        rules, frame = _rules(sel), sel.decisions
        if not rules or frame is None or not {"keep", "reason"} <= set(frame.columns):
            continue
        total = sel.lookup("rules")
        body.append(f"<h3>{esc(sel.name)} ({esc(sel.method)}): kept {total.get('kept', '?'):,} of "
                    f"{total.get('rows', '?'):,} rows</h3>")
        body.append(_counts_table(rules))
        plots = _histograms(sel, frame, rules)
        if plots:
            body.append(f"<div class='grid'>{''.join(plots)}</div>")
        body.append(_examples(ctx, sel, frame, rules))
    if not body:
        return None
    return ("rules", "Filter rules", section(
        "rules", "Filter rules: what each rule removed", "".join(body),
        "A row's reason is the first rule it fails. Histograms: every row with a value (grey) "
        "and the kept rows (colour); the dashed line is the rule's threshold. Examples are "
        "seeded (the selection's seed)."))
