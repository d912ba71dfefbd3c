"""Uniform random sample: the baseline every method must beat."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
from thresher.pipeline.budget import Budget


@dataclass(frozen=True)
class RandomSelector:
    def select(self, candidates: pl.DataFrame, budget: Budget, seed: int) -> pl.DataFrame:
        order = np.random.default_rng(seed).permutation(candidates.height)
        ranked = candidates[order].with_columns(reason=pl.lit(f"random sample (seed {seed})"))
        return budget.cut(ranked, candidates)
