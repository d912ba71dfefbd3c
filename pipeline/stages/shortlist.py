"""A shortlist: the `m` pool rows nearest the target sets by sentence-embedder vectors, the cheap
first stage of a two-stage selection (an expensive method then scores only these rows).

    sl = Shortlist(vectors=Embed(...), targets=(Embed(..., over=TargetPool(path=t)),), m=2000)
    out = run_stage(sl, pool, store)        # -> ShortlistRows
    out.rows                                # int64 [min(m, N)] pool positions, ascending

A row's closeness to a target set (one `--target` file, a task) is its best cosine to any of
the task's examples (RDS+'s per-row score, `scoring/rds.py`); with several tasks the shortlist
takes each task's nearest rows in turn (round robin, a row counted once) until it holds `m`
rows, so every task gets its share. Ties go to the lower pool position. The pool vectors are
streamed in blocks (`topk.normalized_blocks`): memory is a block plus the N scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from thresher.pipeline.artifacts import ArtifactDir
from thresher.pipeline.stage import Stage, StageRun

SCORE_BLOCK = 65536


def nearest_scores(pool_vectors: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """float32 [N]: each pool row's best cosine to any row of `targets` [M, d]."""
    import faiss
    from thresher.pipeline.stages.topk import normalized_blocks

    q = np.ascontiguousarray(targets, dtype=np.float32)
    faiss.normalize_L2(q)
    index = faiss.IndexFlatIP(q.shape[1])
    index.add(q)
    out = np.empty(len(pool_vectors), dtype=np.float32)
    rows = np.arange(len(pool_vectors), dtype=np.int64)
    for s, block in normalized_blocks(pool_vectors, rows, block=SCORE_BLOCK):
        out[s:s + len(block)] = index.search(block, 1)[0][:, 0]
    return out


def round_robin_top(scores: list[np.ndarray], m: int) -> np.ndarray:
    """Pool positions (ascending): each task's best rows in turn until m distinct rows."""
    n = len(scores[0])
    if m >= n:
        return np.arange(n, dtype=np.int64)
    orders = [np.lexsort((np.arange(n), -s)) for s in scores]     # best first, ties: lower row
    taken = np.zeros(n, dtype=bool)
    heads = [0] * len(orders)
    picked = 0
    while picked < m:
        for t, order in enumerate(orders):
            while heads[t] < n and taken[order[heads[t]]]:
                heads[t] += 1
            if heads[t] < n and picked < m:
                taken[order[heads[t]]] = True
                picked += 1
    return np.flatnonzero(taken).astype(np.int64)


@dataclass
class ShortlistRows:
    dir: ArtifactDir
    info: dict

    @property
    def fingerprint(self) -> str:
        return f"shortlist:{self.dir.key}"

    @property
    def rows(self) -> np.ndarray:
        return np.load(self.dir.path("rows.npy"))


@dataclass(frozen=True)
class Shortlist(Stage):
    """The `m` rows nearest the targets (each target Embed stage is one task)."""

    kind: ClassVar[str] = "shortlist"
    per_shard: ClassVar[bool] = False
    vectors: Stage | None = None               # Embed over the pool
    targets: tuple[Stage, ...] = ()            # Embed over each target file
    m: int = 1

    def __post_init__(self):
        if self.vectors is None or not self.targets:
            raise ValueError("a shortlist needs pool vectors and at least one target's vectors")
        if self.m < 1:
            raise ValueError(f"a shortlist keeps at least one row, got m={self.m}")

    def deps(self) -> tuple[Stage, ...]:
        return (*super().deps(), self.vectors, *self.targets)

    def run_whole(self, run: StageRun) -> dict:
        pool_vectors = run.deps[self.vectors].matrix()
        scores = [nearest_scores(pool_vectors, run.deps[t].matrix()) for t in self.targets]
        rows = round_robin_top(scores, self.m)
        with run.dir.writing("rows.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, rows)
        best = np.max(scores, axis=0)
        return {"rows": len(rows), "pool_rows": len(pool_vectors), "m": self.m,
                "min_kept_cosine": round(float(best[rows].min()), 4),
                "max_dropped_cosine": round(float(np.delete(best, rows).max()), 4)
                if len(rows) < len(best) else None}

    def load(self, run: StageRun) -> ShortlistRows:
        return ShortlistRows(run.dir, run.dir.info())
