"""S2L, SmallToLarge (Yang et al. 2024; methods-a.md §4): cluster the rows' loss trajectories on a
small proxy and sample the budget evenly across the clusters.

1. Proxy: the bundled LoRA trainer on the whole pool (`--param proxy_part=F` for a seeded random
   part), `epochs` (S2L: 3), `checkpoints` evenly spaced checkpoints (S2L keeps the last 12 of a
   save every 500 steps, i.e. 12 points spanning its run); or `--param ckpts=DIR,DIR,...` to use
   existing trainer checkpoints instead.
2. Trajectories: each row's mean response-token loss at every checkpoint (`pipeline/trajectories`),
   raw, NaN set to 0 as the released code does (rows with no response token; counted).
3. FAISS k-means (`pipeline/cluster.py`, Euclidean, 20 iterations) with `k` clusters: 100 as
   released, at most one per 20 rows on small pools (`--param k=` overrides).
4. Budget over the clusters smallest first, each min(size, remaining // clusters left), a seeded
   uniform sample within each; clusters with <= 2 members are set aside and share only the
   budget left at the end (`selectors/balanced.py`, `set_aside=2`, as `schedules/s2l.py`).
   `--param per_source=true` first splits the budget over the pool's sources smallest first (a
   source smaller than its share is taken whole) and clusters within each source, as the
   released code does when the data has a source field.

Deviations (README "Training dynamics"): the proxy is the target family with a LoRA adapter
(SmolLM2-135M by default), not a separately pre-trained smaller model (Pythia-70M), trained with
the trainer's LoRA defaults (lr 2e-4) rather than full fine-tuning at 2e-5; checkpoints are spread
evenly over the run instead of every 500 steps; sampling and k-means are seeded (the released
code is unseeded).
"""

from __future__ import annotations

import logging

import numpy as np
import polars as pl
from thresher.pipeline.budget import Budget
from thresher.pipeline.cluster import cluster_matrix
from thresher.pipeline.forward import parse_flag
from thresher.pipeline.method import Context, Method
from thresher.pipeline.models import DEFAULT_LM
from thresher.pipeline.trajectories import ProxySpec, train_proxy, trajectories
from thresher.selectors.balanced import Balanced

log = logging.getLogger(__name__)

K_MAX = 100          # released S2L config
ROWS_PER_CLUSTER = 20
SET_ASIDE = 2        # clusters with <= 2 members wait until the end (schedules/s2l.py)


def default_k(n: int) -> int:
    return max(1, min(K_MAX, n // ROWS_PER_CLUSTER))


def _list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    return [v.strip() for v in str(value).split(",") if v.strip()]


def proxy_spec(ctx: Context, epochs: int, checkpoints: int = 0, **over) -> ProxySpec:
    """The proxy a method's options describe (shared by S2L and DEALRec's surrogate)."""
    return ProxySpec(model=ctx.option("model", DEFAULT_LM) or DEFAULT_LM,
                     part=float(ctx.option("proxy_part", 1.0)),
                     seed=int(ctx.option("proxy_seed", 0)),
                     epochs=int(ctx.option("epochs", epochs)),
                     lr=float(ctx.option("proxy_lr", 2e-4)),
                     batch_size=int(ctx.option("proxy_batch_size", 8)),
                     max_tokens=int(ctx.option("max_tokens", 512)),
                     checkpoints=int(ctx.option("checkpoints", checkpoints)),
                     dtype=ctx.option("proxy_dtype", None), **over)


def loss_trajectories(ctx: Context):
    """(trajectories, checkpoint list): trained proxy (cached) or the given checkpoints."""
    given = _list(ctx.option("ckpts", None))
    device = ctx.option("device", None)
    if given:
        ckpts = given
    else:
        spec = proxy_spec(ctx, epochs=3, checkpoints=12)
        with ctx.timed("proxy"):
            run = train_proxy(ctx.pool, ctx.store, spec, device=device)
        ctx.config["proxy"] = {"dir": str(run.dir), "steps": run.steps,
                               "total_steps": run.total_steps, "train_seconds": run.seconds,
                               "cached": run.cached}
        ckpts = run.checkpoints
    with ctx.timed("trajectories"):
        tr = trajectories(ctx.pool, ctx.store, [str(c) for c in ckpts],
                          max_tokens=int(ctx.option("max_tokens", 512)), device=device,
                          dtype=ctx.option("dtype", None), threads=ctx.option("threads", None))
    ctx.config["trajectories"] = str(tr.stage.dir)
    return tr


def cluster_sample(ctx: Context, cand: pl.DataFrame, X: np.ndarray, n: int, k: int | None,
                   tag: str, fingerprint: str) -> pl.DataFrame:
    """k-means over the trajectories of `cand` (rows of X), then the balanced draw of n rows."""
    k = min(k or default_k(cand.height), cand.height)
    seed = int(ctx.option("kmeans_seed", 1234))
    with ctx.timed("cluster"):
        cl = cluster_matrix(ctx.store, X, k, fingerprint=f"{fingerprint}:{tag}", niter=20, seed=seed)
    labels = cl.labels
    sizes = np.bincount(labels, minlength=k)
    ctx.config.setdefault("clusters", {})[tag] = {
        "k": k, "nonempty": int((sizes > 0).sum()), "set_aside": int(((sizes > 0) & (sizes <= SET_ASIDE)).sum()),
        "sizes_min_median_max": [int(sizes[sizes > 0].min()), int(np.median(sizes[sizes > 0])), int(sizes.max())]}
    cand = cand.with_columns(cluster=pl.Series(labels).cast(pl.String).str.zfill(4))
    chosen = Balanced("cluster", set_aside=SET_ASIDE).select(cand, Budget("rows", n), ctx.seed)
    return chosen.with_columns(reason=pl.lit(f"S2L {tag}: ") + pl.col("reason"))


class S2LMethod(Method):
    name = "s2l"
    needs = ("a proxy LoRA run on the pool (3 epochs, 12 checkpoints) and one forward pass per "
             "checkpoint; or --param ckpts=DIR,...")
    cost = "proxy training (3 epochs over the pool) + T forward passes + k-means O(N*k*T)"
    summary = ("S2L: cluster per-row loss trajectories over proxy checkpoints (FAISS k-means, "
               "k<=100) and sample clusters evenly, smallest first")

    def select(self, ctx: Context) -> pl.DataFrame:
        tr = loss_trajectories(ctx)
        X = np.asarray(tr.loss(), dtype=np.float32)
        bad = ~np.isfinite(X)
        ctx.config["nan_to_zero_rows"] = int(bad.any(axis=1).sum())
        X[bad] = 0.0                                           # as schedules/s2l.py
        k = ctx.option("k", None)
        k = int(k) if k is not None else None
        cand = ctx.candidates
        n = ctx.budget.rows(cand)
        if not parse_flag(ctx.option("per_source", False)):
            chosen = cluster_sample(ctx, cand, X, n, k, "all", tr.fingerprint)
            return ctx.budget.cut(chosen, cand)
        parts, remaining = [], n
        sizes = cand.group_by("source").len().sort(["len", "source"])
        for j, (src, size) in enumerate(sizes.iter_rows()):
            share = remaining // (sizes.height - j)
            sub = cand.filter(pl.col("source") == src)
            if size <= share:
                got = sub.select("id").with_columns(reason=pl.lit(
                    f"S2L per source: {src} has {size} rows, within its share {share}: all taken"))
            else:
                rows = sub["row"].to_numpy()
                got = cluster_sample(ctx, sub, X[rows], share, k, f"source={src}", tr.fingerprint)
            parts.append(got.select("id", "reason"))
            remaining -= got.height
        return ctx.budget.cut(pl.concat(parts), cand)
