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

The diversity guard (issue 15; not in RDS+): with `groups` (a label per candidate position, e.g.
its source) and `max_share` < 1, no group gets more than ceil(max_share x budget) rows: a list
whose next row belongs to a full group walks down to its next row instead (the turn is not
lost). If the lists run dry before the budget is met, the rest is filled without the cap (the
same walk again, duplicates skipped), so the guard never leaves budget unspent. What the guard
did (cap, rows per group, rows skipped, rows filled past the cap) is in `notes` -> the manifest.
"""

from __future__ import annotations

import logging
import math
from typing import Protocol

import numpy as np
import polars as pl
from thresher.pipeline.budget import Budget
from thresher.pipeline.params import check_share

log = logging.getLogger(__name__)


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
                 retry_duplicates: bool = False, what: str = "list",
                 groups: np.ndarray | None = None, max_share: float = 1.0, group_by: str = "group",
                 unbound_hint: str = ""):
        if not lists:
            raise ValueError("round-robin needs at least one ranked list")
        check_share(max_share)
        self.lists = lists
        self.names = names or [str(i) for i in range(len(lists))]
        if len(self.names) != len(lists):
            raise ValueError(f"{len(self.names)} names for {len(lists)} lists")
        self.retry, self.what = retry_duplicates, what
        self.groups = None if groups is None else np.asarray(groups)
        self.max_share, self.group_by = max_share, group_by
        self.unbound_hint = unbound_hint      # appended to the warning when the cap cannot bind
        self.notes: dict = {}

    def _next(self, li: int, state: dict) -> bool:
        """List li takes its next row; False when it took none (exhausted or lost its turn)."""
        ptr, taken, cap, count = state["ptr"], state["taken"], state["cap"], state["count"]
        while True:
            pos, sc = self.lists[li].head(ptr[li] + 1)
            if len(pos) <= ptr[li]:                  # exhausted
                state["live"].remove(li)
                return False
            p, s = int(pos[ptr[li]]), float(sc[ptr[li]])
            ptr[li] += 1
            if p in taken:
                if self.retry or state["relaxed"]:
                    continue
                return False                         # RDS+: a duplicate uses up the turn
            g = None if self.groups is None else self.groups[p]
            if cap is not None and count.get(g, 0) >= cap:
                state["skipped"] += 1                # the group is full: walk down
                continue
            taken.add(p)
            count[g] = count.get(g, 0) + 1
            state["chosen"].append((p, s, li, ptr[li]))
            return True

    def _take(self, n: int, state: dict) -> None:
        """Extend state["chosen"] to n rows (or until every list is exhausted)."""
        while len(state["chosen"]) < n and state["live"]:
            for li in list(state["live"]):
                if len(state["chosen"]) >= n:
                    break
                self._next(li, state)
        if len(state["chosen"]) < n and state["cap"] is not None:   # relax the guard
            before = len(state["chosen"])
            state.update(cap=None, relaxed=True, ptr=[0] * len(self.lists),
                         live=list(range(len(self.lists))))
            self._take(n, state)
            state["filled_past_cap"] += len(state["chosen"]) - before

    def _state(self, candidates: pl.DataFrame, n: int) -> dict:
        cap = None
        if self.groups is not None:      # the selection's make-up is reported even with no cap
            n_groups = len(np.unique(self.groups))
            if self.max_share < 1 and n_groups > 1:
                cap = math.ceil(self.max_share * n)
            self.notes = {"guard": {"by": self.group_by, "max_share": self.max_share,
                                    "cap_rows": cap, "groups": int(n_groups)}}
            if self.max_share < 1 and cap is None:
                why = f"every candidate has the same {self.group_by}"
                self.notes["guard"]["not_applied"] = why
                log.warning("max_share=%s cannot bind: %s%s", self.max_share, why, self.unbound_hint)
        return {"chosen": [], "taken": set(), "ptr": [0] * len(self.lists), "cap": cap,
                "live": list(range(len(self.lists))), "count": {}, "skipped": 0,
                "relaxed": False, "filled_past_cap": 0}

    def _note_guard(self, state: dict) -> None:
        if "guard" not in self.notes:
            return
        counts = sorted(state["count"].items(), key=lambda kv: (-kv[1], str(kv[0])))
        self.notes["guard"].update(
            rows_per_group={str(g): c for g, c in counts}, skipped_for_cap=state["skipped"],
            filled_past_cap=state["filled_past_cap"])

    def select(self, candidates: pl.DataFrame, budget: Budget, seed: int = 0) -> pl.DataFrame:
        if self.groups is not None and len(self.groups) != candidates.height:
            raise ValueError(f"{len(self.groups)} group labels for {candidates.height} candidates")
        n = budget.rows(candidates)
        state = self._state(candidates, n)
        self._take(n, state)
        if budget.kind == "tokens":   # rows of unknown length: keep going until the tokens fit
            tokens = candidates["n_tokens"].to_numpy()
            while state["live"] and sum(tokens[p] for p, *_ in state["chosen"]) <= budget.value:
                n += max(1, n // 2)
                self._take(n, state)
        self._note_guard(state)
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
