"""EL2N as published (Paul et al. 2021; the LM form of Marion et al. 2023; methods-a.md §1):
the error L2 norm averaged over several seeds' briefly trained reference models.

For each seed r in `seeds` (a count, 10 as in the paper, or a list `seeds=3,7`): a proxy (the
bundled LoRA trainer, `Proxy` stage) trains on its own seeded random `part` of the pool (0.5;
Marion's references train on data apart from what they score) and stops early, at `early` of
one epoch (0.55: Marion's 1000-step checkpoint is ~55% of its data) or at `early_steps`; the
learning-rate schedule is the full epoch's, so the checkpoint is genuinely early in training.
Every pool row is scored at that checkpoint by the forward engine (`TrajectoryStage`): EL2N =
mean over its response tokens of ||p - e_y||_2 (from ||p - e_y||^2 = 1 - 2 p_y + sum_v p_v^2).
The score is the plain mean over seeds (`get_mean_score.py`); `el2n_seed_std` is kept too.

Selection (`keep`): `top` keeps the hardest (Data Diet's default, §1.4); `middle` the band
around the median (Marion et al.'s best for LMs); `bottom` the easiest.

Deviations (README): references are LoRA adapters on the pretrained `model` (the paper trains
networks from scratch); a seed changes the LoRA initialisation, the data order and the part
(the paper: initialisation and data order). The cheap single-model variant is `el2n-single`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import polars as pl
from thresher.pipeline.method import Inputs, Method, Request
from thresher.pipeline.models.resolve import DEFAULT_LM
from thresher.pipeline.stage import Stage
from thresher.pipeline.stages.trajectories import Proxy, TrajectoryStage
from thresher.selectors.score_band import ScoreBand


def seed_list(seeds: tuple[int, ...]) -> list[int]:
    """`seeds=10` -> 0..9; `seeds=3,7,11` -> those."""
    seeds = list(seeds)
    if len(seeds) == 1:
        if seeds[0] < 1:
            raise ValueError(f"seeds must be >= 1 (a count) or a list, got {seeds[0]}")
        return list(range(seeds[0]))
    return seeds


@dataclass(frozen=True)
class EarlyParams:
    """The early reference proxies EL2N trains (and GraNd's `at=early` reuses)."""

    model: str = field(default=DEFAULT_LM, metadata={"help": "reference causal LM (LoRA-trained)"})
    seeds: tuple[int, ...] = field(default=(10,), metadata={
        "help": "a count (10: seeds 0..9, as the paper) or a list of seeds"})
    part: float = field(default=0.5, metadata={"help": "seeded fraction of the pool each reference trains on"})
    early: float = field(default=0.55, metadata={"help": "checkpoint after this fraction of one epoch"})
    early_steps: int | None = field(default=None, metadata={"help": "checkpoint after this many steps instead"})
    proxy_lr: float = field(default=2e-4, metadata={"help": "reference learning rate"})
    proxy_batch_size: int = field(default=8, metadata={"help": "reference batch size"})
    proxy_dtype: str | None = field(default=None, metadata={"help": "reference autocast (bf16 / fp32)"})
    max_tokens: int = field(default=512, metadata={"help": "truncate rows"})


def early_proxies(p: EarlyParams) -> list[Proxy]:
    steps = p.early_steps
    return [Proxy(model=p.model, part=p.part, seed=s, epochs=1, lr=p.proxy_lr,
                  batch_size=p.proxy_batch_size, max_tokens=p.max_tokens,
                  save_steps=(steps,) if steps is not None else (), stop_after=steps,
                  stop_fraction=None if steps is not None else p.early, dtype=p.proxy_dtype)
            for s in seed_list(p.seeds)]


def seed_average(candidates: pl.DataFrame, column: str, per_seed: np.ndarray) -> pl.DataFrame:
    """id, the mean over seeds (rows of per_seed) as `column` and its spread as `column_seed_std`;
    rows without a score (no response token) are left out. EL2N's and GraNd's score."""
    out = candidates.select("id").with_columns(
        pl.Series(column, per_seed.mean(0)), pl.Series(f"{column}_seed_std", per_seed.std(0)))
    out = out.filter(pl.col(column).is_not_nan())
    if out.height == 0:
        raise ValueError("no row has a response token to score; check the pool and --param max_tokens")
    return out


@dataclass(frozen=True)
class El2nParams(EarlyParams):
    keep: Literal["top", "middle", "bottom"] = field(default="top", metadata={"help": "which band to keep"})


class El2nMethod(Method):
    name = "el2n"
    summary = ("EL2N as published: mean over seeds of ||p - onehot|| at early proxy checkpoints; "
               "keep top (default), middle or bottom")
    cost = "seeds x (0.55 epoch on half the pool + one forward pass over the pool); O(N log N)"
    Params = El2nParams
    score_column = "el2n"

    def needs(self, p: El2nParams, req: Request) -> dict[str, Stage]:
        return {f"seed{pr.seed}": TrajectoryStage(proxy=pr, max_tokens=p.max_tokens)
                for pr in early_proxies(p)}

    def score(self, p: El2nParams, inputs: Inputs) -> pl.DataFrame:
        per_seed = np.stack([np.asarray(inputs[name].el2n(), np.float64)[:, 0]
                             for name in sorted(inputs.outputs) if name.startswith("seed")])
        inputs.note("seeds", seed_list(p.seeds))
        inputs.note("checkpoints", [inputs[name].checkpoints[0] for name in sorted(inputs.outputs)
                                    if name.startswith("seed")])
        return seed_average(inputs.candidates, "el2n", per_seed)

    def selector(self, p: El2nParams, inputs: Inputs, scores: pl.DataFrame) -> ScoreBand:
        return ScoreBand("el2n", keep=p.keep)
