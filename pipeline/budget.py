"""Budgets: how much to select, in rows (`100`), a fraction of the candidates (`10%`), or
tokens (`50000tok`, counted with the model's tokenizer and chat template).

A token budget fills: the cut walks down the ranking and takes every row that still fits,
skipping a row too long for what is left (the next, shorter ones may fit), until no remaining
row fits. The manifest records the budget beside the tokens selected (`tokens.budget`,
`tokens.selected`)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import polars as pl

_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%|tok|tokens)?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Budget:
    kind: str    # "rows" | "fraction" | "tokens"
    value: float

    @classmethod
    def parse(cls, text: str | int) -> Budget:
        m = _PATTERN.match(str(text))
        if not m:
            raise ValueError(f"bad budget {text!r}: use rows (100), a percentage (10%) or tokens (50000tok)")
        num, unit = float(m.group(1)), (m.group(2) or "").lower()
        if unit == "%":
            if not 0 < num <= 100:
                raise ValueError(f"bad budget {text!r}: a percentage must be in (0, 100]")
            return cls("fraction", num / 100)
        if num != int(num) or num <= 0:
            raise ValueError(f"bad budget {text!r}: rows and tokens must be positive whole numbers")
        return cls("tokens" if unit else "rows", int(num))

    def __str__(self) -> str:
        return {"rows": f"{int(self.value)}", "fraction": f"{self.value * 100:g}%",
                "tokens": f"{int(self.value)}tok"}[self.kind]

    def rows(self, candidates: pl.DataFrame) -> int:
        """The budget as a row count over these candidates (tokens: by their mean length)."""
        if self.kind != "tokens":
            return self.rows_of(candidates.height)
        if "n_tokens" not in candidates.columns:
            raise ValueError("a token budget needs token counts (n_tokens) for the candidates")
        return self.rows_of(candidates.height, candidates["n_tokens"].mean())

    def rows_of(self, n: int, mean_tokens: float | None = None) -> int:
        """The budget as a row count over n rows (tokens: rows of `mean_tokens` tokens each)."""
        if self.kind == "rows":
            return min(n, int(self.value))
        if self.kind == "fraction":
            return min(n, math.ceil(self.value * n))
        return min(n, max(1, int(self.value // max(1.0, mean_tokens or 1.0))))

    def cut(self, ranked: pl.DataFrame, candidates: pl.DataFrame) -> pl.DataFrame:
        """Rows budget: the first rows of `ranked`. Token budget: down the ranking, every row
        that still fits (see the module doc), in ranked order."""
        if self.kind != "tokens":
            return ranked.head(self.rows(candidates))
        if "n_tokens" not in ranked.columns:
            ranked = ranked.join(candidates.select("id", "n_tokens"), on="id", how="left",
                                 maintain_order="left")
        if ranked["n_tokens"].null_count():
            raise ValueError("a token budget needs token counts for every ranked row")
        return ranked.filter(pl.Series(fill(ranked["n_tokens"].to_numpy(), int(self.value))))


def fill(tokens: np.ndarray, budget: int) -> np.ndarray:
    """Which rows, taken greedily in order, fit `budget`: a row too long for what is left is
    skipped and the walk goes on; it stops once no later row fits."""
    tokens = np.asarray(tokens, dtype=np.int64)
    take = np.cumsum(tokens) <= budget            # the prefix that fits: no loop for it
    start = int(take.argmin()) if not take.all() else len(tokens)
    left = budget - int(tokens[:start].sum())
    if start == len(tokens):
        return take
    later_min = np.minimum.accumulate(tokens[::-1])[::-1]   # shortest row from i on
    for i in range(start, len(tokens)):
        if later_min[i] > left:
            break
        if tokens[i] <= left:
            take[i] = True
            left -= int(tokens[i])
    return take
