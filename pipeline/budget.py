"""Budgets: how much to select, in rows (`100`), a fraction of the candidates (`10%`), or
tokens (`50000tok`, counted with the model's tokenizer and chat template)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

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
        n = candidates.height
        if self.kind == "rows":
            return min(n, int(self.value))
        if self.kind == "fraction":
            return min(n, math.ceil(self.value * n))
        if "n_tokens" not in candidates.columns:
            raise ValueError("a token budget needs token counts (n_tokens) for the candidates")
        mean = max(1.0, candidates["n_tokens"].mean() or 1.0)
        return min(n, max(1, int(self.value // mean)))

    def cut(self, ranked: pl.DataFrame, candidates: pl.DataFrame) -> pl.DataFrame:
        """The longest prefix of `ranked` that fits the budget."""
        if self.kind != "tokens":
            return ranked.head(self.rows(candidates))
        if "n_tokens" not in ranked.columns:
            ranked = ranked.join(candidates.select("id", "n_tokens"), on="id", how="left",
                                 maintain_order="left")
        fits = ranked["n_tokens"].cum_sum() <= self.value
        return ranked.filter(fits)
