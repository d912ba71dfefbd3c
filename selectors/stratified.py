"""Coverage-centric stratified sampling over score bins (CCS; DEALRec's `prune.py`).

    Stratified("score", bins=50, hard_prune=0.1).select(candidates, budget, seed)

1. Optionally drop the `hard_prune` fraction of rows with the HIGHEST scores first (DEALRec's
   code drops the top 10%, CCS's "too hard / mislabelled" cut; not in DEALRec's paper, so the
   default here is 0.0).
2. Split the rest into `bins` equal-width score bins over [min, max] (not quantiles); a row goes
   to the first bin whose upper edge is >= its score.
3. Allocate the budget over the non-empty bins smallest first, each min(size, remaining // bins
   left) (`balanced.allocate_smallest_first`), a seeded uniform sample within each bin.
The budget counts against all candidates, as in DEALRec. The output interleaves the bins so a
token budget (a prefix cut) still covers every bin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import polars as pl
from thresher.pipeline.budget import Budget
from thresher.selectors.balanced import sample_groups


@dataclass(frozen=True)
class Stratified:
    column: str = field(default="score", metadata={"help": "score column to stratify"})
    bins: int = field(default=50, metadata={"help": "equal-width score bins"})
    hard_prune: float = field(default=0.0, metadata={"help": "drop this top fraction first"})

    def __post_init__(self):
        if self.bins < 1:
            raise ValueError(f"bins must be >= 1, got {self.bins}")
        if not 0 <= self.hard_prune < 1:
            raise ValueError(f"hard_prune must be in [0, 1), got {self.hard_prune}")

    def select(self, candidates: pl.DataFrame, budget: Budget, seed: int = 0) -> pl.DataFrame:
        col = self.column
        if col not in candidates.columns:
            raise ValueError(f"candidates have no score column {col!r}")
        nulls = candidates[col].null_count() + candidates[col].cast(pl.Float64).is_nan().sum()
        if nulls:
            raise ValueError(f"{nulls} candidates have no {col} score")
        ranked = candidates.sort([col, "id"], descending=[True, False])
        pruned = math.floor(self.hard_prune * ranked.height)
        rest = ranked.slice(pruned)
        s = rest[col].cast(pl.Float64).to_numpy()
        lo, hi = float(s.min()), float(s.max())
        width = (hi - lo) / self.bins
        if width > 0:
            b = np.clip(np.ceil((s - lo) / width).astype(np.int64) - 1, 0, self.bins - 1)
        else:
            b = np.zeros(len(s), dtype=np.int64)
        rest = rest.with_columns(_bin=pl.Series(b))
        picked = sample_groups(rest, rest["_bin"].cast(pl.String).str.zfill(6),
                               budget.rows(candidates), seed)
        edge = lambda e: pl.lit(lo) + pl.lit(width) * e
        picked = picked.with_columns(reason=pl.format(
            "stratum {}/{} of {} in [{}, {}]: {} of its {} rows at random (seed {}){}",
            pl.col("_bin") + 1, pl.lit(self.bins), pl.lit(col),
            edge(pl.col("_bin")).round(4), edge(pl.col("_bin") + 1).round(4),
            "_take", "_size", pl.lit(seed),
            pl.lit(f"; top {self.hard_prune:g} ({pruned} rows) pruned first" if pruned else "")))
        return budget.cut(picked.drop("_pick", "_take", "_size", "_group", "_bin", "_aside"),
                          candidates)
