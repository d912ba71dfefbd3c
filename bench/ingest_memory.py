"""Peak memory of `thresher ingest` vs input size, against loading everything at once.

Ingests the shared pool (27.5k rows, 48 MB) at 1x and at 4x its size (copies of the files),
each in a fresh process, and does the same with the baseline a user would otherwise write:
every line json-loaded into one list, then one polars DataFrame written as Parquet. Prints peak
RSS for each and the growth ratios (4x / 1x): a streaming ingest should stay near 1.

    .venv/bin/python bench/ingest_memory.py [SHARED_POOL_DIR]
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import resource, sys, time
from pathlib import Path
t = time.perf_counter()
if sys.argv[1] == "thresher":
    from thresher.pipeline.io.ingest import ingest
    ingest([Path(sys.argv[2])], Path(sys.argv[3]))
else:
    import json
    import polars as pl
    rows = [json.loads(line) for p in sorted(Path(sys.argv[2]).glob("*.jsonl")) for line in open(p)]
    rows = [{"id": r["id"], "messages": r.get("messages"), "text": r.get("text"),
             "meta": json.dumps({k: v for k, v in r.items() if k not in ("id", "messages", "text")})}
            for r in rows]
    pl.DataFrame(rows, infer_schema_length=None).write_parquet(Path(sys.argv[3]).with_suffix(".parquet"))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, time.perf_counter() - t)
"""


def run(kind: str, src: Path, out: Path) -> tuple[float, float]:
    res = subprocess.run([sys.executable, "-c", CHILD, kind, str(src), str(out)], check=True,
                         capture_output=True, text=True)
    mb, secs = res.stdout.split()
    return float(mb), float(secs)


def main() -> None:
    shared = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/pool")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        big = tmp / "x4"
        big.mkdir()
        for k in range(4):
            for f in shared.glob("*.jsonl"):
                shutil.copy(f, big / f"{f.stem}-{k}.jsonl")
        results = {}
        for kind in ("thresher", "load-all"):
            for label, src in (("1x", shared), ("4x", big)):
                results[kind, label] = run(kind, src, tmp / f"{kind}-{label}")
                mb, secs = results[kind, label]
                print(f"{kind:9s} {label}: peak RSS {mb:7.0f} MB   {secs:6.1f} s")
        for kind in ("thresher", "load-all"):
            print(f"{kind:9s} memory growth 4x/1x input: {results[kind, '4x'][0] / results[kind, '1x'][0]:.2f}")
        print(f"peak RSS at 4x, load-all / thresher: "
              f"{results['load-all', '4x'][0] / results['thresher', '4x'][0]:.2f}")


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"(bench took {time.perf_counter() - t0:.0f} s)")
