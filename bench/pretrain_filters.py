"""Quality rules and language ID, thresher vs DataTrove, side by side on the same documents.

    python bench/pretrain_filters.py [--data ../shared/data] [--per-file 300] [--terminal-punct]

Documents: every plain-text row of the shared pool (C4, Wikipedia) and, for more shapes, up to
`--per-file` rows of each chat file as one text (its turns joined by blank lines: code, math,
tool calls, Chinese). DataTrove 0.10.1 runs in a bench-only venv (`bench/.venv-datatrove`,
made by `make bench-datatrove`; never a thresher dependency), through `bench/datatrove_side.py`.

Decisions: each filter's keep/drop and first reason, and each rule ALONE (DataTrove's filter with
every other rule switched off; thresher's value against the same threshold), agreement per rule;
every disagreement is written to bench/out/pretrain_filters_disagreements.jsonl.
Speed: one pass of the four filters over all documents (thresher: the QualityValues stage's
per-shard work with a fresh word cache, then the thresholds) and language ID (the same lid.176
lite model file in both), documents/s and the ratio; each side first runs the first 20
documents untimed (imports, model loads).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
from shared_data import ROOT, SHARED

OUT = ROOT / "bench" / "out"
WARM = 20      # documents each side runs first, untimed: imports, model loads, first calls
VENV = ROOT / "bench" / ".venv-datatrove"


def documents(data: Path, per_file: int) -> list[dict]:
    docs = []
    for path in sorted((data / "pool").glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            recs = [json.loads(line) for line in f]
        if "text" in recs[0]:
            docs += [{"id": r["id"], "text": r["text"], "file": path.stem} for r in recs]
        else:
            docs += [{"id": r["id"], "file": path.stem,
                      "text": "\n\n".join(m["content"] for m in r["messages"])}
                     for r in recs[:per_file]]
    return docs


def thresher_side(docs: list[dict], terminal: bool) -> tuple[pl.DataFrame, float]:
    from thresher.scoring.quality_rules import QualityRulesParams, rules_for, stage_for

    p = QualityRulesParams(c4_no_terminal_punct=terminal)
    stage = stage_for(p)
    rows = [{"id": d["id"], "kind": "text", "text": d["text"], "messages": None} for d in docs]
    worker = stage.open_worker("cpu")
    stage.run_shard(stage.open_worker("cpu"), rows[:WARM])   # imports and first calls, untimed
    t0 = time.perf_counter()
    table = stage.run_shard(worker, rows).tables["annotations"]
    frame = pl.from_arrow(table)
    rules = rules_for(p)
    decided = frame.select("id", *[
        pl.coalesce([pl.when(expr.fill_null(False)).then(pl.lit(name)) for name, expr, _ in rs
                     if expr is not None]).alias(group) for group, rs in rules.items()])
    seconds = time.perf_counter() - t0
    iso = frame.select("id", *[expr.fill_null(False).alias(f"{group}:{name}")
                               for group, rs in rules.items() for name, expr, _ in rs
                               if expr is not None])
    both = iso["gopher_quality:too_many_hashes"] | iso["gopher_quality:too_many_ellipsis"]
    iso = iso.with_columns(both.alias("gopher_quality:too_many_hashes+too_many_ellipsis"))
    return decided.join(iso, on="id").join(frame, on="id"), seconds


def langid_side(docs: list[dict]) -> tuple[list, float]:
    from thresher.pipeline.stages.langid import LangId

    stage = LangId()
    rows = [{"id": d["id"], "kind": "text", "text": d["text"], "messages": None} for d in docs]
    worker = stage.open_worker("cpu")
    stage.annotate(worker, rows[:WARM])
    t0 = time.perf_counter()
    cols = stage.annotate(worker, rows)
    return list(zip(cols["lang"], cols["lang_score"])), time.perf_counter() - t0


def ensure_venv() -> None:
    if not (VENV / "bin" / "python").exists():
        subprocess.run(["make", "-C", str(ROOT), "bench-datatrove"], check=True)


def compare(mine: pl.DataFrame, theirs: dict, docs: list[dict]) -> tuple[list[str], list[dict]]:
    lines, bad = [], []
    groups = ["gopher_repetition", "gopher_quality", "c4", "fineweb"]
    n = len(docs)
    lines.append("| filter or rule | DataTrove drops | thresher drops | agree | agreement |")
    lines.append("|---|---:|---:|---:|---:|")
    for g in groups:
        dt = [r[g] for r in theirs["filters"]]
        me = mine[g].to_list()
        agree = sum((a is True) == (b is None) for a, b in zip(dt, me))
        same_reason = sum((a is True and b is None) or (a is not True and _same(g, a, b))
                          for a, b in zip(dt, me))
        lines.append(f"| **{g}** (first reason agrees: {same_reason}) | {sum(a is not True for a in dt)} "
                     f"| {sum(b is not None for b in me)} | {agree}/{n} | {agree / n:.2%} |")
        for i, (a, b) in enumerate(zip(dt, me)):
            if (a is True) != (b is None):
                bad.append({"doc": docs[i]["id"], "file": docs[i]["file"], "filter": g,
                            "datatrove": a, "thresher": b})
    for rule in theirs["isolated"][0]:
        dt = [r[rule] for r in theirs["isolated"]]
        me = mine[rule].to_list()
        agree = sum(a == b for a, b in zip(dt, me))
        lines.append(f"| {rule} | {sum(dt)} | {sum(me)} | {agree}/{n} | {agree / n:.2%} |")
        for i, (a, b) in enumerate(zip(dt, me)):
            if a != b:
                bad.append({"doc": docs[i]["id"], "file": docs[i]["file"], "rule": rule,
                            "datatrove_drops": a, "thresher_drops": b})
    return lines, bad


def _same(group: str, dt_reason: str, mine: str | None) -> bool:
    """DataTrove's reason names against thresher's rule names."""
    alias = {"gopher_short_doc": "short_doc", "gopher_long_doc": "long_doc",
             "gopher_below_avg_threshold": "below_avg_word_length",
             "gopher_above_avg_threshold": "above_avg_word_length",
             "gopher_too_many_hashes": "too_many_hashes",
             "gopher_too_many_ellipsis": "too_many_ellipsis",
             "gopher_too_many_bullets": "too_many_bullets",
             "gopher_too_many_end_ellipsis": "too_many_end_ellipsis",
             "gopher_below_alpha_threshold": "below_alpha_threshold",
             "gopher_enough_stop_words": "too_few_stop_words"}
    return mine == alias.get(dt_reason, dt_reason)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=SHARED)
    ap.add_argument("--per-file", type=int, default=300)
    ap.add_argument("--terminal-punct", action="store_true",
                    help="C4 with its own terminal-punctuation line rule (default: FineWeb's off)")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    docs = documents(args.data, args.per_file)
    path = OUT / "pretrain_filters_docs.jsonl"
    path.write_text("".join(json.dumps({"id": d["id"], "text": d["text"]}) + "\n" for d in docs))
    print(f"{len(docs)} documents, {sum(len(d['text']) for d in docs) / len(docs):.0f} chars mean")
    ensure_venv()
    from thresher.pipeline.stages.langid import model_file

    t0 = time.perf_counter()
    side = [str(VENV / "bin" / "python"), str(ROOT / "bench" / "datatrove_side.py"), str(path),
            str(OUT / "pretrain_filters_datatrove.json"), "--lid", str(model_file())]
    subprocess.run(side + (["--terminal-punct"] if args.terminal_punct else []), check=True)
    theirs = json.loads((OUT / "pretrain_filters_datatrove.json").read_text())
    mine, seconds = thresher_side(docs, args.terminal_punct)
    langs, lid_seconds = langid_side(docs)
    lines, bad = compare(mine, theirs, docs)
    lid_agree = sum(a[1] == b[0] and (a[0] == (b[0] == "en" and b[1] > 0.65))
                    for a, b in zip(theirs["lid"], langs))
    print("\n".join(lines))
    n = len(docs)
    print(f"\nrule set: DataTrove {n / theirs['seconds']:.0f} docs/s, thresher {n / seconds:.0f} "
          f"docs/s: x{theirs['seconds'] / seconds:.2f}")
    print(f"language ID: DataTrove {n / theirs['lid_seconds']:.0f} docs/s, thresher "
          f"{n / lid_seconds:.0f} docs/s: x{theirs['lid_seconds'] / lid_seconds:.2f}; same label "
          f"and keep decision (languages=[en]) on {lid_agree}/{n}")
    (OUT / "pretrain_filters_disagreements.jsonl").write_text(
        "".join(json.dumps(b) + "\n" for b in bad))
    print(f"{len(bad)} disagreements -> {OUT / 'pretrain_filters_disagreements.jsonl'} "
          f"(whole run {time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    sys.exit(main())
