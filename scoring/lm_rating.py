"""LM rating: a causal LM rates every row on a rubric (FineWeb-Edu's educational value for text,
DEITA's complexity x quality for chat), read DEITA's way from one forward pass; keep the best.

    thresher select POOL --method lm-rating --param rubric=edu --budget 20% --out edu.jsonl
    thresher select POOL --method lm-rating --param rubric=deita --budget 6000 --out deita.jsonl

The shipped rubrics approximate FineWeb-Edu's Llama-3-70B annotation and DEITA's fine-tuned
scorers with whatever LM is given (default the bundled SmolLM2-135M-Instruct); the ratings are
a cheap stand-in, not those scorers (`pipeline/models/rubrics.py`). The score column `rating`
is the expected rating (edu: 0-5; deita: the sum over turns of complexity x quality, each 1-6),
with `complexity` and `quality` (means over turns) for deita. `sample` < 1 rates a seeded
fraction of rows only (to label a training set for `thresher classifier train --rate`); the
unrated rows are not candidates. `cut=auto` keeps rating >= the rubric's published threshold
(edu: 2.5, FineWeb-Edu's int_score >= 3) when it has one, else the top under the budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import polars as pl
from thresher.pipeline.method import Inputs, Method, Request
from thresher.pipeline.models.resolve import DEFAULT_LM
from thresher.pipeline.models.rubrics import load_rubric
from thresher.pipeline.stage import Stage
from thresher.pipeline.stages.ratings import LmRatings
from thresher.selectors.score_band import ScoreBand
from thresher.selectors.threshold import Threshold


@dataclass(frozen=True)
class LmRatingParams:
    rubric: str = field(default="edu", metadata={
        "help": "edu (FineWeb-Edu, text) | deita (DEITA, chat) | deita-raw | a rubric YAML file"})
    model: str = field(default=DEFAULT_LM, metadata={"help": "the rating causal LM"})
    part: Literal["first_user", "conversation", "response"] = field(default="conversation", metadata={
        "help": "what a text rubric reads of a chat row"})
    sample: float = field(default=1.0, metadata={"help": "rate this seeded fraction of rows only"})
    max_tokens: int = field(default=1024, metadata={"help": "prompt length cap (fields are cut)"})
    cut: Literal["auto", "top", "threshold"] = field(default="auto", metadata={
        "help": "auto: the rubric's threshold if it has one, else top"})
    threshold: float | None = field(default=None, metadata={"help": "keep rating >= this"})
    balance_by: str | None = field(default=None, metadata={
        "help": "a top cut shared evenly over this column's groups (e.g. source)"})


class LmRatingMethod(Method):
    name = "lm-rating"
    summary = "an LM rates rows on a rubric (FineWeb-Edu edu value, DEITA complexity x quality)"
    cost = "one forward pass per prompt (deita: two per turn), cached per shard"
    Params = LmRatingParams
    score_column = "rating"

    def needs(self, p: LmRatingParams, req: Request) -> dict[str, Stage]:
        rubric = str(Path(p.rubric).resolve()) if Path(p.rubric).is_file() else p.rubric
        return {"ratings": LmRatings(model=p.model, rubric=rubric, part=p.part, sample=p.sample,
                                     seed=req.seed, max_tokens=p.max_tokens)}

    def score(self, p: LmRatingParams, inputs: Inputs) -> pl.DataFrame:
        frame = inputs["ratings"].frame()
        rubric = load_rubric(p.rubric)
        counts = frame.filter(pl.col("rating").is_null())["reason"].value_counts()
        inputs.note("rubric", {"name": rubric.name, "approximates": rubric.approximates,
                               "threshold": rubric.threshold})
        inputs.note("unscored", dict(zip(counts["reason"].to_list(), counts["count"].to_list())))
        cols = [c for c in ("id", "rating", "complexity", "quality") if c in frame.columns]
        rated = frame.filter(pl.col("rating").is_not_null()).select(cols)
        if rated.height == 0:
            raise ValueError(f"the {rubric.name} rubric rated no row of this pool "
                             f"({', '.join(counts['reason'].to_list())})")
        return rated

    def selector(self, p: LmRatingParams, inputs: Inputs, scores: pl.DataFrame):
        threshold = p.threshold if p.threshold is not None else load_rubric(p.rubric).threshold
        if p.cut == "threshold" or (p.cut == "auto" and threshold is not None and p.balance_by is None):
            if threshold is None:
                raise ValueError("--param cut=threshold: the rubric has no threshold; give "
                                 "--param threshold=X")
            return Threshold("rating", above=threshold)
        return ScoreBand("rating", keep="top", per=p.balance_by)
