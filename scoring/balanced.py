"""Balanced random selection across groups, smallest group first (S2L's sampler).

    thresher select POOL --method balanced --budget 1300 --param by=capability
    thresher select POOL --method balanced --budget 10% --param by=cluster --param k=100

`--param by=source` (default) uses the row's source (`by=kind`: chat or text); `by=cluster` k-means clusters of the
embeddings (all-MiniLM-L6-v2, spherical faiss k-means, `--param k=`, default 100 as in S2L,
capped at n); any other name is an original field kept in the row's metadata (e.g. capability).
Rows without that field form one "(none)" group; a field no row has is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import polars as pl
from thresher.pipeline.method import Inputs, Method, Request
from thresher.pipeline.models.resolve import DEFAULT_EMBEDDER
from thresher.pipeline.stage import Stage
from thresher.pipeline.stages.cluster import KMeans
from thresher.pipeline.stages.embed import Embed
from thresher.selectors.balanced import Balanced


@dataclass(frozen=True)
class BalancedParams:
    by: str = field(default="source", metadata={
        "help": "group: source, kind, cluster, or an original field (e.g. capability)"})
    embedder: str = field(default=DEFAULT_EMBEDDER, metadata={"help": "for by=cluster"})
    part: Literal["first_user", "conversation", "response"] = field(
        default="conversation", metadata={"help": "text embedded, for by=cluster"})
    k: int = field(default=100, metadata={"help": "clusters for by=cluster (capped at n)"})
    spherical: bool = field(default=True, metadata={"help": "spherical k-means, for by=cluster"})
    niter: int = field(default=20, metadata={"help": "k-means iterations, for by=cluster"})


class BalancedMethod(Method):
    name = "balanced"
    summary = "random sample balanced over groups (source, cluster, capability...), smallest first"
    cost = "O(N); + embeddings and k-means for by=cluster"
    Params = BalancedParams

    def needs(self, p: BalancedParams, req: Request) -> dict[str, Stage]:
        if p.by != "cluster":
            return {}
        emb = Embed(model=p.embedder, part=p.part)
        return {"km": KMeans(of=emb, k=min(p.k, req.n_rows), spherical=p.spherical, niter=p.niter)}

    def _col(self, p: BalancedParams) -> str:
        return f"group_{p.by}" if p.by in ("id", "row", "n_chars", "n_tokens") else p.by

    def score(self, p: BalancedParams, inputs: Inputs) -> pl.DataFrame:
        if p.by in ("source", "kind"):           # canonical columns
            group = inputs.candidates[p.by]
        elif p.by == "cluster":
            group = pl.Series(inputs["km"].labels)
        else:
            group = inputs.pool.meta_field(p.by)
            if group.null_count() == group.len():
                raise ValueError(f"--param by={p.by}: no row has an original field {p.by!r} "
                                 "(use source, kind, cluster, or a field present in the input)")
        return inputs.candidates.select("id").with_columns(group.alias(self._col(p)))

    def selector(self, p: BalancedParams, inputs: Inputs, scores: pl.DataFrame) -> Balanced:
        return Balanced(self._col(p))
