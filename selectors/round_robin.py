"""Round-robin over ranked lists: each list in turn adds its best row, until the budget is met.

    RoundRobin(lists, names=["q0", "q1"]).select(candidates, budget, seed)

A list is anything with `head(n) -> (positions, scores)`: its first n entries, best first
(positions index `candidates`), fewer only when the list is exhausted. Lists may be lazy: RDS+
(`scoring/rds.py`) backs each one by a FAISS top-k search whose k grows as rows are taken, so
no list is ever materialised over the whole pool. `StaticList` wraps plain arrays.

Used for RDS+ (methods-a.md §3.3): one list per target example (one task), or one list per task
whose score is the max over the task's examples (several tasks).

Duplicates follow the RDS+ code (`remove_dupes_ordered`, spec §3.3 and §3.7): when a list's
next entry was already taken by another list, that entry is consumed and the list loses its
turn (no retry). `retry_duplicates=True` instead lets the list walk down to its best row not
yet taken. Either way no row is taken twice and every list is visited in a fixed order, so the
result is deterministic (the seed is unused).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import polars as pl
from thresher.pipeline.budget import Budget


class RankedList(Protocol):
    def head(self, n: int) -> tuple[np.ndarray, np.ndarray]: ...


class StaticList:
    """A fully known ranked list: positions in best-first order, with their scores."""

    def __init__(self, positions, scores=None):
        self.positions = np.asarray(positions, dtype=np.int64)
        self.scores = (np.zeros(len(self.positions)) if scores is None
                       else np.asarray(scores, dtype=np.float64))

    def head(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        return self.positions[:n], self.scores[:n]


class RoundRobin:
    def __init__(self, lists: list[RankedList], names: list[str] | None = None,
                 retry_duplicates: bool = False, what: str = "list"):
        if not lists:
            raise ValueError("round-robin needs at least one ranked list")
        self.lists = lists
        self.names = names or [str(i) for i in range(len(lists))]
        if len(self.names) != len(lists):
            raise ValueError(f"{len(self.names)} names for {len(lists)} lists")
        self.retry, self.what = retry_duplicates, what

    def _take(self, n: int, state: dict) -> None:
        """Extend state["chosen"] to n rows (or until every list is exhausted)."""
        chosen, taken, ptr, live = state["chosen"], state["taken"], state["ptr"], state["live"]
        while len(chosen) < n and live:
            for li in list(live):
                if len(chosen) >= n:
                    break
                while True:
                    pos, sc = self.lists[li].head(ptr[li] + 1)
                    if len(pos) <= ptr[li]:          # exhausted
                        live.remove(li)
                        break
                    p, s = int(pos[ptr[li]]), float(sc[ptr[li]])
                    ptr[li] += 1
                    if p not in taken:
                        taken.add(p)
                        chosen.append((p, s, li, ptr[li]))
                        break
                    if not self.retry:               # RDS+: a duplicate uses up the turn
                        break

    def select(self, candidates: pl.DataFrame, budget: Budget, seed: int = 0) -> pl.DataFrame:
        state = {"chosen": [], "taken": set(), "ptr": [0] * len(self.lists),
                 "live": list(range(len(self.lists)))}
        n = budget.rows(candidates)
        self._take(n, state)
        if budget.kind == "tokens":   # rows of unknown length: keep going until the tokens fit
            tokens = candidates["n_tokens"].to_numpy()
            while state["live"] and sum(tokens[p] for p, *_ in state["chosen"]) <= budget.value:
                n += max(1, n // 2)
                self._take(n, state)
        chosen = state["chosen"]
        if not chosen:
            return candidates.head(0).select("id").with_columns(
                reason=pl.lit(None, pl.String), score=pl.lit(None, pl.Float64),
                picked_by=pl.lit(None, pl.String))
        pos = np.array([c[0] for c in chosen], dtype=np.int64)
        ranked = pl.DataFrame({
            "id": candidates["id"].gather(pos),
            "reason": [f"round-robin: rank {rank} for {self.what} {self.names[li]} (score {s:.4f})"
                       for _, s, li, rank in chosen],
            "score": [c[1] for c in chosen],
            "picked_by": [self.names[c[2]] for c in chosen],
        })
        if budget.kind == "tokens":
            ranked = ranked.with_columns(n_tokens=candidates["n_tokens"].gather(pos))
        return budget.cut(ranked, candidates)
