"""Where the shared benchmark data is, and seeded rows from its pool: the bench scripts' one
loader (they import it as `shared_data`, from their own folder).

The shared data (a 27.5k-row pool over 13 capabilities, and evaluation sets) is not shipped: it
sits beside a checkout (`../shared/data`) or two levels up from a worktree under `wt/`. Scripts
that can run without it fall back to the bundled sample's pool (`SAMPLE_POOL`).
"""

from __future__ import annotations

import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = next((p / "shared" / "data" for p in (ROOT.parent, ROOT.parent.parent)
               if (p / "shared" / "data" / "pool").is_dir()), ROOT.parent / "shared" / "data")
SAMPLE_POOL = ROOT / "data" / "sample" / "pool"


def sample_rows(n: int, files: list[str], seed: int = 0) -> list[dict]:
    """n canonical rows, an equal seeded share from each of the shared pool's `files` (the bundled
    sample's files when none of them is there), shuffled."""
    from thresher.pipeline.io.readers import read_records
    from thresher.pipeline.io.schema import detect_shape, to_canonical

    paths = [SHARED / "pool" / f for f in files if (SHARED / "pool" / f).exists()]
    paths = paths or sorted(SAMPLE_POOL.glob("*.jsonl"))
    per = -(-n // len(paths))
    rng = random.Random(seed)
    rows = []
    for path in paths:
        recs = [r for _, r, err in read_records(path) if err is None]
        shape = detect_shape(recs[0])
        rows += [to_canonical(rec, shape, path.stem) for rec in rng.sample(recs, min(per, len(recs)))]
    rng.shuffle(rows)
    return rows[:n]
