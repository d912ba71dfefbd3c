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

import polars as pl


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
