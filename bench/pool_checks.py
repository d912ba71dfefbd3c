"""What checking a pool against pool.json costs, against reading the pool without checks.

    .venv/bin/python bench/pool_checks.py POOL_DIR [repeats]

Baseline (no checks): read pool.json, then the candidate columns every select reads first
(id, source, kind, n_chars), and separately every row (what a per-shard stage reads).
Checks: the layout check at open (a stat and the Parquet footer per shard: sizes and row
counts) and the sha256 of every shard (done once per Pool, before its rows are first read).
Prints medians and the checks' cost as a fraction of each baseline.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
from thresher.pipeline.io.pool import Pool


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    path = Path(sys.argv[1])
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 7
    info = json.loads((path / "pool.json").read_text())
    shards = [path / "shards" / (e if isinstance(e, str) else e["name"]) for e in info["shards"]]

    def baseline_candidates():
        json.loads((path / "pool.json").read_text())
        pl.scan_parquet([str(s) for s in shards]).select("id", "source", "kind", "n_chars").collect()

    def baseline_rows():
        for s in shards:
            for b in pq.ParquetFile(s).iter_batches(batch_size=1024):
                b.to_pylist()

    def layout():
        Pool(path)

    def hashes():
        p = Pool(path)
        p.verify_contents()

    base_c = median_seconds(baseline_candidates, repeats)
    base_r = median_seconds(baseline_rows, max(1, repeats // 2))
    t_layout = median_seconds(layout, repeats)
    t_hash = median_seconds(hashes, repeats) - t_layout
    size = sum(s.stat().st_size for s in shards)
    print(f"pool {path}: {info['kept']} rows, {len(shards)} shards, {size / 1e6:.1f} MB")
    print(f"baseline: candidate columns {base_c * 1e3:.1f} ms, all rows {base_r * 1e3:.1f} ms")
    print(f"layout check at open {t_layout * 1e3:.1f} ms = x{t_layout / base_c:.2f} of the "
          f"candidate read; sha256 of all shards {t_hash * 1e3:.1f} ms = x{t_hash / base_c:.2f} "
          f"of the candidate read, x{t_hash / base_r:.3f} of reading every row")


if __name__ == "__main__":
    main()
