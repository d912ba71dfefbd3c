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

import polars as pl
from thresher.pipeline.forward import scored_candidates
from thresher.pipeline.method import Context, Method
from thresher.selectors.score_band import ScoreBand


class PerplexityMethod(Method):
    name = "perplexity"
    needs = "a causal LM forward pass (--model, default smollm2-135m-instruct)"
    cost = "one forward pass over the pool, cached; O(N log N) ranking"
    summary = "rank by reference-model perplexity; keep the middle band (default), top or bottom"

    def select(self, ctx: Context) -> pl.DataFrame:
        keep = ctx.option("keep", "middle")
        cand = scored_candidates(ctx, ["ppl"])
        return ScoreBand("ppl", keep=keep).select(cand, ctx.budget, ctx.seed)
