"""What a selection method is: typed parameters, declared needs, a score frame, a default cut.

    @dataclass(frozen=True)
    class PerplexityParams:
        model: str = field(default=DEFAULT_LM, metadata={"help": "reference causal LM"})
        keep: Literal["middle", "top", "bottom"] = "middle"

    class PerplexityMethod(Method):
        name, summary = "perplexity", "rank by reference-model perplexity"
        Params = PerplexityParams
        score_column = "ppl"
        def needs(self, p, req):  return {"fwd": Forward(model=p.model, stats=True)}
        def score(self, p, inputs): return inputs["fwd"].scores().select("id", "ppl")
        def selector(self, p, inputs, scores): return ScoreBand("ppl", keep=p.keep)

Nothing outside `needs` loads data or models: `pipeline/select.py` turns the needs into a plan
of stages, an executor runs it (`pipeline/executors.py`), `score` gets the loaded outputs, and
the selector (the default from `selector`, or `--selector NAME` over `score_column`) makes the
cut. A new method is one file under `scoring/` plus one line in `pipeline/registry.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import polars as pl
from thresher.pipeline.io.pool import Pool
from thresher.pipeline.stage import Stage


@dataclass(frozen=True)
class NoParams:
    """For methods without parameters."""


@dataclass
class Request:
    """What the caller asked for besides the parameters: which pool, targets, seed, device."""

    pool: Pool
    targets: tuple[Path, ...] = ()
    seed: int = 0
    device: str = "cpu"
    budget_rows: int | None = None    # the budget in rows (a token budget: an estimate); None: unknown

    @property
    def n_rows(self) -> int:
        return self.pool.n_rows


@dataclass
class Inputs:
    """What `score` receives: the pool, its candidate rows, and each declared need's output."""

    pool: Pool
    candidates: pl.DataFrame          # id, source, kind, n_chars, row (pool index)
    outputs: dict[str, Any]
    seed: int = 0
    targets: tuple[Path, ...] = ()
    notes: dict[str, Any] = field(default_factory=dict)   # method statistics -> manifest
    among: list[str] | None = None    # the ids the cut chooses among (a recipe's `from:`), for
                                      # methods whose choice depends on which rows compete

    def __getitem__(self, name: str) -> Any:
        return self.outputs[name]

    def note(self, key: str, value: Any) -> None:
        self.notes[key] = value


class Method:
    name: ClassVar[str]
    summary: ClassVar[str]
    cost: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams
    score_column: ClassVar[str | None] = None     # what `--selector NAME` cuts on
    needs_targets: ClassVar[bool] = False
    example: ClassVar[dict] = {}     # parameters `thresher methods` shows the needs with, for a
                                     # method that has required ones (paser: pruned_model)

    def needs(self, p: Any, req: Request) -> dict[str, Stage]:
        return {}

    def tokenizer(self, p: Any) -> str:
        """The model whose tokenizer counts this selection's tokens: the method's causal LM
        (its `model` parameter), or the default LM when `model` names something else."""
        from thresher.pipeline.models.resolve import DEFAULT_LM

        return getattr(p, "model", DEFAULT_LM)

    def score(self, p: Any, inputs: Inputs) -> pl.DataFrame:
        raise NotImplementedError

    def selector(self, p: Any, inputs: Inputs, scores: pl.DataFrame):
        raise NotImplementedError


def seed_average(candidates: pl.DataFrame, column: str, per_seed: np.ndarray) -> pl.DataFrame:
    """id, the mean over seeds (rows of per_seed) as `column` and its spread as `column_seed_std`;
    rows without a score (no response token) are left out. EL2N's and GraNd's score."""
    out = candidates.select("id").with_columns(
        pl.Series(column, per_seed.mean(0)), pl.Series(f"{column}_seed_std", per_seed.std(0)))
    out = out.filter(pl.col(column).is_not_nan())
    if out.height == 0:
        raise ValueError("no row has a response token to score; check the pool and --param max_tokens")
    return out
