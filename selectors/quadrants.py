"""Q-Tuning's sample rule on the error-uncertainty plane as a selector (methods-b.md §2.2-2.3).

    EuQuadrants(error="ppl", uncertainty="entropy", keep_quadrants=("Q2", "Q4")).select(c, budget, seed)

alpha = beta is bisected so the kept quadrants hold about the budget's share of the candidates
(or fixed with `alpha`); if they fall short, rows are filled by s = |minmax(ppl) - minmax(ent)|.
Kept rows come first, then fill rows, each by s (most extreme first), and the budget cuts that
ranking. The plane itself (`eu_keep`) lives in scoring/eu_plane.py, shared with dynamic Q-Tuning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl
from thresher.pipeline.budget import Budget
from thresher.scoring.eu_plane import MEANING, QUADRANTS, eu_keep


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
