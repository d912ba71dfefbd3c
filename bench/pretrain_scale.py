"""Pretraining steps at 100k and 1M documents: documents/s and peak memory per step, and the
quality of fuzzy dedup and decontamination against the planted ground truth.

    .venv/bin/python bench/pretrain_corpus.py --docs 100000      # once per size
    .venv/bin/python bench/pretrain_corpus.py --docs 1000000
    heavy --alone .venv/bin/python bench/pretrain_scale.py --sizes 100000 1000000

Each step runs in a fresh Python process (its peak RSS, `ru_maxrss`, is its own, imports
included), on the pipeline's own functions, reading what the previous steps wrote under
bench/out/pretrain/<N>/work:

    ingest       pipeline.io.ingest.ingest of the generated Parquet files (10k-row shards)
    signatures   the MinHashSignatures stage (14 x 8, word 5-grams), local executor
    clusters     the MinHashClusters stage: 14 bands one at a time, the 0.7 check, union-find
    fuzzy_e2e    `run_select(..., "fuzzy-dedup", annotate_only=True)` from an empty work
                 directory: signatures + clusters + keep rule, every row's decision (cluster,
                 kept id, keep, reason) written as Parquet with its manifest. (Writing the kept
                 subset itself is the writers' cost, the same for every method: it counts the
                 tokens of every kept row with the tokenizer when no token counts were asked
                 for, which at 1M documents of 2,500 characters takes longer than the dedup.)
    decontam     the EvalOverlap stage against the shared GSM8K, MBPP and T0 evaluation sets

Then, from the annotations: recall of planted pairs with exact Jaccard >= 0.8 (both rows in one
cluster), the false-duplicate rate of planted pairs below 0.5, rows clustered with no planted
relation, and the planted evaluation leaks found. Prints a table per size and the 1M / 100k
ratios; `--json` writes everything.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench" / "out" / "pretrain"
STEPS = ("ingest", "signatures", "clusters", "fuzzy_e2e", "decontam")
EVALS = ("gsm8k_test.jsonl", "mbpp_test.jsonl", "t0_p3_heldout.jsonl")


def step_ingest(d: Path, work: Path) -> dict:
    from thresher.pipeline.io.ingest import ingest

    shutil.rmtree(work, ignore_errors=True)
    rep = ingest(sorted((d / "src").glob("*.parquet")), work / "pool", rows_per_shard=10_000)
    return {"rows": rep.kept, "quarantined": rep.quarantined}


def _pool_store(work: Path):
    from thresher.pipeline.artifacts import ArtifactStore
    from thresher.pipeline.io.pool import Pool

    return Pool(work / "pool"), ArtifactStore(work / "cache")


def step_signatures(d: Path, work: Path) -> dict:
    from thresher.pipeline.plan import run_stage
    from thresher.pipeline.stages.minhash import MinHashSignatures

    shutil.rmtree(work / "cache", ignore_errors=True)        # computed here, never cached
    pool, store = _pool_store(work)
    run_stage(MinHashSignatures(), pool, store)
    return {"rows": pool.n_rows}


def step_clusters(d: Path, work: Path) -> dict:
    from thresher.pipeline.plan import run_stage
    from thresher.pipeline.stages.lsh import MinHashClusters

    pool, store = _pool_store(work)
    out = run_stage(MinHashClusters(), pool, store)
    info = out.dir.info()
    return {"rows": pool.n_rows, **{k: info[k] for k in (
        "candidate_pairs", "pairs_kept", "pairs_rejected", "clusters", "rows_duplicate")}}


def step_fuzzy_e2e(d: Path, work: Path) -> dict:
    from thresher.pipeline.io.pool import Pool
    from thresher.pipeline.select import run_select

    shutil.rmtree(work / "e2e", ignore_errors=True)
    m = run_select(work / "pool", "fuzzy-dedup", "100%", work / "e2e" / "decisions.parquet",
                   workdir=work / "e2e" / "cache", annotate_only=True)
    return {"rows": Pool(work / "pool").n_rows, "kept": m["counts"]["keep"],
            "removed": m["config"]["method"]["removed"]}


def step_decontam(d: Path, work: Path) -> dict:
    import shared_data
    from thresher.pipeline.plan import run_stage
    from thresher.pipeline.stages.decontam import EvalOverlap

    pool, store = _pool_store(work)
    evals = tuple(str(shared_data.SHARED / "eval" / e) for e in EVALS)
    out = run_stage(EvalOverlap(evals=evals), pool, store)
    import polars as pl

    marked = out.scan().filter(pl.col("decon_ngrams") > 0).select("id").collect()
    (work / "decontam_marked.json").write_text(json.dumps(marked["id"].to_list()))
    return {"rows": pool.n_rows, "rows_marked": marked.height}


def child(step: str, d: Path, work: Path) -> None:
    t0 = time.perf_counter()
    out = globals()[f"step_{step}"](d, work)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    out["peak_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print("RESULT " + json.dumps(out), flush=True)


def quality(d: Path, work: Path) -> dict:
    """Planted pairs found, false duplicates, unplanted clustered rows, leaks found."""
    import polars as pl

    ann = next((work / "cache" / "minhash_clusters").glob("*/annotations.parquet"))
    cl = pl.read_parquet(ann, columns=["id", "dup_cluster_id", "dup_cluster_size"])
    pairs = pl.read_parquet(d / "truth" / "pairs.parquet")
    both = pairs.join(cl.rename({"id": "id_a", "dup_cluster_id": "ca"}).drop("dup_cluster_size"),
                      on="id_a").join(cl.rename({"id": "id_b", "dup_cluster_id": "cb"})
                                      .drop("dup_cluster_size"), on="id_b")
    both = both.with_columns(same=pl.col("ca") == pl.col("cb"))
    solo = both.filter(pl.col("cluster").is_null())
    high, low = both.filter(pl.col("jaccard") >= 0.8), solo.filter(pl.col("jaccard") < 0.5)
    planted = set(pairs["id_a"]) | set(pairs["id_b"])
    clustered = cl.filter(pl.col("dup_cluster_size") > 1)
    unplanted = clustered.filter(~pl.col("id").is_in(list(planted)))
    rules = pl.read_parquet(d / "truth" / "rules.parquet")
    why = unplanted.join(rules, on="id", how="left")["failure"].fill_null("(none)").value_counts()
    background = unplanted.join(rules, on="id", how="anti").filter(
        pl.col("id") != pl.col("dup_cluster_id"))
    exact = _exact_jaccard(d, background["id"].to_list(), background["dup_cluster_id"].to_list())
    curve = (both.with_columns(bin=(pl.col("jaccard") * 10).floor() / 10).group_by("bin")
             .agg(pl.col("same").mean().round(3).alias("found"), pl.len().alias("pairs"))
             .sort("bin"))
    leaks = pl.read_parquet(d / "truth" / "leaks.parquet")
    marked = set(json.loads((work / "decontam_marked.json").read_text()))
    return {"recall_at_0.8": round(float(high["same"].mean()), 4), "pairs_at_0.8": high.height,
            "false_dup_below_0.5": round(float(low["same"].mean()), 4),
            "pairs_below_0.5": low.height, "unplanted_rows_clustered": unplanted.height,
            "unplanted_by_planted_failure": dict(zip(why["failure"], why["count"])),
            "background_dups_vs_their_root": {
                "rows": len(exact), "exact_jaccard_min": round(float(exact.min()), 3)
                if len(exact) else None, "below_0.5": int((exact < 0.5).sum())},
            "found_by_jaccard": curve.to_dicts(),
            "leaks_found": sum(i in marked for i in leaks["id"]), "leaks": leaks.height,
            "rows_marked_decontam": len(marked)}


def _exact_jaccard(d: Path, ids: list[str], roots: list[str]):
    """Exact word 5-gram Jaccard of each row with the first row of its cluster."""
    import numpy as np
    import polars as pl
    from pretrain_corpus import jaccards

    want = set(ids) | set(roots)
    texts = {}
    for f in sorted((d / "src").glob("*.parquet")):
        t = pl.read_parquet(f).filter(pl.col("id").is_in(list(want)))
        texts.update(dict(zip(t["id"], t["text"])))
    if not ids:
        return np.zeros(0)
    return jaccards([texts[i] for i in ids], [texts[r] for r in roots])


def run_size(n: int, steps: list[str]) -> dict:
    d = DATA / str(n)
    work = d / "work"
    results = {}
    for step in steps:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--child", step, "--dir", str(d)],
                              check=False, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            raise RuntimeError(f"step {step} at {n}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
        r = json.loads(line[7:])
        r["docs_per_s"] = round(r["rows"] / r["seconds"], 1)
        results[step] = r
        print(f"  {n:>9,} {step:<11} {r['seconds']:8.1f} s {r['docs_per_s']:10,.0f} docs/s "
              f"{r['peak_mb']:8.0f} MB  [{time.perf_counter() - t0:.0f}s]", flush=True)
    if {"clusters", "decontam"} <= set(steps) or "fuzzy_e2e" in steps:
        results["quality"] = quality(d, work)
        print("  quality: " + json.dumps({k: v for k, v in results["quality"].items()
                                          if k != "found_by_jaccard"}), flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    ap.add_argument("--child")
    ap.add_argument("--dir", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.dir, args.dir / "work")
        return
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}")
    out = {n: run_size(n, args.steps) for n in args.sizes}
    if len(args.sizes) == 2:
        a, b = args.sizes
        print(f"ratios {b:,} / {a:,} (time, peak memory):")
        for step in args.steps:
            ra, rb = out[a][step], out[b][step]
            print(f"  {step:<11} time x{rb['seconds'] / ra['seconds']:.2f}  "
                  f"memory x{rb['peak_mb'] / ra['peak_mb']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
