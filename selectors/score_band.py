"""Rank by one score column and keep the top, the bottom, or the middle band.

    ScoreBand("ppl", keep="middle").select(candidates, budget, seed)
    ScoreBand("quality_score", per="source").select(candidates, budget, seed)   # top per source

`middle` keeps the band centred on the median (Marion et al.'s middle-perplexity pruning).
Ties break by id so the result never depends on input order. With `per` (a group column), the
budget is shared over the groups smallest first (`balanced.allocate_smallest_first`: what a
small group cannot use rolls over) and each group gives its own top / bottom / middle rows; the
output interleaves the groups by rank, so a token budget (a prefix cut) stays balanced too.
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
    per: str | None = field(default=None, metadata={
        "help": "rank within each group of this column (e.g. source), the budget shared evenly"})

    def __post_init__(self):
        if self.keep not in KEEPS:
            raise ValueError(f"keep must be one of {', '.join(KEEPS)}, got {self.keep!r}")

    def select(self, candidates: pl.DataFrame, budget: Budget, seed: int = 0) -> pl.DataFrame:
        if self.column not in candidates.columns:
            raise ValueError(f"candidates have no score column {self.column!r}")
        nulls = candidates[self.column].null_count() + candidates[self.column].is_nan().sum()
        if nulls:
            raise ValueError(f"{nulls} candidates have no {self.column} score")
        if self.per is not None:
            return self._per_group(candidates, budget)
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

    def _per_group(self, candidates: pl.DataFrame, budget: Budget) -> pl.DataFrame:
        from thresher.selectors.balanced import NONE, allocate_smallest_first

        if self.per not in candidates.columns:
            raise ValueError(f"candidates have no group column {self.per!r}")
        frame = candidates.with_columns(_group=pl.col(self.per).cast(pl.String).fill_null(NONE))
        names = sorted(frame["_group"].unique().to_list())
        groups = [frame.filter(pl.col("_group") == g) for g in names]
        takes = allocate_smallest_first([g.height for g in groups], budget.rows(candidates))
        desc = {"top": "highest", "bottom": "lowest", "middle": "middle band of"}[self.keep]
        picks = []
        for g, take, name in zip(groups, takes, names):
            ranked = ScoreBand(self.column, keep=self.keep).select(g, Budget("rows", take), 0)
            picks.append(ranked.with_columns(_rank=pl.int_range(pl.len()), reason=pl.format(
                f"{desc} {self.column} ({{}}) within {self.per} {{}}: {take} of its {g.height} rows",
                pl.col(self.column).round(4), pl.lit(name))))
        out = pl.concat(picks).sort(["_rank", "_group"]) if picks else frame.head(0)
        return budget.cut(out.drop("_rank", "_group", strict=False), candidates)
