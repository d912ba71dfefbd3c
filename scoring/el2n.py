"""EL2N: rank rows by the mean over their loss tokens of ||p - e_y||_2 under a reference LM
(Paul et al. 2021; the LM form of Marion et al. 2023, methods-a.md §1.6), computed in the fused
forward pass from ||p - e_y||^2 = 1 - 2 p_y + sum_v p_v^2 (no vocabulary-sized error tensor).

Default `--keep top` (Data Diet: keep the hardest, §1.4); `--keep middle` is Marion et al.'s
band for LM pretraining; `--keep bottom` keeps the easiest.

Deviation from the spec: the paper scores with networks trained briefly from several seeds
and averages over them (§1.3); here the score comes from one given model (`--model`), as
Marion et al.'s single-reference variant. The averaged-over-early-checkpoints version comes
with the LoRA trainer (issue 5), which can call `pipeline.forward.run_forward` on each
checkpoint and average the `el2n` arrays.
"""

from __future__ import annotations

import polars as pl
from thresher.pipeline.forward import scored_candidates
from thresher.pipeline.method import Context, Method
from thresher.selectors.score_band import ScoreBand


class El2nMethod(Method):
    name = "el2n"
    needs = "a causal LM forward pass (--model, default smollm2-135m-instruct)"
    cost = "one forward pass over the pool (shared cache with perplexity), O(N log N) ranking"
    summary = "rank by EL2N (mean ||p - onehot|| over response tokens); keep top (default), middle or bottom"

    def select(self, ctx: Context) -> pl.DataFrame:
        keep = ctx.option("keep", "top")
        cand = scored_candidates(ctx, ["el2n"])
        return ScoreBand("el2n", keep=keep).select(cand, ctx.budget, ctx.seed)
