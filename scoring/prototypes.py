"""Self-supervised prototypes (Sorscher et al. 2022): distance to the nearest k-means centroid.

    thresher select POOL --method prototypes --budget 30% --keep hard --param k=100

Embed (all-MiniLM-L6-v2, normalised), spherical faiss k-means (`--param k=`, default n/100
capped at 1000), score = cosine distance of each row to its centroid. `--keep hard` (default)
keeps the farthest rows (least prototypical: the paper's choice when data are abundant), `easy`
the closest (when data are scarce). Ranking is global, as in the paper's metric; D4's
per-cluster variant is not implemented.
"""

from __future__ import annotations

import polars as pl
from thresher.pipeline.cluster import cluster_for, default_k
from thresher.pipeline.embed import embed_for
from thresher.pipeline.method import Context, Method
from thresher.selectors.score_band import ScoreBand

KEEPS = {"hard": "top", "easy": "bottom"}


class PrototypesMethod(Method):
    name = "prototypes"
    needs = "an embedding model (default all-MiniLM-L6-v2)"
    cost = "embeddings O(N) + k-means O(N*k*d)"
    summary = "distance to the nearest k-means centroid (Sorscher et al.); keep hard or easy"

    def select(self, ctx: Context) -> pl.DataFrame:
        keep = ctx.option("keep", "hard")
        if keep not in KEEPS:
            raise ValueError(f"--keep must be hard or easy for prototypes, got {keep!r}")
        emb = embed_for(ctx)
        k = int(ctx.option("k", default_k(ctx.candidates.height)))
        cl = cluster_for(ctx, emb, k, spherical=bool(ctx.option("spherical", True)),
                         niter=int(ctx.option("niter", 20)))
        scored = ctx.candidates.with_columns(proto_dist=pl.Series(cl.cos_dist),
                                             cluster=pl.Series(cl.labels))
        chosen = ScoreBand("proto_dist", keep=KEEPS[keep]).select(scored, ctx.budget, ctx.seed)
        word = "farthest from" if keep == "hard" else "closest to"
        return chosen.with_columns(reason=pl.format(
            "{} its centroid ({}: cos distance {} in cluster {})", pl.lit(word),
            pl.lit(keep), pl.col("proto_dist").round(4), "cluster")).select(
            "id", "reason", "proto_dist", "cluster")
