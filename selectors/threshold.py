"""Keep every row whose score is below a threshold (or, with `above`, at or above one); if they
exceed the budget, a seeded random sample of them (the reason says so). SemDeDup's cut:
`Threshold("dup_sim", below=1 - eps)`; a quality score's: `Threshold("quality_score", above=2.5)`.

    Threshold("dup_sim", below=0.95).select(candidates, budget, seed)
    Threshold("quality_score", above=0.018112).select(candidates, budget, seed)   # DCLM's cut

Rows are kept in candidate order (pool order) when they fit, so the full survivor set is the
pool's own order; a null score (nothing to compare with) counts as below, and never as above.
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
    above: float | None = field(default=None, metadata={
        "help": "keep rows whose score is >= this instead (quality scores); replaces below"})

    def select(self, candidates: pl.DataFrame, budget: Budget, seed: int = 0) -> pl.DataFrame:
        if self.column not in candidates.columns:
            raise ValueError(f"candidates have no score column {self.column!r}")
        col = pl.col(self.column)
        if self.above is not None:
            return self._above(candidates, budget, seed)
        surv = candidates.filter(col.is_null() | col.is_nan() | (col < self.below))
        return fit_survivors(surv, candidates, budget, seed, f"{self.column} < {self.below:g}",
                             f"below {round(self.below, 4)}")

    def _above(self, candidates: pl.DataFrame, budget: Budget, seed: int) -> pl.DataFrame:
        col = pl.col(self.column)
        rule = f"{self.column} >= {self.above:g}"
        surv = candidates.filter(col.is_not_null() & col.is_not_nan() & (col >= self.above))
        surv = surv.with_columns(reason=pl.format("{} ({})", pl.lit(rule), col.round(4)))
        return fit_survivors(surv, candidates, budget, seed, rule, f"at or above {self.above:g}")
