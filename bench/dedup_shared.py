"""Fuzzy dedup on near-duplicate corpora nobody here wrote: the shared pool's chat files, each on
its own, with the candidate check at 0.7 and off, against the removal rates pretraining.md §4.2
reports for word-5 x 14x8 MinHash on the full conversation.

    heavy .venv/bin/python bench/dedup_shared.py [--data ../shared/data] [--files ...]

Each file is ingested into its own pool (bench/out/dedup_shared/<file>/pool) and deduplicated
with the fuzzy-dedup method's stages (chat rows keyed by their user and assistant turns).
Prints, per file and check threshold: rows, rows removed (%), the largest cluster, and an
example pair of the largest cluster.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import shared_data

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out" / "dedup_shared"
FILES = ("fastchat_dummy_conversation", "t0_p3_subset", "new_codealpaca",
         "llamafactory_glaive_toolcall_en_demo", "gsm8k_train")
REFERENCE = {"fastchat_dummy_conversation": "82.8% -> 62.6% (largest 137 -> 126)",
             "new_codealpaca": "1.8% -> 0.7% (largest 14 -> 6)",
             "t0_p3_subset": "28.0% -> 24.5%", "gsm8k_train": "0.0%",
             "llamafactory_glaive_toolcall_en_demo": "(genuine near-copies)"}


def main() -> None:
    import polars as pl
    from thresher.pipeline.artifacts import ArtifactStore
    from thresher.pipeline.io.ingest import ingest
    from thresher.pipeline.io.pool import Pool
    from thresher.pipeline.plan import run_stage
    from thresher.pipeline.stages.lsh import MinHashClusters
    from thresher.pipeline.stages.textnorm import row_key

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=shared_data.SHARED)
    ap.add_argument("--files", nargs="+", default=list(FILES))
    args = ap.parse_args()
    print("file | threshold | rows | removed | largest cluster | seconds | reference (§4.2: no "
          "check -> check 0.7)")
    for name in args.files:
        folder = OUT / name
        shutil.rmtree(folder, ignore_errors=True)
        ingest([args.data / "pool" / f"{name}.jsonl"], folder / "pool")
        pool = Pool(folder / "pool")
        for threshold in (0.0, 0.7):
            t0 = time.perf_counter()
            out = run_stage(MinHashClusters(threshold=threshold), pool, ArtifactStore(folder / "w"))
            seconds = time.perf_counter() - t0
            f = out.frame()
            removed = int((f["dup_cluster_id"] != f["id"]).sum())
            largest = int(f["dup_cluster_size"].max())
            print(f"{name} | {threshold} | {f.height} | {removed} ({100 * removed / f.height:.1f}%) "
                  f"| {largest} | {seconds:.1f} | {REFERENCE.get(name, '')}")
            if threshold == 0.7 and largest > 1:
                root = f.filter(pl.col("dup_cluster_size") == largest)["dup_cluster_id"][0]
                big = f.filter(pl.col("dup_cluster_id") == root)
                a, b = big["id"][0], big["id"][1]
                rows = {r["id"]: row_key(r) for r in pool.rows([a, b])}
                print(f"    e.g. {a}: {rows[a][:160]!r}\n         {b}: {rows[b][:160]!r}")


if __name__ == "__main__":
    main()
