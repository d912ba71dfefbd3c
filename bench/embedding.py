"""Embedding stage (thresher.pipeline.embed.embed_pool) vs a plain SentenceTransformer.encode.

    .venv/bin/python bench/embedding.py [POOL_DIR_OR_FILES ...] [--rows 2000] [--part conversation]

Takes a seeded sample of `--rows` chat rows from the given inputs (default: ../shared/data/pool),
ingests it into a temporary pool, then embeds the same texts twice with all-MiniLM-L6-v2 on the
CPU: (a) `SentenceTransformer.encode(texts, batch_size=64, normalize_embeddings=True)`, the plain
baseline, and (b) `embed_pool` into a fresh artifact store (token-length-sorted batches of 64,
float16 shards written and concatenated into the memory-mapped matrix). Both include loading the
model. Prints rows/s, the ratio, and the largest difference between the two matrices.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("inputs", nargs="*", default=[str(ROOT.parent / "shared" / "data" / "pool")])
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--part", default="conversation")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--ours-first", action="store_true", help="run the stage before the baseline")
    args = ap.parse_args()

    from thresher.pipeline.artifacts import ArtifactStore
    from thresher.pipeline.embed import embed_pool
    from thresher.pipeline.models import DEFAULT_EMBEDDER, load_embedder, resolve
    from thresher.pipeline.pool import Pool, ingest
    from thresher.pipeline.readers import expand_inputs
    from thresher.pipeline.schema import row_text

    tmp = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    lines = [ln + "\n" for f in expand_inputs([Path(p) for p in args.inputs])
             for ln in f.read_text().splitlines() if '"messages"' in ln]   # chat rows only
    random.Random(0).shuffle(lines)
    (tmp / "sample.jsonl").write_text("".join(lines[:args.rows]))
    ingest([tmp / "sample.jsonl"], tmp / "pool", rows_per_shard=500)
    pool = Pool(tmp / "pool")
    texts = [row_text(r, args.part) for r in pool.iter_rows(["kind", "messages", "text"])]
    model = resolve(DEFAULT_EMBEDDER)
    print(f"{len(texts)} rows ({args.part}, mean {np.mean([len(t) for t in texts]):.0f} chars), "
          f"{model.identity}, batch {args.batch_size}, {os.cpu_count()} CPUs "
          f"({platform.machine()}), torch threads default")

    def plain():
        t = time.perf_counter()
        st = load_embedder(model, device="cpu")
        vec = st.encode(texts, batch_size=args.batch_size, normalize_embeddings=True,
                        show_progress_bar=False)
        return vec, time.perf_counter() - t

    def stage():
        t = time.perf_counter()
        emb = embed_pool(pool, ArtifactStore(tmp / "work"), model, part=args.part, device="cpu",
                         batch_size=args.batch_size)
        return emb.matrix(), time.perf_counter() - t

    if args.ours_first:
        ours, t_ours = stage()
        base, t_base = plain()
    else:
        base, t_base = plain()
        ours, t_ours = stage()

    diff = float(np.abs(ours.astype(np.float32) - base).max())
    print(f"plain SentenceTransformer.encode  {t_base:7.1f} s  {len(texts) / t_base:6.1f} rows/s")
    print(f"thresher embed_pool (cached)      {t_ours:7.1f} s  {len(texts) / t_ours:6.1f} rows/s")
    print(f"ratio (ours / plain rows/s): x{t_base / t_ours:.2f}; max |diff| {diff:.4f} (float16)")
    print(json.dumps({"rows": len(texts), "plain_s": round(t_base, 2), "ours_s": round(t_ours, 2),
                      "ratio": round(t_base / t_ours, 3)}))


if __name__ == "__main__":
    main()
