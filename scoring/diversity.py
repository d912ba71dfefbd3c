"""DEITA-style diversity filter over sentence embeddings.

    thresher select POOL --method diversity --budget 2000 --param threshold=0.9
    thresher select POOL --method diversity --budget 2000 --param score=quality_score

Rows are visited in score order and a row is skipped when its cosine similarity to any row
already chosen exceeds `threshold` (DEITA's tau, default 0.9). DEITA orders by its complexity x
quality scores (two 7B scorer models, not shipped here); `--param score=<field>` orders by a
numeric original field instead (highest first). Without one, the default order is a seeded
random permutation (`--param order=random`): neutral, so the filter alone only removes
redundancy; `--param order=longest` visits the longest rows (n_chars) first. Embeddings are
all-MiniLM-L6-v2 (DEITA uses the last hidden state of a 7B LM; deviation, see docs/methods.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import polars as pl
from thresher.pipeline.method import Inputs, Method, Request
from thresher.pipeline.models.resolve import DEFAULT_EMBEDDER
from thresher.pipeline.stage import Stage
from thresher.pipeline.stages.embed import Embed
from thresher.selectors.diversity import DiversityFilter


@dataclass(frozen=True)
class DiversityParams:
    threshold: float = field(default=0.9, metadata={"help": "skip rows with cos sim > this (DEITA tau)"})
    score: str | None = field(default=None, metadata={
        "help": "numeric original field to visit rows by (highest first)"})
    order: Literal["random", "longest"] = field(default="random", metadata={
        "help": "visit order without a score field"})
    embedder: str = field(default=DEFAULT_EMBEDDER, metadata={"help": "sentence-transformers model"})
    part: Literal["first_user", "conversation", "response"] = field(
        default="conversation", metadata={"help": "text embedded"})


class DiversityMethod(Method):
    name = "diversity"
    summary = "DEITA-style filter: greedy in score order, skip rows too similar to chosen ones"
    cost = "embeddings O(N) + greedy scan O(N*|S|*d) (FAISS inner product)"
    Params = DiversityParams

    def needs(self, p: DiversityParams, req: Request) -> dict[str, Stage]:
        return {"emb": Embed(model=p.embedder, part=p.part)}

    def score(self, p: DiversityParams, inputs: Inputs) -> pl.DataFrame:
        frame = inputs.candidates.select("id")
        if p.score is not None:
            values = inputs.pool.meta_field(p.score).cast(pl.Float64, strict=False)
            if values.null_count():
                raise ValueError(f"--param score={p.score}: {values.null_count()} rows have no "
                                 f"numeric {p.score!r} field")
            return frame.with_columns(values.alias(p.score))
        if p.order == "longest":
            return frame.with_columns(inputs.candidates["n_chars"].alias("length"))
        return frame

    def selector(self, p: DiversityParams, inputs: Inputs, scores: pl.DataFrame) -> DiversityFilter:
        column = p.score if p.score is not None else ("length" if p.order == "longest" else None)
        return DiversityFilter(inputs["emb"].matrix(), p.threshold, column)
