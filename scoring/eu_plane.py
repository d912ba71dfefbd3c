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
functions `eu_quadrants`, `search_alpha` and `eu_keep` are the plane itself, usable per batch
by the dynamic in-training Q-Tuning (`scoring/qtuning.py`).

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
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
from thresher.pipeline.method import Inputs, Method, Request
from thresher.pipeline.models.engine import DEFAULT_MAX_TOKENS
from thresher.pipeline.models.resolve import DEFAULT_LM
from thresher.pipeline.stage import Stage
from thresher.pipeline.stages.forward import Forward, scored_rows

if TYPE_CHECKING:
    from thresher.selectors.quadrants import EuQuadrants

QUADRANTS = ("Q1", "Q2", "Q3", "Q4")
MEANING = {"Q1": "high ppl, high entropy", "Q2": "high ppl, low entropy",
           "Q3": "low ppl, low entropy", "Q4": "low ppl, high entropy"}


def eu_quadrants(ppl, ent, alpha: float = 0.5, beta: float | None = None) -> np.ndarray:
    """Quadrant label per row ("Q1".."Q4", or "-" between the thresholds)."""
    ppl, ent = np.asarray(ppl, dtype=np.float64), np.asarray(ent, dtype=np.float64)
    beta = alpha if beta is None else beta
    if not (0 < alpha <= 0.5 and 0 < beta <= 0.5):
        raise ValueError(f"alpha and beta must be in (0, 0.5], got {alpha}, {beta}")
    p_hi, p_lo = ppl > np.quantile(ppl, 1 - alpha), ppl <= np.quantile(ppl, alpha)
    e_hi, e_lo = ent > np.quantile(ent, 1 - beta), ent <= np.quantile(ent, beta)
    out = np.full(len(ppl), "-", dtype=object)
    out[p_hi & e_hi], out[p_hi & e_lo] = "Q1", "Q2"
    out[p_lo & e_lo], out[p_lo & e_hi] = "Q3", "Q4"
    return out


def search_alpha(ppl, ent, ratio: float, keep=("Q2", "Q4"), tol: float = 0.01,
                 max_iter: int = 10) -> float:
    """alpha = beta such that the kept quadrants hold about `ratio` of the rows (bisection,
    as `_dynamic_threshold_search_bisect`)."""
    lo, hi, alpha = 0.0, 0.49, 0.245
    for _ in range(max_iter):
        alpha = (lo + hi) / 2
        frac = np.isin(eu_quadrants(ppl, ent, alpha), keep).mean()
        if abs(frac - ratio) < tol:
            break
        lo, hi = (alpha, hi) if frac < ratio else (lo, alpha)
    return alpha


def _minmax(x: np.ndarray) -> np.ndarray:
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else np.zeros_like(x)


def eu_keep(ppl, ent, ratio: float, keep=("Q2", "Q4"), alpha: float | None = None) -> dict:
    """The Q-Tuning sample rule: which rows to keep for a target ratio.

    Returns quadrant labels, alpha, s = |minmax(ppl) - minmax(ent)|, `kept` (in a kept
    quadrant), `fill` (added by s when the quadrants hold fewer than round(N * ratio)) and
    `q2_like` (Q2 rows and fill rows with ppl_n >= ent_n, eligible for token pruning)."""
    ppl, ent = np.asarray(ppl, dtype=np.float64), np.asarray(ent, dtype=np.float64)
    if len(ppl) != len(ent) or len(ppl) == 0:
        raise ValueError("ppl and entropy must be non-empty and of equal length")
    if alpha is None:
        alpha = search_alpha(ppl, ent, ratio, keep)
    labels = eu_quadrants(ppl, ent, alpha)
    kept = np.isin(labels, keep)
    ppl_n, ent_n = _minmax(ppl), _minmax(ent)
    s = np.abs(ppl_n - ent_n)
    k = max(1, round(len(ppl) * ratio))
    fill = np.zeros(len(ppl), dtype=bool)
    short = k - int(kept.sum())
    if short > 0:
        rest = np.flatnonzero(~kept)
        order = rest[np.lexsort((rest, -s[rest]))]          # by s, ties by position
        fill[order[:short]] = True
    q2_like = (labels == "Q2") | (fill & (ppl_n >= ent_n))
    return {"labels": labels, "alpha": alpha, "s": s, "kept": kept, "fill": fill, "q2_like": q2_like}


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
        from thresher.selectors.quadrants import EuQuadrants

        return EuQuadrants("ppl", "entropy", p.keep_quadrants, p.alpha)
