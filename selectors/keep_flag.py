"""Keep the rows whose boolean `keep` column is true: the cut of every annotate-then-filter method.

    KeepFlag("keep", kept="passes every quality rule").select(candidates, budget, seed)

A filter method's scores carry its annotations plus `keep` (bool) and `reason` (for a dropped
row: the first rule it failed; null for a kept one). The kept rows stay in candidate order (pool
order); when they exceed the budget, a seeded random sample of them fills it, the reason saying
so (the same code as `Threshold`). A null `keep` (a row the method could not judge) counts as
dropped: a filter never keeps what it did not look at.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl
from thresher.pipeline.budget import Budget
from thresher.selectors.base import fit_survivors


@dataclass(frozen=True)
class KeepFlag:
    column: str = field(default="keep", metadata={"help": "boolean column: true keeps the row"})
    kept: str = field(default="", metadata={"help": "reason given to a kept row"})

    def select(self, candidates: pl.DataFrame, budget: Budget, seed: int = 0) -> pl.DataFrame:
        if self.column not in candidates.columns:
            raise ValueError(f"candidates have no column {self.column!r}")
        if candidates.schema[self.column] != pl.Boolean:
            raise ValueError(f"column {self.column!r} is {candidates.schema[self.column]}, "
                             "expected booleans (true keeps the row)")
        surv = candidates.filter(pl.col(self.column).fill_null(False))
        if "reason" in surv.columns:      # a filter's drop reason is null on every kept row
            surv = surv.drop("reason")
        return fit_survivors(surv, candidates, budget, seed, self.kept or f"{self.column} is true",
                             f"with {self.column} true")
