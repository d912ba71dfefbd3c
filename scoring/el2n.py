"""EL2N as published (Paul et al. 2021; the LM form of Marion et al. 2023; methods-a.md §1):
the error L2 norm averaged over several seeds' briefly trained reference models.

For each seed r in `seeds` (a count, 10 as in the paper, or a list `seeds=3,7`): a proxy (the
bundled LoRA trainer, `Proxy` stage) trains on its own seeded random `proxy_part` of the pool (0.5;
Marion's references train on data apart from what they score) and stops early, at `early` of
one epoch (0.55: Marion's 1000-step checkpoint is ~55% of its data) or at `early_steps`; the
learning-rate schedule is the full epoch's, so the checkpoint is genuinely early in training.
Every pool row is scored at that checkpoint by the forward engine (`TrajectoryStage`): EL2N =
mean over its response tokens of ||p - e_y||_2 (from ||p - e_y||^2 = 1 - 2 p_y + sum_v p_v^2).
The score is the plain mean over seeds (`get_mean_score.py`); `el2n_seed_std` is kept too.

Selection (`keep`): `top` keeps the hardest (Data Diet's default, §1.4); `middle` the band
around the median (Marion et al.'s best for LMs); `bottom` the easiest.

Deviations (docs/training-dynamics.md): references are LoRA adapters on the pretrained `model` (the paper trains
networks from scratch); a seed changes the LoRA initialisation, the data order and the part
(the paper: initialisation and data order). The cheap single-model variant is `el2n-single`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import polars as pl
from thresher.pipeline.method import Inputs, Method, Request, seed_average
from thresher.pipeline.stage import Stage
from thresher.pipeline.stages.proxy import EarlyParams, early_proxies, seed_list
from thresher.pipeline.stages.trajectories import TrajectoryStage
from thresher.selectors.score_band import ScoreBand


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
