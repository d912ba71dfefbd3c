"""Perplexity: keep the middle band (default), the top or the bottom of the pool by the
perplexity a reference causal LM assigns to each row's response tokens.

Default `--keep middle`: Marion et al. 2023 found the middle band best for pruning and "easy"
(bottom) data worst (methods-a.md §1.6); the RDS+ paper's Mid-PPL baseline beats Top-PPL
(§3.8). Perplexity is exp(mean NLL) over the loss tokens: the assistant turns by default, every
token with `--param response_only=false` (the RDS+ repo's perplexity baseline scores all tokens,
methods-a.md §5). Rows with no loss token (e.g. a response cut off by max_tokens) cannot be
ranked: they are left out, counted in the manifest (config.unscored_rows) and logged.
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
class PerplexityParams:
    model: str = field(default=DEFAULT_LM, metadata={"help": "reference causal LM"})
    keep: Literal["middle", "top", "bottom"] = field(default="middle",
                                                     metadata={"help": "which band to keep"})
    response_only: bool = field(default=True, metadata={"help": "score the assistant turns only"})
    max_tokens: int = field(default=DEFAULT_MAX_TOKENS, metadata={"help": "truncate rows to this many tokens"})


class PerplexityMethod(Method):
    name = "perplexity"
    summary = "rank by reference-model perplexity; keep the middle band (default), top or bottom"
    cost = "one forward pass over the pool, cached; O(N log N) ranking"
    Params = PerplexityParams
    score_column = "ppl"

    def needs(self, p: PerplexityParams, req: Request) -> dict[str, Stage]:
        return {"fwd": Forward(model=p.model, stats=True, max_tokens=p.max_tokens,
                               response_only=p.response_only)}

    def score(self, p: PerplexityParams, inputs: Inputs) -> pl.DataFrame:
        return scored_rows(inputs["fwd"], ["loss", "ppl"])

    def selector(self, p: PerplexityParams, inputs: Inputs, scores: pl.DataFrame) -> ScoreBand:
        return ScoreBand("ppl", keep=p.keep)
