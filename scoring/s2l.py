"""S2L, SmallToLarge (Yang et al. 2024; methods-a.md §4): cluster the rows' loss trajectories on a
small proxy and sample the budget evenly across the clusters.

1. Proxy (`Proxy` stage): the bundled LoRA trainer on the whole pool (`proxy_part` < 1: a seeded
   random part), `epochs` (S2L: 3), `checkpoints` evenly spaced checkpoints (S2L keeps the last
   12 of a save every 500 steps: 12 points spanning its run); or `ckpts=DIR,DIR,...` to use
   existing trainer checkpoints instead.
2. Trajectories (`TrajectoryStage`): each row's mean response-token loss at every checkpoint,
   raw, NaN set to 0 as the released code does (rows with no response token; counted).
3. FAISS k-means (`KMeans` stage over the trajectories; Euclidean, 20 iterations) with `k`
   clusters: 100 as released, at most one per 20 rows on small pools.
4. The budget over the clusters smallest first, each min(size, remaining // clusters left), a
   seeded uniform sample within each; clusters with <= 2 members are set aside and share only
   the budget left at the end (`selectors/balanced.py`, `set_aside=2`, as `schedules/s2l.py`).
   `per_source=true` first splits the budget over the pool's sources smallest first (a source
   smaller than its share is taken whole) and clusters within each source, as the released
   code does when the data has a source field.

Deviations (docs/training-dynamics.md): the proxy is the target family with a LoRA adapter
(SmolLM2-135M by default), not a separately pre-trained smaller model (Pythia-70M), trained with
the trainer's LoRA defaults (lr 2e-4) rather than full fine-tuning at 2e-5; checkpoints are spread
evenly over the run instead of every 500 steps; sampling and k-means are seeded (the released
code is unseeded).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl
from thresher.pipeline.budget import Budget
from thresher.pipeline.method import Inputs, Method, Request
from thresher.pipeline.stage import Stage
from thresher.pipeline.stages.cluster import KMeans, kmeans
from thresher.pipeline.stages.proxy import ProxyParams, proxy_stage
from thresher.pipeline.stages.trajectories import TrajectoryStage
from thresher.selectors.balanced import Balanced

K_MAX = 100          # released S2L config
ROWS_PER_CLUSTER = 20
SET_ASIDE = 2        # clusters with <= 2 members wait until the end (schedules/s2l.py)


def trajectory_k(n: int) -> int:
    return max(1, min(K_MAX, n // ROWS_PER_CLUSTER))


@dataclass(frozen=True)
class S2LParams(ProxyParams):
    ckpts: tuple[str, ...] = field(default=(), metadata={
        "help": "existing trainer checkpoints to use instead of training a proxy"})
    k: int | None = field(default=None, metadata={"help": "clusters (default min(100, N/20))"})
    per_source: bool = field(default=False, metadata={
        "help": "split the budget over sources first, cluster within each (released code)"})
    kmeans_seed: int = field(default=1234, metadata={"help": "k-means seed"})


class S2LPerSource:
    """S2L's source split: sources smallest first, each min(size, remaining // sources left);
    a source within its share is taken whole, else its own clusters are sampled (`cluster`
    holds "source/label"), clusters of <= 2 rows set aside."""

    def select(self, candidates: pl.DataFrame, budget: Budget, seed: int = 0) -> pl.DataFrame:
        parts, remaining = [], budget.rows(candidates)
        sizes = candidates.group_by("source").len().sort(["len", "source"])
        for j, (src, size) in enumerate(sizes.iter_rows()):
            share = remaining // (sizes.height - j)
            sub = candidates.filter(pl.col("source") == src)
            if size <= share:
                got = sub.select("id").with_columns(reason=pl.lit(
                    f"S2L per source: {src} has {size} rows, within its share {share}: all taken"))
            else:
                got = Balanced("cluster", set_aside=SET_ASIDE).select(sub, Budget("rows", share), seed)
            parts.append(got.select("id", "reason"))
            remaining -= got.height
        return budget.cut(pl.concat(parts), candidates)


class S2LMethod(Method):
    name = "s2l"
    summary = ("S2L: cluster per-row loss trajectories over proxy checkpoints (FAISS k-means, "
               "k<=100) and sample clusters evenly, smallest first")
    cost = ("proxy training (3 epochs over the pool) + one forward pass per checkpoint (12) + "
            "k-means O(N*k*T)")
    Params = S2LParams

    def needs(self, p: S2LParams, req: Request) -> dict[str, Stage]:
        traj = TrajectoryStage(proxy=None if p.ckpts else proxy_stage(p), ckpts=tuple(p.ckpts),
                               max_tokens=p.max_tokens)
        if p.per_source:
            return {"traj": traj}
        k = min(p.k or trajectory_k(req.n_rows), req.n_rows)
        return {"traj": traj, "km": KMeans(of=traj, k=k, niter=20, seed=p.kmeans_seed)}

    def score(self, p: S2LParams, inputs: Inputs) -> pl.DataFrame:
        X = inputs["traj"].matrix()
        inputs.note("nan_to_zero_rows", int((~np.isfinite(np.asarray(inputs["traj"].loss()))).any(1).sum()))
        inputs.note("trajectory_checkpoints", inputs["traj"].checkpoints)
        cand = inputs.candidates
        if not p.per_source:
            labels = np.asarray(inputs["km"].labels)
            self._note_sizes(inputs, "all", labels)
            sizes = np.bincount(labels)           # the report's cluster bars
            inputs.note("cluster_table_kind", "trajectory")
            inputs.note("cluster_table", [{"cluster": f"{c:04d}", "size": int(n),
                                           "set_aside": bool(n <= SET_ASIDE)}
                                          for c, n in enumerate(sizes) if n > 0])
            return cand.select("id").with_columns(cluster=pl.Series(labels).cast(pl.String).str.zfill(4))
        out = []
        for src in sorted(set(cand["source"])):
            sub = cand.filter(pl.col("source") == src)
            rows = sub["row"].to_numpy()
            k = min(p.k or trajectory_k(len(rows)), len(rows))
            labels = kmeans(X[rows], k, niter=20, seed=p.kmeans_seed)[1]
            self._note_sizes(inputs, f"source={src}", labels)
            out.append(sub.select("id", "source").with_columns(
                cluster=pl.lit(f"{src}/") + pl.Series(labels).cast(pl.String).str.zfill(4)))
        return pl.concat(out)

    @staticmethod
    def _note_sizes(inputs: Inputs, tag: str, labels: np.ndarray) -> None:
        sizes = np.bincount(labels)
        sizes = sizes[sizes > 0]
        clusters = inputs.notes.setdefault("clusters", {})
        clusters[tag] = {"k": len(sizes), "set_aside": int((sizes <= SET_ASIDE).sum()),
                         "sizes_min_median_max": [int(sizes.min()), int(np.median(sizes)), int(sizes.max())]}

    def selector(self, p: S2LParams, inputs: Inputs, scores: pl.DataFrame):
        return S2LPerSource() if p.per_source else Balanced("cluster", set_aside=SET_ASIDE)
