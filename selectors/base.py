"""The one selector interface.

A selector turns candidates (a polars DataFrame with at least `id`, plus whatever score or
group columns it reads) and a `Budget` into the chosen rows, in order, with a reason each:

    chosen = SomeSelector(param=...).select(candidates, budget, seed)
    chosen.columns  ->  ["id", "reason", ...]

Every random choice takes the seed; the same candidates, budget and seed give the same result.
Selectors are dataclasses whose fields are their parameters (`--selector NAME --param k=v`); one
that finds something worth recording (a threshold it searched for) leaves it in `notes`, which
the manifest carries.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import polars as pl
from thresher.pipeline.budget import Budget


class Selector(Protocol):
    def select(self, candidates: pl.DataFrame, budget: Budget, seed: int) -> pl.DataFrame: ...


def check_selection(chosen: pl.DataFrame, candidates: pl.DataFrame) -> pl.DataFrame:
    """Guard every selector's output: id and reason present, ids unique and all candidates."""
    missing = {"id", "reason"} - set(chosen.columns)
    if missing:
        raise ValueError(f"selection lacks columns {sorted(missing)}")
    if chosen["id"].n_unique() != chosen.height:
        raise ValueError("selection repeats ids")
    unknown = chosen.filter(~pl.col("id").is_in(candidates["id"].implode()))
    if unknown.height:
        raise ValueError(f"selection holds {unknown.height} ids that are not candidates")
    return chosen


def fit_survivors(surv: pl.DataFrame, candidates: pl.DataFrame, budget: Budget, seed: int,
                  why: str, among: str) -> pl.DataFrame:
    """The survivors of a rule (in their order) with a reason each, cut to the budget: all of
    them when they fit, else a seeded random sample of them, whose reason says so.

    why: the reason of a survivor that has none of its own (no `reason` column, or a null in it);
    among: how the survivors are described in the sampled reason ("below 0.95")."""
    reason = pl.lit(why)
    if "reason" in surv.columns:
        reason = pl.col("reason").fill_null(reason)
    surv = surv.with_columns(reason=reason)
    chosen = budget.cut(surv, candidates)
    if chosen.height < surv.height:
        perm = np.random.default_rng(seed).permutation(surv.height)
        chosen = budget.cut(surv[perm], candidates).with_columns(reason=pl.format(
            "{}; sampled at random (seed {}) to fit the budget from {} rows {}",
            "reason", pl.lit(seed), pl.lit(surv.height), pl.lit(among)))
    return chosen
