"""Embedding stage (thresher.pipeline.stages.embed.embed_pool) vs a plain SentenceTransformer.encode.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/embedding.py [POOL_DIR_OR_FILES ...] \
        [--rows 2000] [--part conversation] [--repeats 2]

Takes a seeded sample of `--rows` chat rows from the given inputs (default: ../shared/data/pool),
ingests it into a temporary pool, then embeds the same texts twice with all-MiniLM-L6-v2 on the
CPU: (a) `SentenceTransformer.encode(texts, batch_size=64, normalize_embeddings=True)`, the plain
baseline (float32, transformers' CPU default), and (b) `embed_pool` into a fresh artifact store
(bf16 on CPUs with native bf16, token-length-sorted batches of 64, float16 shards written and
concatenated into the memory-mapped matrix). Both include loading the model. The two alternate
`--repeats` times; prints rows/s, the median of the per-repeat ratios, and the smallest cosine
between a row's two vectors (target >= 0.99).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import shared_data

SHARED = shared_data.SHARED / "pool"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("inputs", nargs="*", default=[str(SHARED)])
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--part", default="conversation")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="alternating repeats of both runs")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (both runs)")
    args = ap.parse_args()

    from thresher.pipeline.artifacts import ArtifactStore
    from thresher.pipeline.io.ingest import ingest
    from thresher.pipeline.io.inputs import expand_inputs
    from thresher.pipeline.io.pool import Pool
    from thresher.pipeline.io.schema import row_text
    from thresher.pipeline.models.resolve import DEFAULT_EMBEDDER, load_embedder, resolve
    from thresher.pipeline.stages.embed import embed_pool

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
          f"({platform.machine()}), torch threads default, load average {os.getloadavg()}")

    def plain():
        t = time.perf_counter()
        st = load_embedder(model, device=args.device)
        vec = st.encode(texts, batch_size=args.batch_size, normalize_embeddings=True,
                        show_progress_bar=False)
        return vec, time.perf_counter() - t

    def stage():
        t = time.perf_counter()
        emb = embed_pool(pool, ArtifactStore(tmp / "work"), model, part=args.part, device=args.device,
                         batch_size=args.batch_size)
        return emb.matrix(), time.perf_counter() - t

    ratios, t_base, t_ours = [], [], []
    for r in range(args.repeats):       # alternating, so both see the same load on a shared CPU
        base, tb = plain()
        shutil.rmtree(tmp / "work", ignore_errors=True)   # a fresh cache every repeat
        ours, to = stage()
        t_base.append(tb)
        t_ours.append(to)
        ratios.append(tb / to)
        print(f"repeat {r + 1}: plain {tb:.1f} s, thresher {to:.1f} s, ratio x{tb / to:.2f}, "
              f"load average {os.getloadavg()}", flush=True)
    a, b = ours.astype(np.float32), base.astype(np.float32)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    tb, to, ratio = (float(np.median(v)) for v in (t_base, t_ours, ratios))
    print(f"plain SentenceTransformer.encode  {tb:7.1f} s  {len(texts) / tb:6.1f} rows/s (median)")
    print(f"thresher embed_pool               {to:7.1f} s  {len(texts) / to:6.1f} rows/s (median)")
    print(f"ratio (plain time / thresher time): x{ratio:.2f} (target >= 2); min cosine "
          f"{cos.min():.5f}, mean {cos.mean():.5f} (target >= 0.99)")
    print(json.dumps({"rows": len(texts), "plain_s": [round(t, 2) for t in t_base],
                      "ours_s": [round(t, 2) for t in t_ours], "ratio": round(ratio, 3),
                      "min_cos": round(float(cos.min()), 6)}))


if __name__ == "__main__":
    main()
