"""Q-Tuning's error-uncertainty plane, static version (methods-b.md §2.2-2.3).

Each row gets error = perplexity and uncertainty = mean predictive entropy, both over its
loss tokens, from one forward pass of a reference model. Quadrants by quantile thresholds
(alpha on perplexity, beta on entropy):

    Q1  ppl >  q(1-alpha)  and ent >  q(1-beta)   high error, high uncertainty: noise      dropped
    Q2  ppl >  q(1-alpha)  and ent <= q(beta)     confidently wrong: misconceptions        kept
    Q3  ppl <= q(alpha)    and ent <= q(beta)     known already: redundant                 dropped
    Q4  ppl <= q(alpha)    and ent >  q(1-beta)   right but unsure: calibration data       kept
    -   anything between the thresholds (only when alpha, beta < 0.5)

Selection keeps Q2 + Q4, as the paper: alpha = beta is bisected on [0, 0.49] (10 steps,
tolerance 0.01) so that |Q2 u Q4| is about the budget; if they fall short, the rest is filled
by s = |minmax(ppl) - minmax(ent)| (fill rows with ppl_n >= ent_n count as Q2-like). The
plane itself (`eu_quadrants`, `search_alpha`, `eu_keep`) is `selectors/quadrants.py`, which the
dynamic in-training Q-Tuning (`pipeline/training/qtuning.py`) uses per batch too.

Deviations, stated: (1) Q-Tuning is a trainer plug-in scored on each batch by the model being
trained; this is the offline approximation over the whole pool with a fixed model (the spec
says so in §2.1). (2) The released code averages entropy over all non-pad tokens, the paper's
formula over the loss tokens; this follows the formula. (3) The released code does not cut
Q2 u Q4 down to the budget; a static selection must, so rows are ranked Q2/Q4 first, then fill
rows, each by s (most extreme first), and cut. `--param alpha=A` fixes alpha = beta instead of
bisecting; `--param keep_quadrants=Q2,Q4` changes which quadrants are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl
from thresher.pipeline.method import Inputs, Method, Request
from thresher.pipeline.models.engine import DEFAULT_MAX_TOKENS
from thresher.pipeline.models.resolve import DEFAULT_LM
from thresher.pipeline.stage import Stage
from thresher.pipeline.stages.forward import Forward, scored_rows
from thresher.selectors.quadrants import QUADRANTS, EuQuadrants


@dataclass(frozen=True)
class EuPlaneParams:
    model: str = field(default=DEFAULT_LM, metadata={"help": "reference causal LM"})
    keep_quadrants: tuple[str, ...] = field(default=("Q2", "Q4"),
                                            metadata={"help": "quadrants kept (Q1..Q4)"})
    alpha: float | None = field(default=None, metadata={"help": "fix alpha = beta instead of bisecting"})
    max_tokens: int = field(default=DEFAULT_MAX_TOKENS, metadata={"help": "truncate rows to this many tokens"})

    def __post_init__(self):
        if not self.keep_quadrants or set(self.keep_quadrants) - set(QUADRANTS):
            raise ValueError(f"keep_quadrants must list some of {', '.join(QUADRANTS)}, "
                             f"got {','.join(self.keep_quadrants)}")


class EuPlaneMethod(Method):
    name = "eu-plane"
    summary = "Q-Tuning's error-uncertainty plane (static): keep Q2 (confidently wrong) + Q4 (right but unsure)"
    cost = "one forward pass over the pool (shared cache with perplexity/el2n), O(N log N)"
    Params = EuPlaneParams
    score_column = "ppl"

    def needs(self, p: EuPlaneParams, req: Request) -> dict[str, Stage]:
        return {"fwd": Forward(model=p.model, stats=True, max_tokens=p.max_tokens)}

    def score(self, p: EuPlaneParams, inputs: Inputs) -> pl.DataFrame:
        return scored_rows(inputs["fwd"], ["ppl", "entropy"])

    def selector(self, p: EuPlaneParams, inputs: Inputs, scores: pl.DataFrame) -> EuQuadrants:

        return EuQuadrants("ppl", "entropy", p.keep_quadrants, p.alpha)
