"""Decontamination: drop pool rows that share a long n-gram with an evaluation set.

    thresher select POOL --method decontaminate --target eval/gsm8k_test.jsonl \\
        --target eval/mbpp_test.jsonl --budget 100%
    thresher select POOL --method decontaminate --target EVAL --annotate-only --out marks.parquet

The evaluation files are given as target files (`--target`, repeatable; `targets:` in a
recipe). Each pool row is marked with the evaluation rows it shares a word 13-gram with (after
DataTrove's normalisation; `pipeline/stages/decontam.py`), and rows sharing at least
`min_ngrams` distinct n-grams are dropped (keep = false, reason naming the first evaluation rows
matched). The manifest lists every evaluation file: its rows, how many of them some pool row
matched, how many are too short to hold an n-gram, and how many pool rows matched it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl
from thresher.pipeline.method import Inputs, Method, Request
from thresher.pipeline.stage import Stage
from thresher.pipeline.stages.decontam import EvalOverlap, read_eval
from thresher.selectors.keep_flag import KeepFlag


@dataclass(frozen=True)
class DecontaminateParams:
    n_gram: int = field(default=13, metadata={"help": "words per n-gram (GPT-3, Tulu: 13)"})
    min_ngrams: int = field(default=1, metadata={
        "help": "drop a row sharing at least this many distinct n-grams with evaluation rows"})
    cjk_chars: bool = field(default=True, metadata={
        "help": "character tokens for Chinese/Japanese text (over 30% Han or kana)"})

    def __post_init__(self):
        if self.n_gram < 1:
            raise ValueError(f"n_gram must be at least 1, got {self.n_gram}")
        if self.min_ngrams < 1:
            raise ValueError(f"min_ngrams must be at least 1, got {self.min_ngrams}")


def per_file(frame: pl.DataFrame, evals: tuple[str, ...], n_gram: int, cjk_chars: bool
             ) -> list[dict]:
    """For each evaluation file: rows, rows matched by some pool row, rows too short, pool rows."""
    from pathlib import Path

    from thresher.pipeline.stages.decontam import ngrams_of
    from thresher.pipeline.stages.textnorm import row_keys

    hits = frame.select("id", "decon_matches").explode("decon_matches").drop_nulls()
    hits = hits.with_columns(file=pl.col("decon_matches").str.extract(r"^(.*?):", 1))
    out = []
    for path in evals:
        name = Path(path).name
        rows = read_eval(path)
        _, _, n_tok = ngrams_of(row_keys(rows), n_gram, cjk_chars)
        mine = hits.filter(pl.col("file") == name)
        out.append({"file": path, "rows": len(rows),
                    "rows_matched": mine["decon_matches"].n_unique(),
                    "rows_too_short": int((n_tok < n_gram).sum()),
                    "pool_rows_matching": mine["id"].n_unique()})
    return out


class DecontaminateMethod(Method):
    name = "decontaminate"
    summary = "drop rows sharing a word 13-gram with evaluation sets (--target FILE, repeatable)"
    cost = "O(N x words) n-gram hashes, one sorted lookup each"
    Params = DecontaminateParams
    score_column = "decon_ngrams"
    needs_targets = True

    def needs(self, p: DecontaminateParams, req: Request) -> dict[str, Stage]:
        evals = tuple(str(t) for t in req.targets)
        return {"overlap": EvalOverlap(evals=evals, n_gram=p.n_gram, cjk_chars=p.cjk_chars)}

    def score(self, p: DecontaminateParams, inputs: Inputs) -> pl.DataFrame:
        frame = inputs["overlap"].frame()
        keep = pl.col("decon_ngrams") < p.min_ngrams
        shown = pl.col("decon_matches").list.head(3).list.join(", ")
        more = pl.col("decon_matches").list.len().cast(pl.Int64) - 3
        reason = pl.format("shares {} {}-grams with evaluation rows {}{}", pl.col("decon_ngrams"),
                           pl.lit(p.n_gram), shown,
                           pl.when(more > 0).then(pl.format(" and {} more", more)).otherwise(pl.lit("")))
        out = frame.with_columns(keep=keep).with_columns(
            reason=pl.when(pl.col("keep")).then(pl.lit(None, pl.String)).otherwise(reason))
        evals = tuple(str(t) for t in inputs.targets)
        inputs.note("eval_files", per_file(frame, evals, p.n_gram, p.cjk_chars))
        inputs.note("removed", int((~out["keep"]).sum()))
        return out

    def selector(self, p: DecontaminateParams, inputs: Inputs, scored: pl.DataFrame) -> KeepFlag:
        return KeepFlag(kept=f"shares no {p.n_gram}-gram with the evaluation sets")
