"""EL2N, the cheap single-model variant (`--method el2n-single`): rank rows by the mean over their loss tokens of ||p - e_y||_2 under a reference LM
(Paul et al. 2021; the LM form of Marion et al. 2023, methods-a.md §1.6), computed in the fused
forward pass from ||p - e_y||^2 = 1 - 2 p_y + sum_v p_v^2 (no vocabulary-sized error tensor).

Default `--keep top` (Data Diet: keep the hardest, §1.4); `--keep middle` is Marion et al.'s
band for LM pretraining; `--keep bottom` keeps the easiest.

This is NOT the published EL2N: the paper scores with networks trained briefly from several
seeds and averages over them (§1.3); here the score comes from one given, untrained-on-the-pool
model (`--model`), as Marion et al.'s single-reference variant, for the price of the forward
pass that perplexity shares. The published form is `--method el2n` (`scoring/el2n.py`).
"""

from __future__ import annotations

import polars as pl
from thresher.pipeline.forward import scored_candidates
from thresher.pipeline.method import Context, Method
from thresher.selectors.score_band import ScoreBand


class El2nSingleMethod(Method):
    name = "el2n-single"
    needs = "a causal LM forward pass (--model, default smollm2-135m-instruct)"
    cost = "one forward pass over the pool (shared cache with perplexity), O(N log N) ranking"
    summary = ("cheap EL2N from ONE given model (not the published seed average, see el2n); "
               "keep top (default), middle or bottom")

    def select(self, ctx: Context) -> pl.DataFrame:
        keep = ctx.option("keep", "top")
        cand = scored_candidates(ctx, ["el2n"])
        return ScoreBand("el2n", keep=keep).select(cand, ctx.budget, ctx.seed)
