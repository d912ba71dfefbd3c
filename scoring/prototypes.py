"""Self-supervised prototypes (Sorscher et al. 2022): distance to the nearest k-means centroid.

    thresher select POOL --method prototypes --budget 30% --keep hard --param k=100

Embed (all-MiniLM-L6-v2, normalised), spherical faiss k-means (`--param k=`, default n/100
capped at 1000), score = cosine distance of each row to its centroid. `--keep hard` (default)
keeps the farthest rows (least prototypical: the paper's choice when data are abundant), `easy`
the closest (when data are scarce). Ranking is global, as in the paper's metric; D4's
per-cluster variant is not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import polars as pl
from thresher.pipeline.method import Inputs, Method, Request
from thresher.pipeline.models.resolve import DEFAULT_EMBEDDER
from thresher.pipeline.stage import Stage
from thresher.pipeline.stages.cluster import embed_and_cluster
from thresher.selectors.score_band import ScoreBand

KEEPS = {"hard": "top", "easy": "bottom"}


@dataclass(frozen=True)
class PrototypesParams:
    embedder: str = field(default=DEFAULT_EMBEDDER, metadata={"help": "sentence-transformers model"})
    part: Literal["first_user", "conversation", "response"] = field(
        default="conversation", metadata={"help": "text embedded"})
    k: int | None = field(default=None, metadata={"help": "clusters (default n/100, at most 1000)"})
    spherical: bool = field(default=True, metadata={"help": "spherical k-means"})
    niter: int = field(default=20, metadata={"help": "k-means iterations"})
    keep: Literal["hard", "easy"] = field(default="hard", metadata={
        "help": "hard: farthest from the centroid; easy: closest"})


class PrototypesMethod(Method):
    name = "prototypes"
    summary = "distance to the nearest k-means centroid (Sorscher et al.); keep hard or easy"
    cost = "embeddings O(N) + k-means O(N*k*d)"
    Params = PrototypesParams
    score_column = "proto_dist"

    def needs(self, p: PrototypesParams, req: Request) -> dict[str, Stage]:
        return embed_and_cluster(p, req.n_rows)

    def score(self, p: PrototypesParams, inputs: Inputs) -> pl.DataFrame:
        cl = inputs["km"]
        return inputs.candidates.select("id").with_columns(
            proto_dist=pl.Series(cl.cos_dist), cluster=pl.Series(cl.labels))

    def selector(self, p: PrototypesParams, inputs: Inputs, scores: pl.DataFrame) -> ScoreBand:
        return ScoreBand("proto_dist", keep=KEEPS[p.keep])
