"""Balanced random sample across groups (clusters, sources, capabilities), smallest group first.

    Balanced("source").select(candidates, budget, seed)

As S2L's released sampler does: groups are visited from the smallest up; each takes
min(its size, remaining budget // groups left), a seeded uniform sample; what a small group cannot
use rolls over to the larger ones. Rows with no group value form one group, "(none)", so no row is
silently dropped. The output interleaves the groups (first pick of every group, then the second,
...), so a token budget, which cuts a prefix, stays balanced too.

S2L additionally sets aside clusters of <= 2 members until the end; that is not done here (a
generic group column has no such rule), see README.
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


def sample_groups(candidates: pl.DataFrame, group: pl.Series, n: int, seed: int) -> pl.DataFrame:
    """Allocate `n` rows over the groups and sample; adds `_group`, `_take`, `_size`, `_pick`."""
    frame = candidates.with_columns(_group=group.cast(pl.String).fill_null(NONE))
    names = sorted(frame["_group"].unique().to_list())
    sizes = frame["_group"].value_counts().to_dict(as_series=False)
    size_of = dict(zip(sizes["_group"], sizes["count"]))
    takes = allocate_smallest_first([size_of[g] for g in names], n)
    rng = np.random.default_rng(seed)
    picks = []
    for g, take in zip(names, takes):
        members = frame.filter(pl.col("_group") == g).sort("id")   # input order never matters
        order = rng.permutation(members.height)[:take]
        picks.append(members[order].with_columns(_pick=pl.int_range(pl.len()),
                                                 _take=pl.lit(take), _size=pl.lit(size_of[g])))
    ranked = pl.concat(picks)
    return ranked.sort(["_pick", "_size", "_group"])   # interleave, smallest groups first


@dataclass(frozen=True)
class Balanced:
    column: str = field(default="source", metadata={"help": "group column (source, cluster, ...)"})

    def select(self, candidates: pl.DataFrame, budget: Budget, seed: int = 0) -> pl.DataFrame:
        if self.column not in candidates.columns:
            raise ValueError(f"candidates have no group column {self.column!r}")
        ranked = sample_groups(candidates, candidates[self.column], budget.rows(candidates), seed)
        ranked = ranked.with_columns(reason=pl.format(
            "balanced by {}: group {} gives {} of its {} rows (smallest group first, seed {})",
            pl.lit(self.column), "_group", "_take", "_size", pl.lit(seed)))
        return budget.cut(ranked.drop("_pick", "_take", "_size", "_group"), candidates)
