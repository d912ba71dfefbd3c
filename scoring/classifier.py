"""Quality classifier: score every row with a classifier from `thresher classifier train`, DCLM's
fastText model or a FineWeb-Edu-format regressor on disk, and keep the best.

    thresher select POOL --method classifier --param model=edu-head/ --budget 20% --out keep.jsonl
    thresher select POOL --method classifier --param model=dclm.bin --budget 100% ...  # p >= 0.018112

The score column `quality_score` is a probability (binary classifiers: p(high quality)) or a
value (regressions: the predicted rating; FineWeb-Edu's clipped to 0-5, with `int_score`).
`cut=auto` (default) applies the model's threshold when it has one (a published model's:
DCLM 0.018112, FineWeb-Edu 2.5; or one given when training) and otherwise keeps the top of the
ranking under the budget (DCLM's "top 10%" is `--budget 10%`); `cut=top` / `cut=threshold`
force either, and `balance_by=source` shares a top cut evenly over sources. Any selector can cut
the column too (`--selector band --param per=source`, `--selector threshold --param above=X`).
Rows the model cannot read (no text in the part it reads) are not scored; their reasons are
counted in the manifest (config.unscored).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import polars as pl
from thresher.pipeline.method import Inputs, Method, Request
from thresher.pipeline.models.resolve import DEFAULT_LM
from thresher.pipeline.stage import Stage
from thresher.pipeline.stages.classifier_scores import SCORE, ClassifierScores
from thresher.selectors.score_band import ScoreBand
from thresher.selectors.threshold import Threshold


@dataclass(frozen=True)
class ClassifierParams:
    model: str = field(default="", metadata={
        "help": "a `thresher classifier train` directory, a fastText .bin (DCLM's format) or a "
                "FineWeb-Edu-format Hugging Face directory"})
    cut: Literal["auto", "top", "threshold"] = field(default="auto", metadata={
        "help": "auto: the model's threshold if it has one, else top; top: best under the budget"})
    threshold: float | None = field(default=None, metadata={
        "help": "keep rows whose score is >= this (default: the model's own)"})
    balance_by: str | None = field(default=None, metadata={
        "help": "a top cut shared evenly over this column's groups (e.g. source)"})
    part: Literal["first_user", "conversation", "response"] | None = field(default=None, metadata={
        "help": "the text of a row the model reads (default: the one it was trained on)"})


class ClassifierMethod(Method):
    name = "classifier"
    summary = "score rows with a quality classifier (trained, DCLM fastText, FineWeb-Edu); keep the best"
    cost = "fastText: thousands of rows/s; a head: one embedding pass; FineWeb-Edu: one encoder pass"
    Params = ClassifierParams
    score_column = SCORE
    example: ClassVar[dict] = {"model": "CLASSIFIER_DIR"}

    def tokenizer(self, p: ClassifierParams) -> str:
        return DEFAULT_LM           # `model` is the classifier; tokens are counted as usual

    def needs(self, p: ClassifierParams, req: Request) -> dict[str, Stage]:
        if not p.model:
            raise ValueError("--method classifier needs --param model=PATH")
        # absolute: Ray workers may not share this process's working directory (the cache key
        # is the model files' identity, not their path)
        return {"quality": ClassifierScores(model=str(Path(p.model).resolve()), part=p.part)}

    def score(self, p: ClassifierParams, inputs: Inputs) -> pl.DataFrame:
        frame = inputs["quality"].frame()
        stage = ClassifierScores(model=p.model, part=p.part)
        info = stage.info()
        unscored = frame.filter(pl.col(SCORE).is_null())
        counts = unscored["reason"].value_counts()
        inputs.note("classifier", {"kind": info.kind, "task": info.task, "part": stage.text_part(),
                                   "published": info.published, "threshold": info.threshold,
                                   "threshold_source": info.threshold_source,
                                   "held_out": info.metrics.get("held_out")})
        inputs.note("unscored", dict(zip(counts["reason"].to_list(), counts["count"].to_list())))
        cols = ["id", SCORE] + (["int_score"] if "int_score" in frame.columns else [])
        return frame.filter(pl.col(SCORE).is_not_null()).select(cols)

    def selector(self, p: ClassifierParams, inputs: Inputs, scores: pl.DataFrame):
        threshold = p.threshold if p.threshold is not None else \
            ClassifierScores(model=p.model).info().threshold
        if p.cut == "threshold" or (p.cut == "auto" and threshold is not None and p.balance_by is None):
            if threshold is None:
                raise ValueError("--param cut=threshold: the model has no threshold; give "
                                 "--param threshold=X")
            return Threshold(SCORE, above=threshold)
        return ScoreBand(SCORE, keep="top", per=p.balance_by)
