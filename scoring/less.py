"""LESS (Xia et al., ICML 2024; methods-b.md §4.2): keep the pool rows whose Adam-preconditioned
LoRA gradients point where the target examples' gradients point, over the warm-up checkpoints.

1. Warm-up (`Proxy` stage via `grad_features.warmup_proxy`): LoRA on a seeded random
   `proxy_part` (5%) of the pool, at least `proxy_min_rows` rows, `epochs` (4) epochs, one
   checkpoint per epoch.
2. Features (`GradFeatures` stage, `pipeline/stages/grad_features.py`): per checkpoint, each pool row's
   Adam-preconditioned gradient and each target row's SGD gradient, Rademacher-projected to `d`
   (8192) dimensions with one seeded projection, L2-normalised, float16, cached per shard.
3. Score: Inf(z) = max over tasks (one per `--target` file) of the mean over that task's
   examples z' of sum_i eta_i cos(Gamma(z; theta_i), g(z'; theta_i)), eta_i the checkpoints'
   mean learning rates normalised to sum 1 (matching.py; LESS takes the max over a benchmark's
   sub-tasks, here each target file is a task).
4. Keep the global top rows by Inf (write_selected_data.py; its default budget is 5%).
   `max_share` < 1 (not in LESS; the diversity guard of issue 15, as in `rds`): no source gets
   more than that share of the budget; the ranking walks down past rows of full sources, and
   the manifest's `config.method.guard` reports the cap and the rows each source got.

Two-stage (`shortlist` > 0, not in LESS; issue 23): a `Shortlist` stage first keeps the
`shortlist` x budget rows nearest the targets by sentence-embedder vectors (RDS+'s score over
`rds --param vectors=embed`), and LESS runs with that shortlist as its pool: the warm-up trains
on `proxy_part` of the shortlist (at least `proxy_min_rows` rows) and only shortlisted rows get
gradient features, so LESS's cost follows the budget, not the pool.

`less_scores`, `less_task_scores`, `less_similarity` and `less_representation` are the same
arithmetic for other methods (RDS+ with gradient representations): the representation is the
concatenation of sqrt(eta_i) * feature_i, unit length, whose inner products are LESS's sum.

Deviations (docs/target-aware.md, "LESS"): the trainer's LoRA (r=8, alpha 16, lr 2e-4, cosine schedule, batch 8)
instead of r=128, alpha 512, lr 2e-5, linear schedule, batch 32; max_tokens 512 instead of 2048;
rows with no response token within max_tokens are not scored (counted as `unscored_rows`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
from thresher.pipeline.method import Inputs, Method, Request
from thresher.pipeline.models.resolve import DEFAULT_EMBEDDER, DEFAULT_LM
from thresher.pipeline.params import Share
from thresher.pipeline.stage import Stage
from thresher.pipeline.stages.embed import Embed
from thresher.pipeline.stages.grad_features import GradFeatures
from thresher.pipeline.stages.proxy import warmup_proxy
from thresher.pipeline.stages.shortlist import Shortlist
from thresher.pipeline.stages.targets import TargetPool
from thresher.selectors.round_robin import RoundRobin, StaticList
from thresher.selectors.score_band import ScoreBand

BLOCK = 65536          # pool rows per block of the score products


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def _blocks(n: int):
    for s in range(0, n, BLOCK):
        yield slice(s, min(n, s + BLOCK))


def _rows(feats: Sequence[np.ndarray], rows) -> np.ndarray:
    return np.arange(len(feats[0])) if rows is None else np.asarray(rows, dtype=np.int64)


def less_similarity(pool_feats: Sequence[np.ndarray], target_feats: Sequence[np.ndarray],
                    etas: Sequence[float], rows=None) -> np.ndarray:
    """float32 [n, M]: sum_i eta_i cos(pool_i[row], target_i[m]) for the pool `rows` (all when
    None) against every target example. Features are one [N, d] matrix per checkpoint."""
    rows = _rows(pool_feats, rows)
    out = np.zeros((len(rows), len(target_feats[0])), dtype=np.float32)
    for eta, p, t in zip(etas, pool_feats, target_feats):
        tu = _unit(t)
        for b in _blocks(len(rows)):
            out[b] += eta * (_unit(p[rows[b]]) @ tu.T)
    return out


def less_scores(pool_feats: Sequence[np.ndarray], target_feats: Sequence[np.ndarray],
                etas: Sequence[float], rows=None) -> np.ndarray:
    """float64 [n]: the mean over the target examples (one task) of sum_i eta_i cos(., .), by
    the mean of the unit target vectors (no [n, M] matrix)."""
    return _per_task(pool_feats, [target_feats], etas, rows)[:, 0]


def less_task_scores(pool_feats: Sequence[np.ndarray], tasks: Sequence[Sequence[np.ndarray]],
                     etas: Sequence[float], rows=None) -> tuple[np.ndarray, np.ndarray]:
    """(score [n], index of the best task [n]): the max over tasks of `less_scores` (LESS's
    aggregation: max over sub-tasks of the mean over each one's examples)."""
    per_task = _per_task(pool_feats, tasks, etas, rows)
    best = per_task.argmax(axis=1)
    return per_task[np.arange(len(best)), best], best


def _per_task(pool_feats, tasks, etas, rows) -> np.ndarray:
    """float64 [n, T]: `less_scores` for every task, reading each pool block once."""
    rows = _rows(pool_feats, rows)
    out = np.zeros((len(rows), len(tasks)), dtype=np.float64)
    for i, (eta, p) in enumerate(zip(etas, pool_feats)):
        centres = np.stack([_unit(t[i]).mean(axis=0) for t in tasks], axis=1)     # [d, T]
        for b in _blocks(len(rows)):
            out[b] += eta * (_unit(p[rows[b]]) @ centres)
    return out


def less_representation(feats: Sequence[np.ndarray], etas: Sequence[float], rows=None) -> np.ndarray:
    """float32 [n, K*d]: [sqrt(eta_1) u_1, ..., sqrt(eta_K) u_K] with u_i the unit feature at
    checkpoint i; rows are unit vectors (etas sum to 1) whose inner products are LESS's
    sum_i eta_i cos(., .), so an inner-product index (RDS+'s) searches by LESS similarity."""
    rows = _rows(feats, rows)
    return np.concatenate([np.sqrt(eta) * _unit(f[rows]) for eta, f in zip(etas, feats)], axis=1)


def shortlist_rows(p: LessParams, req: Request) -> int | None:
    """The shortlist's size (`shortlist` x the budget in rows), or None: no shortlist (off, a
    pool of at most `shortlist_above` rows, an unknown budget, or a shortlist of the whole pool)."""
    if p.shortlist <= 0 or req.n_rows <= p.shortlist_above or req.budget_rows is None:
        return None
    m = math.ceil(p.shortlist * req.budget_rows)
    return m if m < req.n_rows else None


def feature_rows(positions: np.ndarray | None, pool_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index into the feature matrices, bool: has features) for pool positions; `positions`
    are the feature rows' pool positions (ascending), None when the features cover the pool."""
    if positions is None:
        return pool_rows, np.ones(len(pool_rows), dtype=bool)
    at = np.minimum(np.searchsorted(positions, pool_rows), max(0, len(positions) - 1))
    listed = positions[at] == pool_rows if len(positions) else np.zeros(len(pool_rows), bool)
    return at, listed


def grad_batch_tokens(device: str) -> int:
    """Tokens per packed gradient batch by device: on a 2-core CPU packs of 384-512 tokens ran
    10-15% faster than 1,024 or 2,048 (bench/RESULTS.md, "LESS: packed per-sample gradients");
    a GPU wants large packs."""
    return 512 if device == "cpu" else 8192


@dataclass(frozen=True)
class LessParams:
    model: str = field(default=DEFAULT_LM, metadata={"help": "causal LM (LoRA warm-up and gradients)"})
    max_tokens: int = field(default=512, metadata={"help": "truncate rows (warm-up and gradients; LESS: 2048)"})
    d: int = field(default=8192, metadata={"help": "random projection dimensions (LESS: 8192)"})
    proj_seed: int = field(default=0, metadata={"help": "seed of the Rademacher projection"})
    proj_dtype: Literal["bf16", "fp32"] | None = field(default=None, metadata={
        "help": "projection product dtype: bf16 (default on CPUs with native bf16) or fp32"})
    proxy_part: float = field(default=0.05, metadata={"help": "fraction of the pool the warm-up trains on"})
    proxy_min_rows: int = field(default=32, metadata={"help": "at least this many warm-up rows"})
    epochs: int = field(default=4, metadata={"help": "warm-up epochs, one checkpoint each (LESS: 4)"})
    proxy_lr: float = field(default=2e-4, metadata={"help": "warm-up learning rate (LESS: 2e-5 at r=128)"})
    proxy_batch_size: int = field(default=8, metadata={"help": "warm-up batch size"})
    proxy_seed: int = field(default=0, metadata={"help": "warm-up seed (init, order, part)"})
    proxy_dtype: str | None = field(default=None, metadata={
        "help": "warm-up autocast: bf16 or fp32 (default by CPU)"})
    unit_rows: int = field(default=256, metadata={
        "help": "rows per unit of gradient work (a progress line and a resume point each)"})
    grad_tokens: int | None = field(default=None, metadata={
        "help": "tokens per packed per-sample-gradient batch (default: 512 on a CPU, 8192 on a "
                "GPU; peak memory grows with it; scores do not change)"})
    grad_dtype: Literal["bf16", "fp32"] | None = field(default=None, metadata={
        "help": "per-sample gradient pass: bf16 autocast (default on CPUs with native bf16) or fp32"})
    max_share: Share = field(default=1.0, metadata={
        "help": "diversity guard: at most this share of the budget from one source (1 = off, as LESS)"})
    shortlist: float = field(default=0.0, metadata={
        "help": "two-stage: first keep shortlist x budget rows nearest the targets by embedder "
                "vectors, then LESS ranks only those (0 = LESS over every row)"})
    shortlist_above: int = field(default=0, metadata={
        "help": "the shortlist applies only to pools of more rows than this"})
    embedder: str = field(default=DEFAULT_EMBEDDER, metadata={"help": "sentence embedder of the shortlist"})

    def __post_init__(self):
        if self.grad_tokens is not None and self.grad_tokens < 1:
            raise ValueError(f"grad_tokens must be >= 1 (or null: by device), got {self.grad_tokens}")
        if self.unit_rows < 1:
            raise ValueError(f"unit_rows must be >= 1, got {self.unit_rows}")
        if self.shortlist < 0 or self.shortlist_above < 0:
            raise ValueError(f"shortlist and shortlist_above must be >= 0, got {self.shortlist} "
                             f"and {self.shortlist_above}")


class LessMethod(Method):
    name = "less"
    summary = ("LESS: top rows by the lr-weighted cosine of projected Adam LoRA gradients to the "
               "target's gradients over warm-up checkpoints (max over --target tasks)")
    cost = ("warm-up LoRA on 5% of the pool (4 epochs) + epochs x (per-sample gradient + "
            "projection) per pool and target row")
    Params = LessParams
    score_column = "less"
    needs_targets = True

    def needs(self, p: LessParams, req: Request) -> dict[str, Stage]:
        out = {}
        m = shortlist_rows(p, req)
        if m is not None:     # two-stage: LESS over the shortlist, its warm-up included
            vectors = lambda over=None: Embed(model=p.embedder, part="conversation", over=over)
            out["shortlist"] = Shortlist(vectors=vectors(), m=m, targets=tuple(
                vectors(TargetPool(path=str(t))) for t in req.targets))
        warm = warmup_proxy(m or req.n_rows, p.model, p.proxy_part, p.proxy_min_rows, p.epochs,
                            p.proxy_seed, p.proxy_lr, p.proxy_batch_size, p.max_tokens,
                            p.proxy_dtype, rows=out.get("shortlist"))
        tokens = p.grad_tokens if p.grad_tokens is not None else grad_batch_tokens(req.device)
        feats = {"proxy": warm, "d": p.d, "seed": p.proj_seed, "max_tokens": p.max_tokens,
                 "dtype": p.proj_dtype, "grad_dtype": p.grad_dtype, "batch_tokens": tokens,
                 "unit_rows": p.unit_rows}
        out["pool"] = GradFeatures(**feats, rows=out.get("shortlist"))
        for i, t in enumerate(req.targets):
            out[f"target{i}"] = GradFeatures(**feats, over=TargetPool(path=str(t)))
        return out

    def _tasks(self, inputs: Inputs) -> tuple[list[list[np.ndarray]], list[str]]:
        tasks, names = [], [Path(t).stem for t in inputs.targets]
        for i, name in enumerate(names):
            fs = inputs[f"target{i}"]
            keep = ~fs.no_loss()
            if not keep.any():
                raise ValueError(f"target {inputs.targets[i]}: no row has a response token "
                                 "within max_tokens; nothing to match")
            tasks.append([np.asarray(f[keep]) for f in fs.all()])
        return tasks, names

    def score(self, p: LessParams, inputs: Inputs) -> pl.DataFrame:
        pool = inputs["pool"]
        tasks, names = self._tasks(inputs)
        rows, listed = feature_rows(pool.positions(), inputs.candidates["row"].to_numpy())
        keep = listed & ~pool.no_loss()[rows]
        cand = inputs.candidates.filter(pl.Series(keep))
        scores, best = less_task_scores(pool.all(), tasks, pool.etas, rows[keep])
        inputs.note("etas", [round(float(e), 6) for e in pool.etas])
        inputs.note("checkpoints", pool.info["checkpoints"])
        inputs.note("target_rows", {n: len(t[0]) for n, t in zip(names, tasks)})
        inputs.note("unscored_rows", int((listed & ~keep).sum()))
        if "shortlist" in inputs.outputs:
            inputs.note("shortlist", {"rows": int(listed.sum()), "outside": int((~listed).sum()),
                                      "of_budget": p.shortlist, **{k: inputs["shortlist"].info.get(k)
                                      for k in ("min_kept_cosine", "max_dropped_cosine")}})
        if cand.height == 0:
            raise ValueError("no pool row has a response token to score; check --param max_tokens")
        return cand.select("id").with_columns(
            less=pl.Series(scores, dtype=pl.Float64),
            best_task=pl.Series([names[b] for b in best], dtype=pl.String))

    def selector(self, p: LessParams, inputs: Inputs, scored: pl.DataFrame) -> ScoreBand | RoundRobin:
        """The top rows by score (LESS); with `max_share` < 1 the same ranking walked down past
        rows of sources that hold their share (`selectors/round_robin.py`'s guard, one list)."""
        if p.max_share == 1:
            return ScoreBand("less", keep="top")
        score = scored["less"].to_numpy()
        order = np.lexsort((scored["id"].to_numpy(), -score))        # ScoreBand's order
        return RoundRobin([StaticList(order, score[order])], ["less"], what="ranking",
                          groups=scored["source"].to_numpy(), max_share=p.max_share,
                          group_by="source")
