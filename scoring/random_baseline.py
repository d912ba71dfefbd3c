"""Random baseline: a uniform sample of the candidates, seeded."""

from __future__ import annotations

import polars as pl
from thresher.pipeline.method import Context, Method
from thresher.selectors.random_sample import RandomSelector


class RandomMethod(Method):
    name = "random"
    needs = "nothing"
    cost = "O(N), instant"
    summary = "uniform random sample under the budget (the baseline)"

    def select(self, ctx: Context) -> pl.DataFrame:
        return RandomSelector().select(ctx.candidates, ctx.budget, ctx.seed)
