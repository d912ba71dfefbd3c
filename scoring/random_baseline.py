"""Random baseline: a uniform sample of the candidates, seeded. Needs nothing, loads nothing."""

from __future__ import annotations

import polars as pl
from thresher.pipeline.method import Inputs, Method, NoParams
from thresher.selectors.random_sample import RandomSelector


class RandomMethod(Method):
    name = "random"
    summary = "uniform random sample under the budget (the baseline)"
    cost = "O(N), instant"

    def score(self, p: NoParams, inputs: Inputs) -> pl.DataFrame:
        return inputs.candidates.select("id")

    def selector(self, p: NoParams, inputs: Inputs, scores: pl.DataFrame) -> RandomSelector:
        return RandomSelector()
