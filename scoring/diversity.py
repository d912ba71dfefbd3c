"""DEITA-style diversity filter over sentence embeddings.

    thresher select POOL --method diversity --budget 2000 --param threshold=0.9
    thresher select POOL --method diversity --budget 2000 --param score=quality_score

Rows are visited in score order and a row is skipped when its cosine similarity to any row
already chosen exceeds `threshold` (DEITA's tau, default 0.9). DEITA orders by its complexity x
quality scores (two 7B scorer models, not shipped here); `--param score=<field>` orders by a
numeric original field instead (highest first). Without one, the default order is a seeded
random permutation (`--param order=random`): neutral, so the filter alone only removes
redundancy; `--param order=longest` visits the longest rows (n_chars) first. Embeddings are
all-MiniLM-L6-v2 (DEITA uses the last hidden state of a 7B LM; deviation, see README).
"""

from __future__ import annotations

import polars as pl
from thresher.pipeline.embed import embed_for
from thresher.pipeline.method import Context, Method
from thresher.selectors.diversity import DiversityFilter

ORDERS = ("random", "longest")


class DiversityMethod(Method):
    name = "diversity"
    needs = "an embedding model (default all-MiniLM-L6-v2)"
    cost = "embeddings O(N) + greedy scan O(N*|S|*d) (FAISS inner product)"
    summary = "DEITA-style filter: greedy in score order, skip rows too similar to chosen ones"

    def select(self, ctx: Context) -> pl.DataFrame:
        threshold = float(ctx.option("threshold", 0.9))
        field = ctx.option("score")
        order = ctx.option("order", "random") if field is None else None
        cands = ctx.candidates
        if field is not None:
            values = ctx.pool.meta_field(field).cast(pl.Float64, strict=False)
            if values.null_count():
                raise ValueError(f"--param score={field}: {values.null_count()} rows have no "
                                 f"numeric {field!r} field")
            cands, score = cands.with_columns(values.alias("_score")), "_score"
        elif order == "longest":
            score = "n_chars"
        elif order == "random":
            score = None
        else:
            raise ValueError(f"--param order must be one of {', '.join(ORDERS)}, got {order!r}")
        emb = embed_for(ctx)
        chosen = DiversityFilter(emb.matrix(), threshold, score).select(cands, ctx.budget, ctx.seed)
        if field is not None:
            chosen = chosen.with_columns(reason=pl.col("reason").str.replace("_score", field,
                                                                             literal=True))
        return chosen.select("id", "reason", "max_sim")
