"""EL2N, the cheap single-model variant (`--method el2n-single`): rank rows by the mean over their loss tokens of ||p - e_y||_2 under a reference LM
(Paul et al. 2021; the LM form of Marion et al. 2023, methods-a.md §1.6), computed in the fused
forward pass from ||p - e_y||^2 = 1 - 2 p_y + sum_v p_v^2 (no vocabulary-sized error tensor).

Default `--keep top` (Data Diet: keep the hardest, §1.4); `--keep middle` is Marion et al.'s
band for LM pretraining; `--keep bottom` keeps the easiest.

This is NOT the published EL2N: the paper scores with networks trained briefly from several
seeds and averages over them (§1.3); here the score comes from one given model that was not
trained on the pool (`model`), as Marion et al.'s single-reference variant, for the price of
the forward pass perplexity shares. The published form is `--method el2n` (`scoring/el2n.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import polars as pl
from thresher.pipeline.method import Inputs, Method, Request
from thresher.pipeline.models.engine import DEFAULT_MAX_TOKENS
from thresher.pipeline.models.resolve import DEFAULT_LM
from thresher.pipeline.stage import Stage
from thresher.pipeline.stages.forward import Forward, scored_rows
from thresher.selectors.score_band import ScoreBand


@dataclass(frozen=True)
class El2nSingleParams:
    model: str = field(default=DEFAULT_LM, metadata={"help": "reference causal LM"})
    keep: Literal["top", "middle", "bottom"] = field(default="top",
                                                     metadata={"help": "which band to keep"})
    max_tokens: int = field(default=DEFAULT_MAX_TOKENS, metadata={"help": "truncate rows to this many tokens"})


class El2nSingleMethod(Method):
    name = "el2n-single"
    summary = ("cheap EL2N from ONE given model (not the published seed average, see el2n); "
               "keep top (default), middle or bottom")
    cost = "one forward pass over the pool (shared cache with perplexity), O(N log N) ranking"
    Params = El2nSingleParams
    score_column = "el2n"

    def needs(self, p: El2nSingleParams, req: Request) -> dict[str, Stage]:
        return {"fwd": Forward(model=p.model, stats=True, max_tokens=p.max_tokens)}

    def score(self, p: El2nSingleParams, inputs: Inputs) -> pl.DataFrame:
        return scored_rows(inputs["fwd"], ["el2n"])

    def selector(self, p: El2nSingleParams, inputs: Inputs, scores: pl.DataFrame) -> ScoreBand:
        return ScoreBand("el2n", keep=p.keep)
