"""Q-Tuning's sample rule on the error-uncertainty plane: the plane itself and a selector over it
(methods-b.md §2.2-2.3).

    EuQuadrants(error="ppl", uncertainty="entropy", keep_quadrants=("Q2", "Q4")).select(c, budget, seed)

alpha = beta is bisected so the kept quadrants hold about the budget's share of the candidates
(or fixed with `alpha`); if they fall short, rows are filled by s = |minmax(ppl) - minmax(ent)|.
Kept rows come first, then fill rows, each by s (most extreme first), and the budget cuts that
ranking. The plane (`eu_quadrants`, `search_alpha`, `eu_keep`) is shared by the static `eu-plane`
method (`scoring/eu_plane.py`) and the trainer's dynamic Q-Tuning (`pipeline/training/qtuning.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl
from thresher.pipeline.budget import Budget

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


@dataclass
class EuQuadrants:
    error: str = field(default="ppl", metadata={"help": "error column (perplexity)"})
    uncertainty: str = field(default="entropy", metadata={"help": "uncertainty column"})
    keep_quadrants: tuple[str, ...] = field(default=("Q2", "Q4"),
                                            metadata={"help": "quadrants kept (Q1..Q4)"})
    alpha: float | None = field(default=None, metadata={"help": "fix alpha = beta (else bisected)"})
    notes: dict = field(default_factory=dict, init=False, repr=False)   # what the cut found

    def __post_init__(self):
        if not self.keep_quadrants or set(self.keep_quadrants) - set(QUADRANTS):
            raise ValueError(f"keep_quadrants must list some of {', '.join(QUADRANTS)}, "
                             f"got {','.join(self.keep_quadrants)}")

    def select(self, candidates: pl.DataFrame, budget: Budget, seed: int = 0) -> pl.DataFrame:
        ratio = budget.rows(candidates) / candidates.height
        res = eu_keep(candidates[self.error].to_numpy(), candidates[self.uncertainty].to_numpy(),
                      ratio, self.keep_quadrants, self.alpha)
        self.notes = {"alpha_found": round(float(res["alpha"]), 6),
                      "quadrant_counts": {q: int((res["labels"] == q).sum()) for q in (*QUADRANTS, "-")},
                      "fill_rows": int(res["fill"].sum())}
        tier = np.where(res["kept"], 0, np.where(res["fill"], 1, 2))
        reason = [f"{q} ({MEANING[q]}; alpha {res['alpha']:.4f})" if t == 0 else
                  f"fill by |ppl_n - ent_n| ({'Q2' if q2 else 'Q4'}-like; quadrant {q})"
                  for q, t, q2 in zip(res["labels"], tier, res["q2_like"])]
        ranked = (candidates.with_columns(
                      quadrant=pl.Series(res["labels"].tolist(), dtype=pl.String), s=res["s"],
                      tier=tier, reason=pl.Series(reason, dtype=pl.String))
                  .filter(pl.col("tier") < 2)
                  .sort(["tier", "s", "id"], descending=[False, True, False]))
        return budget.cut(ranked.drop("tier"), candidates)
