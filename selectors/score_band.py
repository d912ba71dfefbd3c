"""Rank by one score column and keep the top, the bottom, or the middle band.

    ScoreBand("ppl", keep="middle").select(candidates, budget, seed)

`middle` keeps the band centred on the median (Marion et al.'s middle-perplexity pruning).
Ties break by id so the result never depends on input order.
"""

from __future__ import annotations

import polars as pl
from thresher.pipeline.budget import Budget

KEEPS = ("top", "bottom", "middle")


class ScoreBand:
    def __init__(self, column: str, keep: str = "top"):
        if keep not in KEEPS:
            raise ValueError(f"keep must be one of {', '.join(KEEPS)}, got {keep!r}")
        self.column, self.keep = column, keep

    def select(self, candidates: pl.DataFrame, budget: Budget, seed: int = 0) -> pl.DataFrame:
        if self.column not in candidates.columns:
            raise ValueError(f"candidates have no score column {self.column!r}")
        nulls = candidates[self.column].null_count() + candidates[self.column].is_nan().sum()
        if nulls:
            raise ValueError(f"{nulls} candidates have no {self.column} score")
        asc = self.keep == "bottom"
        ranked = candidates.sort([self.column, "id"], descending=[not asc, False])
        if self.keep == "middle":
            n = budget.rows(candidates)
            start = max(0, (ranked.height - n) // 2)
            ranked = ranked.slice(start, ranked.height - start)
        desc = {"top": "highest", "bottom": "lowest", "middle": "middle band of"}[self.keep]
        ranked = ranked.with_columns(
            reason=pl.format(f"{desc} {self.column} ({{}})", pl.col(self.column).round(4)))
        return budget.cut(ranked, candidates)
