"""What a selection method is, and the context it runs in.

A method is one class in one file under `scoring/` (its whole logic) plus one line in
`pipeline/registry.py`. It declares what it needs and costs (shown by `thresher methods`) and
implements `select(ctx) -> DataFrame[id, reason, ...]`, usually by computing score columns and
handing them to a selector from `selectors/`.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import polars as pl
from thresher.pipeline.artifacts import ArtifactStore
from thresher.pipeline.budget import Budget
from thresher.pipeline.pool import Pool


@dataclass
class Context:
    pool: Pool
    store: ArtifactStore
    budget: Budget
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    models: dict[str, str] = field(default_factory=dict)      # role -> model identity (manifest)
    timings: dict[str, float] = field(default_factory=dict)   # stage -> seconds (manifest)
    config: dict[str, Any] = field(default_factory=dict)      # method settings (manifest)
    _candidates: pl.DataFrame | None = None

    @property
    def candidates(self) -> pl.DataFrame:
        """Every pool row that may be selected: id, source, kind, n_chars, and `row` (pool index)."""
        if self._candidates is None:
            self._candidates = self.pool.frame(["id", "source", "kind", "n_chars"]).with_row_index("row")
        return self._candidates

    def option(self, name: str, default: Any = None) -> Any:
        value = self.options.get(name)
        value = default if value is None else value
        self.config[name] = value
        return value

    @contextlib.contextmanager
    def timed(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = round(self.timings.get(stage, 0.0) + time.perf_counter() - t0, 3)


class Method:
    name: ClassVar[str]
    needs: ClassVar[str]    # e.g. "nothing", "embeddings", "a causal LM forward pass + a target set"
    cost: ClassVar[str]     # rough cost, e.g. "O(N) rows, seconds"
    summary: ClassVar[str]

    def select(self, ctx: Context) -> pl.DataFrame:
        raise NotImplementedError
