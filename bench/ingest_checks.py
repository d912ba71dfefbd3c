"""Ingest speed with the render check (rows no chat template can render are quarantined),
side by side with the same ingest without it (the baseline: what ingest did before), and with
every row rendered instead of one render per sequence of roles.

Each variant ingests the shared pool (27.5k rows, 16 JSONL files) into a fresh pool, in turn,
`--repeat` times (interleaved, so a change in the machine's load hits all three alike); prints
the median seconds, rows per second and the ratio to the baseline.

    .venv/bin/python bench/ingest_checks.py [SHARED_POOL_DIR] [--repeat 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from thresher.pipeline.io import ingest as ingest_mod
from thresher.pipeline.models import chat

VARIANTS = ("no check (baseline)", "render check (shipped)", "render every row")


def _ingest(src: Path, out: Path, variant: str) -> tuple[float, int]:
    real_check, real_unrenderable = chat.RenderCheck.check, ingest_mod._Run.unrenderable
    if variant == VARIANTS[0]:
        ingest_mod._Run.unrenderable = lambda self, row: None
    elif variant == VARIANTS[2]:
        chat.RenderCheck.check = lambda self, messages: self.render(messages)
    try:
        t0 = time.perf_counter()
        rep = ingest_mod.ingest([src], out)
        return time.perf_counter() - t0, rep.read
    finally:
        chat.RenderCheck.check, ingest_mod._Run.unrenderable = real_check, real_unrenderable
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("shared", nargs="?", default="../shared/data/pool", type=Path)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    _ingest(args.shared, Path(tempfile.mkdtemp()) / "warm", VARIANTS[1])   # imports, page cache
    secs: dict[str, list[float]] = {v: [] for v in VARIANTS}
    rows = 0
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.repeat):
            for v in VARIANTS:
                s, rows = _ingest(args.shared, Path(tmp) / f"p{k}", v)
                secs[v].append(s)
    base = statistics.median(secs[VARIANTS[0]])
    print(f"ingest of {args.shared} ({rows} rows), median of {args.repeat}:")
    for v in VARIANTS:
        m = statistics.median(secs[v])
        print(f"  {v:24s} {m:6.2f} s  {rows / m:8.0f} rows/s  x{m / base:.3f} of the baseline  "
              f"(runs: {', '.join(f'{x:.2f}' for x in secs[v])})")


if __name__ == "__main__":
    main()
