"""EL2N as published (Paul et al. 2021; the LM form of Marion et al. 2023; methods-a.md §1):
the error L2 norm averaged over several seeds' briefly trained reference models.

For each seed r in `seeds` (a count, 10 as in the paper, or a list): a proxy (the bundled LoRA
trainer) trains on its own seeded random `part` of the pool (0.5; Marion's references train on
data apart from what they score) and stops early, at `early` of one epoch (0.55: Marion's
1000-step checkpoint is ~55% of its data) or at `early_steps`; the learning-rate schedule is
the full epoch's, so the checkpoint is genuinely "early in training". Every pool row is scored at
that checkpoint with the forward engine: EL2N = mean over its response tokens of ||p - e_y||_2
(from ||p - e_y||^2 = 1 - 2 p_y + sum_v p_v^2). The score is the plain mean over seeds
(`get_mean_score.py`).

Selection (`--keep`): `top` keeps the hardest (Data Diet's default, §1.4); `middle` the band
around the median (Marion et al.'s best for LMs); `bottom` the easiest.

Deviations (README): references are LoRA adapters on the pretrained `--model` (the paper
trains networks from scratch); seeds change the LoRA initialisation, the data order and the
part (the paper: initialisation and data order). The cheap single-model variant is `el2n-single`.
"""

from __future__ import annotations

import numpy as np
import polars as pl
from thresher.pipeline.method import Context, Method
from thresher.pipeline.models import DEFAULT_LM
from thresher.pipeline.trajectories import ProxySpec, train_proxy, trajectories
from thresher.selectors.score_band import ScoreBand

DEFAULT_SEEDS = 10        # paper / Marion: 10 runs


def seed_list(value) -> list[int]:
    """`seeds=10` -> 0..9; `seeds=3,7,11` -> those."""
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"seeds must be >= 1, got {value}")
        return list(range(value))
    if isinstance(value, list | tuple):
        return [int(v) for v in value]
    parts = [p.strip() for p in str(value).split(",") if p.strip()]
    if len(parts) == 1:
        return seed_list(int(parts[0]))
    return [int(p) for p in parts]


def early_specs(ctx: Context) -> list[ProxySpec]:
    """One early-stopped reference proxy per seed (shared with GraNd's `at=early`)."""
    seeds = seed_list(ctx.option("seeds", DEFAULT_SEEDS))
    steps = ctx.option("early_steps", None)
    early = None if steps is not None else float(ctx.option("early", 0.55))
    return [ProxySpec(model=ctx.option("model", DEFAULT_LM) or DEFAULT_LM,
                      part=float(ctx.option("part", 0.5)), seed=s, epochs=1,
                      lr=float(ctx.option("proxy_lr", 2e-4)),
                      batch_size=int(ctx.option("proxy_batch_size", 8)),
                      max_tokens=int(ctx.option("max_tokens", 512)),
                      save_steps=(int(steps),) if steps is not None else (),
                      stop_after=int(steps) if steps is not None else None,
                      stop_fraction=early, dtype=ctx.option("proxy_dtype", None)) for s in seeds]


def early_checkpoints(ctx: Context) -> list:
    runs = []
    with ctx.timed("proxy"):
        for spec in early_specs(ctx):
            runs.append(train_proxy(ctx.pool, ctx.store, spec, device=ctx.option("device", None)))
    ctx.config["proxies"] = [{"seed": s.seed, "dir": str(r.dir), "checkpoint": r.checkpoints[-1].name,
                              "total_steps": r.total_steps, "train_seconds": r.seconds,
                              "cached": r.cached} for s, r in zip(early_specs(ctx), runs)]
    return [r.checkpoints[-1] for r in runs]


class El2nMethod(Method):
    name = "el2n"
    needs = ("per seed: a LoRA proxy trained early (0.55 epoch of a seeded half of the pool) and "
             "one forward pass over the pool; --param seeds=10 early=0.55 part=0.5")
    cost = "seeds x (0.55 epoch on half the pool + one forward pass); O(N log N) ranking"
    summary = ("EL2N as published: mean over seeds of ||p - onehot|| at early proxy checkpoints; "
               "keep top (default), middle or bottom")

    def select(self, ctx: Context) -> pl.DataFrame:
        keep = ctx.option("keep", "top")
        ckpts = early_checkpoints(ctx)
        scores = []
        with ctx.timed("forward"):
            for c in ckpts:
                tr = trajectories(ctx.pool, ctx.store, [str(c)], max_tokens=int(ctx.option("max_tokens", 512)),
                                  device=ctx.option("device", None), dtype=ctx.option("dtype", None),
                                  threads=ctx.option("threads", None))
                scores.append(np.asarray(tr.el2n(), dtype=np.float64)[:, 0])
        el2n = np.mean(scores, axis=0)
        spread = np.std(scores, axis=0)
        cand = ctx.candidates.with_columns(el2n=pl.Series(el2n), el2n_seed_std=pl.Series(spread))
        ok = cand["el2n"].is_not_nan()
        ctx.config["unscored_rows"] = int((~ok).sum())
        cand = cand.filter(ok)
        if cand.height == 0:
            raise ValueError("no row has a response token to score; check the pool and --param max_tokens")
        return ScoreBand("el2n", keep=keep).select(cand, ctx.budget, ctx.seed)
