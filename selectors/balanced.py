"""Balanced random sample across groups (clusters, sources, capabilities), smallest group first.

    Balanced("source").select(candidates, budget, seed)

As S2L's released sampler does: groups are visited from the smallest up; each takes
min(its size, remaining budget // groups left), a seeded uniform sample; what a small group cannot
use rolls over to the larger ones. Rows with no group value form one group, "(none)", so no row is
silently dropped. The output interleaves the groups (first pick of every group, then the second,
...), so a token budget, which cuts a prefix, stays balanced too.

`set_aside=2` is S2L's rule for its trajectory clusters (methods-a.md §4.3): groups with at most
that many members are skipped in the smallest-first pass, and whatever budget is left after it is
sampled uniformly from the union of those small groups (placed after the interleaved rows).
The default 0 sets nothing aside.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl
from thresher.pipeline.budget import Budget

NONE = "(none)"


def allocate_smallest_first(sizes: list[int], budget: int) -> list[int]:
    """How many rows each group gets: smallest first, min(size, remaining // groups left)."""
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])   # stable: ties keep input order
    takes = [0] * len(sizes)
    remaining = budget
    for j, i in enumerate(order):
        takes[i] = min(sizes[i], remaining // (len(order) - j))
        remaining -= takes[i]
    return takes


def sample_groups(candidates: pl.DataFrame, group: pl.Series, n: int, seed: int,
                  set_aside: int = 0) -> pl.DataFrame:
    """Allocate `n` rows over the groups and sample; adds `_group`, `_take`, `_size`, `_pick`
    and `_aside` (True for rows drawn from the pooled small groups, see `set_aside`)."""
    frame = candidates.with_columns(_group=group.cast(pl.String).fill_null(NONE))
    names = sorted(frame["_group"].unique().to_list())
    sizes = frame["_group"].value_counts().to_dict(as_series=False)
    size_of = dict(zip(sizes["_group"], sizes["count"]))
    big = [g for g in names if size_of[g] > set_aside]
    takes = allocate_smallest_first([size_of[g] for g in big], n)
    rng = np.random.default_rng(seed)
    picks = []
    for g, take in zip(big, takes):
        members = frame.filter(pl.col("_group") == g).sort("id")   # input order never matters
        order = rng.permutation(members.height)[:take]
        picks.append(members[order].with_columns(_pick=pl.int_range(pl.len()),
                                                 _take=pl.lit(take), _size=pl.lit(size_of[g]),
                                                 _aside=pl.lit(False)))
    ranked = pl.concat(picks) if picks else frame.head(0).with_columns(
        _pick=pl.lit(0, pl.Int64), _take=pl.lit(0), _size=pl.lit(0), _aside=pl.lit(False))
    ranked = ranked.sort(["_pick", "_size", "_group"])   # interleave, smallest groups first
    small = frame.filter(pl.col("_group").is_in([g for g in names if g not in big])).sort("id")
    left = min(n - sum(takes), small.height)
    if left > 0:
        extra = small[rng.permutation(small.height)[:left]]
        ranked = pl.concat([ranked, extra.with_columns(
            _pick=pl.int_range(pl.len()), _take=pl.lit(left),
            _size=pl.col("_group").replace_strict(size_of, return_dtype=pl.Int64),
            _aside=pl.lit(True)).select(ranked.columns)], how="vertical_relaxed")
    return ranked


@dataclass(frozen=True)
class Balanced:
    column: str = field(default="source", metadata={"help": "group column (source, cluster, ...)"})
    set_aside: int = field(default=0, metadata={
        "help": "groups of at most this many rows share only the leftover budget (S2L: 2)"})

    def __post_init__(self):
        if self.set_aside < 0:
            raise ValueError(f"set_aside must be >= 0, got {self.set_aside}")

    def select(self, candidates: pl.DataFrame, budget: Budget, seed: int = 0) -> pl.DataFrame:
        if self.column not in candidates.columns:
            raise ValueError(f"candidates have no group column {self.column!r}")
        ranked = sample_groups(candidates, candidates[self.column], budget.rows(candidates), seed,
                               self.set_aside)
        main = pl.format("balanced by {}: group {} gives {} of its {} rows (smallest group first, seed {})",
                         pl.lit(self.column), "_group", "_take", "_size", pl.lit(seed))
        aside = pl.format("balanced by {}: leftover budget, {} rows drawn from the groups of <= {} "
                          "rows pooled (group {}, seed {})", pl.lit(self.column), "_take",
                          pl.lit(self.set_aside), "_group", pl.lit(seed))
        ranked = ranked.with_columns(reason=pl.when(pl.col("_aside")).then(aside).otherwise(main))
        return budget.cut(ranked.drop("_pick", "_take", "_size", "_group", "_aside"), candidates)
