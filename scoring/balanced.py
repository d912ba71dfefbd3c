"""Balanced random selection across groups, smallest group first (S2L's sampler).

    thresher select POOL --method balanced --budget 1300 --by capability
    thresher select POOL --method balanced --budget 10% --by cluster --param k=100

`--by source` (default) uses the row's source (`--by kind`: chat or text); `--by cluster` k-means clusters of the
embeddings (all-MiniLM-L6-v2, spherical faiss k-means, `--param k=`, default 100 as in S2L,
capped at n); any other name is an original field kept in the row's metadata (e.g. capability).
Rows without that field form one "(none)" group; a field no row has is an error.
"""

from __future__ import annotations

import polars as pl
from thresher.pipeline.cluster import cluster_for
from thresher.pipeline.embed import embed_for
from thresher.pipeline.method import Context, Method
from thresher.selectors.balanced import Balanced


class BalancedMethod(Method):
    name = "balanced"
    needs = "nothing (--by source or a field); embeddings for --by cluster"
    cost = "O(N); + embeddings and k-means for --by cluster"
    summary = "random sample balanced over groups (source, cluster, capability...), smallest first"

    def select(self, ctx: Context) -> pl.DataFrame:
        by = ctx.option("by", "source")
        cands = ctx.candidates
        if by in ("source", "kind"):           # canonical columns
            group = cands[by]
        elif by == "cluster":
            emb = embed_for(ctx)
            k = min(int(ctx.option("k", 100)), cands.height)
            cl = cluster_for(ctx, emb, k, spherical=bool(ctx.option("spherical", True)),
                             niter=int(ctx.option("niter", 20)))
            group = pl.Series("cluster", cl.labels)
        else:
            group = ctx.pool.meta_field(by)
            if group.null_count() == group.len():
                raise ValueError(f"--by {by}: no row has an original field {by!r} "
                                 "(use source, kind, cluster, or a field present in the input)")
        col = by if by not in cands.columns or by in ("source", "kind") else f"group_{by}"
        chosen = Balanced(col).select(cands.with_columns(group.alias(col)), ctx.budget, ctx.seed)
        return chosen.select("id", "reason", col)
