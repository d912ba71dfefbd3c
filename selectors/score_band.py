"""Rank by one score column and keep the top, the bottom, or the middle band.

    ScoreBand("ppl", keep="middle").select(candidates, budget, seed)

`middle` keeps the band centred on the median (Marion et al.'s middle-perplexity pruning).
Ties break by id so the result never depends on input order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import polars as pl
from thresher.pipeline.budget import Budget

KEEPS = ("top", "bottom", "middle")


@dataclass(frozen=True)
class ScoreBand:
    column: str = field(default="score", metadata={"help": "score column to rank by"})
    keep: Literal["top", "bottom", "middle"] = field(
        default="top", metadata={"help": "which end of the ranking to keep"})

    def __post_init__(self):
        if self.keep not in KEEPS:
            raise ValueError(f"keep must be one of {', '.join(KEEPS)}, got {self.keep!r}")

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
