"""The filter convention: rules over annotation columns -> `keep`, `reason`, and per-rule counts.

    rules = [Rule("min_words", pl.col("n_words") < 50), Rule("stop_words", pl.col("n_stop") < 2)]
    scores, counts = apply_rules(annotations, rules)
    inputs.note("rules", counts)              # -> the manifest's config.method.rules
    return scores                             # annotation columns + keep + reason

A filter method's `score()` returns its annotation columns plus `keep` (bool) and `reason` (for a
dropped row the name of the FIRST rule it fails, in the order given, as DataTrove's
`dropped_<reason>` counter; null for a kept row); its selector is `selectors/keep_flag.py`. A
rule whose expression is null for a row (a value not computed for it: a chat row under text-only
rules) does not fail it. The counts, per rule: `first` (rows whose reason it is), `any` (rows
failing it at all) and `only` (rows it alone removes: no other rule fails them); plus rows,
kept and dropped, so every row is accounted for.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl


@dataclass(frozen=True)
class Rule:
    name: str           # what `reason` says, and the key of its counts
    fails: pl.Expr      # true where the row fails the rule (null: not judged, passes)


def apply_rules(frame: pl.DataFrame, rules: list[Rule]) -> tuple[pl.DataFrame, dict]:
    """`frame` plus `keep` and `reason`; and the counts (see the module doc)."""
    names = [r.name for r in rules]
    if len(set(names)) != len(names):
        raise ValueError(f"rule names repeat: {names}")
    if not rules:
        out = frame.with_columns(keep=pl.lit(True), reason=pl.lit(None, pl.String))
        return out, {"rows": frame.height, "kept": frame.height, "dropped": 0, "rules": {}}
    fails = frame.select([r.fails.fill_null(False).alias(r.name) for r in rules])
    n_fail = fails.select(pl.sum_horizontal(pl.all()).alias("n"))["n"]
    reason = fails.select(pl.coalesce([pl.when(pl.col(n)).then(pl.lit(n)) for n in names])
                          .alias("reason"))["reason"]
    firsts = reason.value_counts()
    first = dict(zip(firsts["reason"].to_list(), firsts["count"].to_list()))
    counts = {}
    for n in names:
        col = fails[n]
        counts[n] = {"first": int(first.get(n, 0)), "any": int(col.sum()),
                     "only": int((col & (n_fail == 1)).sum())}
    out = frame.with_columns(keep=(n_fail == 0), reason=reason)
    dropped = int((n_fail > 0).sum())
    return out, {"rows": frame.height, "kept": frame.height - dropped, "dropped": dropped,
                 "rules": counts}
