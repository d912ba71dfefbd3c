"""Keep every row whose score is below a threshold; if they exceed the budget, a seeded random
sample of them (the reason says so). SemDeDup's cut: `Threshold("dup_sim", below=1 - eps)`.

    Threshold("dup_sim", below=0.95).select(candidates, budget, seed)

Rows are kept in candidate order (pool order) when they fit, so the full survivor set is the
pool's own order; a null score (nothing to compare with) counts as below.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl
from thresher.pipeline.budget import Budget
from thresher.selectors.base import fit_survivors


@dataclass(frozen=True)
class Threshold:
    column: str = field(default="score", metadata={"help": "score column"})
    below: float = field(default=0.5, metadata={"help": "keep rows whose score is < this"})

    def select(self, candidates: pl.DataFrame, budget: Budget, seed: int = 0) -> pl.DataFrame:
        if self.column not in candidates.columns:
            raise ValueError(f"candidates have no score column {self.column!r}")
        col = pl.col(self.column)
        surv = candidates.filter(col.is_null() | col.is_nan() | (col < self.below))
        return fit_survivors(surv, candidates, budget, seed, f"{self.column} < {self.below:g}",
                             f"below {round(self.below, 4)}")
