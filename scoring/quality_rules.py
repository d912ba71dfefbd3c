"""Rule-based quality filters for pretraining text: Gopher quality and repetition, C4, FineWeb.

    thresher select POOL --method quality-rules --budget 100% --out kept.jsonl
    thresher select POOL --method quality-rules --annotate-only --out values.parquet
    thresher select POOL --method quality-rules --param min_doc_words=100 --param filters=gopher_quality,c4 ...

The `QualityValues` stage (pipeline/stages/rule_values.py) measures every rule's value per row,
cached per shard; this method compares them with typed thresholds whose defaults are the
published ones (DataTrove's classes, FineWeb's pipeline), so a threshold change recomputes
nothing. A row is kept when it fails no rule; `reason` names the first failing rule in
FineWeb's order (Gopher repetition, Gopher quality, C4, FineWeb; within a filter, DataTrove's
order of checks), and the manifest counts, per rule, the rows that fail it first, fail it at
all, and that only it removes.

Chat rows are measured only with `chat=assistant|conversation` (default `skip`: never judged,
always kept); even then only the repetition rules that catch degenerate loops apply to them
(duplicate lines and paragraphs, duplicated 5- to 10-grams), and only on chat texts of at least
`chat_min_words` words, unless `chat_rules=all`: web-page rules remove most code, math and
tool-call rows (docs/pretraining.md).

Per-language thresholds: `language` names the word splitter's language (ISO 639-1 "zh", or
FineWeb-2's language + script key "cmn_Hani"), and `overrides` a YAML or JSON file keyed like
FineWeb-2's per-language configs (`cmn_Hani: {min_avg_word_length: 1, stop_words: [...]}`) whose
entry for `language` replaces the defaults.

Where thresher differs from DataTrove on purpose: C4 does not rewrite a kept row's text to its
kept lines (DataTrove does): the lines it would remove are annotated (`c4_lines_removed`,
`c4_removed_lines`) and the row is written as it came; every filter measures the original text
(in a DataTrove pipeline FineWeb's filter sees C4's rewritten text); a threshold of 0 is a
threshold (DataTrove's `if threshold and ...` switches a rule off at 0; here `null` does); when a
row holds both lorem ipsum and a curly bracket, its reason is lorem ipsum (DataTrove names the
one on the earlier line); the stop-word rule is named `too_few_stop_words`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import polars as pl
from thresher.pipeline.filtering import Rule, apply_rules
from thresher.pipeline.method import Inputs, Method, Request
from thresher.pipeline.params import parse_params
from thresher.pipeline.stages.rule_values import QualityValues
from thresher.pipeline.stages.text_rules import STOP_WORDS
from thresher.selectors.keep_flag import KeepFlag

FILTERS = ("gopher_repetition", "gopher_quality", "c4", "fineweb")
# ISO 639-3 (FineWeb-2's keys) -> the spaCy language of the word splitter
ISO3 = {"eng": "en", "cmn": "zh", "zho": "zh", "yue": "zh", "jpn": "ja", "kor": "ko", "deu": "de",
        "fra": "fr", "spa": "es", "ita": "it", "por": "pt", "rus": "ru", "nld": "nl", "pol": "pl",
        "tur": "tr", "swe": "sv", "dan": "da", "fin": "fi", "ces": "cs", "ell": "el", "arb": "ar",
        "ara": "ar", "hin": "hi", "ben": "bn", "vie": "vi", "ind": "id", "tha": "th", "ukr": "uk",
        "heb": "he", "fas": "fa", "pes": "fa", "ron": "ro", "hun": "hu", "cat": "ca", "nob": "nb"}


def _h(text: str) -> dict:
    return {"help": text}


@dataclass(frozen=True)
class QualityRulesParams:
    filters: tuple[Literal["gopher_repetition", "gopher_quality", "c4", "fineweb"], ...] = field(
        default=FILTERS, metadata=_h("rule groups applied, in this order"))
    language: str = field(default="en", metadata=_h("word-splitter language: 'en', 'zh', or a "
                                                    "FineWeb-2 key such as cmn_Hani"))
    overrides: str | None = field(default=None, metadata=_h(
        "YAML/JSON file {lang_Script: {parameter: value}}; the entry for `language` applies"))
    chat: Literal["skip", "assistant", "conversation"] = field(default="skip", metadata=_h(
        "chat rows: not judged (skip), or measured on assistant turns / every turn"))
    chat_rules: Literal["repetition", "all"] = field(default="repetition", metadata=_h(
        "rules applied to measured chat rows"))
    chat_min_words: int = field(default=50, metadata=_h("chat texts shorter are not judged"))
    # Gopher quality (GopherQualityFilter)
    min_doc_words: int | None = 50
    max_doc_words: int | None = 100_000
    min_avg_word_length: float | None = 3
    max_avg_word_length: float | None = 10
    max_symbol_word_ratio: float | None = field(default=0.1, metadata=_h("'#' and ellipses per word"))
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    min_alpha_words_ratio: float | None = field(default=0.8, metadata=_h(
        "share of words holding a letter (DataTrove's max_non_alpha_words_ratio)"))
    min_stop_words: int | None = 2
    stop_words: tuple[str, ...] = field(default=STOP_WORDS, metadata=_h("Gopher's stop words"))
    # Gopher repetition (GopherRepetitionFilter)
    dup_para_frac: float | None = 0.3
    dup_para_char_frac: float | None = 0.2
    dup_line_frac: float | None = 0.3
    dup_line_char_frac: float | None = 0.2
    top_2gram: float | None = 0.20
    top_3gram: float | None = 0.18
    top_4gram: float | None = 0.16
    dup_5gram: float | None = 0.15
    dup_6gram: float | None = 0.14
    dup_7gram: float | None = 0.13
    dup_8gram: float | None = 0.12
    dup_9gram: float | None = 0.11
    dup_10gram: float | None = 0.10
    # C4 (C4QualityFilter; line rules in the stage, FineWeb's setting for terminal punctuation)
    c4_no_terminal_punct: bool = field(default=False, metadata=_h(
        "drop lines without terminal punctuation (C4's own: true; FineWeb: false)"))
    c4_min_words_per_line: int = 3
    c4_max_word_length: int = 1000
    c4_min_sentences: int | None = 5
    c4_lorem_ipsum: bool = True
    c4_curly_bracket: bool = True
    # FineWeb (FineWebQualityFilter)
    line_punct_thr: float | None = 0.12
    line_punct_exclude_zero: bool = False
    short_line_thr: float | None = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float | None = 0.01
    new_line_ratio: float | None = 0.3


def spacy_language(language: str) -> str:
    code = language.split("_")[0].lower()
    return ISO3.get(code, code if len(code) == 2 else "xx")


def effective(p: QualityRulesParams) -> QualityRulesParams:
    """The parameters with the `overrides` file's entry for `language` applied."""
    if p.overrides is None:
        return p
    path = Path(p.overrides)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such overrides file (--param overrides)")
    try:
        import yaml

        table = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a YAML/JSON overrides file ({str(e).splitlines()[0]})") from None
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
        raise ValueError(f"{path}: overrides are a mapping {{lang_Script: {{parameter: value}}}}")
    entry = table.get(p.language)
    if entry is None:
        return p
    if {"language", "overrides"} & set(entry):
        raise ValueError(f"{path}: {p.language}: 'language' and 'overrides' cannot be overridden")
    base = {f.name: getattr(p, f.name) for f in dataclasses.fields(p)}
    try:
        return parse_params(QualityRulesParams, {**base, **entry}, f"{path}: {p.language}: parameter")
    except ValueError as e:
        raise ValueError(str(e)) from None


def stage_for(p: QualityRulesParams) -> QualityValues:
    return QualityValues(language=spacy_language(p.language), chat=p.chat,
                         stop_words=tuple(p.stop_words), short_line_length=p.short_line_length,
                         c4_no_terminal_punct=p.c4_no_terminal_punct,
                         c4_min_words_per_line=p.c4_min_words_per_line,
                         c4_max_word_length=p.c4_max_word_length)


Spec = tuple  # (column, op, threshold) of a rule comparing one value with a threshold


def _above(col: str, limit) -> tuple[pl.Expr | None, Spec]:
    return (None if limit is None else pl.col(col) > limit), (col, ">", limit)


def _below(col: str, limit) -> tuple[pl.Expr | None, Spec]:
    return (None if limit is None else pl.col(col) < limit), (col, "<", limit)


def rules_for(p: QualityRulesParams) -> dict[str, list[tuple[str, pl.Expr | None, bool, Spec | None]]]:
    """Per filter: (rule name, failing expression or None when off, applies to chat rows, and
    for a threshold rule its (value column, op, threshold))."""
    out: dict[str, list[tuple]] = {}
    for group, rules in _rules(p).items():
        out[group] = []
        for name, ex, chat in rules:
            expr, spec = ex if isinstance(ex, tuple) else (ex, None)
            out[group].append((name, expr, chat, spec))
    return out


def _rules(p: QualityRulesParams) -> dict[str, list[tuple]]:
    rep = [("dup_para_frac", _above("gr_dup_para_frac", p.dup_para_frac), True),
           ("dup_para_char_frac", _above("gr_dup_para_char_frac", p.dup_para_char_frac), True),
           ("dup_line_frac", _above("gr_dup_line_frac", p.dup_line_frac), True),
           ("dup_line_char_frac", _above("gr_dup_line_char_frac", p.dup_line_char_frac), True)]
    rep += [(f"top_{n}_gram", _above(f"gr_top_{n}gram", getattr(p, f"top_{n}gram")), False)
            for n in (2, 3, 4)]
    rep += [(f"duplicated_{n}_n_grams", _above(f"gr_dup_{n}gram", getattr(p, f"dup_{n}gram")), True)
            for n in range(5, 11)]
    punct = None if p.line_punct_thr is None else (pl.col("fw_line_punct_ratio") < p.line_punct_thr)
    if punct is not None and p.line_punct_exclude_zero:
        punct = punct & (pl.col("fw_line_punct_ratio") != 0)
    return {
        "gopher_repetition": rep,
        "gopher_quality": [
            ("short_doc", _below("gq_words", p.min_doc_words), False),
            ("long_doc", _above("gq_words", p.max_doc_words), False),
            ("below_avg_word_length", _below("gq_mean_word_length", p.min_avg_word_length), False),
            ("above_avg_word_length", _above("gq_mean_word_length", p.max_avg_word_length), False),
            ("too_many_hashes", _above("gq_hash_ratio", p.max_symbol_word_ratio), False),
            ("too_many_ellipsis", _above("gq_ellipsis_ratio", p.max_symbol_word_ratio), False),
            ("too_many_bullets", _above("gq_bullet_lines", p.max_bullet_lines_ratio), False),
            ("too_many_end_ellipsis", _above("gq_end_ellipsis_lines", p.max_ellipsis_lines_ratio), False),
            ("below_alpha_threshold", _below("gq_alpha_words", p.min_alpha_words_ratio), False),
            ("too_few_stop_words", _below("gq_stop_words", p.min_stop_words), False)],
        "c4": [
            ("lorem_ipsum", pl.col("c4_lorem_line").is_not_null() if p.c4_lorem_ipsum else None,
             False),
            ("curly_bracket", pl.col("c4_curly_line").is_not_null() if p.c4_curly_bracket else None,
             False),
            ("too_few_sentences", _below("c4_sentences", p.c4_min_sentences), False)],
        "fineweb": [
            ("empty", pl.col("fw_lines") == 0, False),
            ("line_punct_ratio", (punct, ("fw_line_punct_ratio", "<", p.line_punct_thr)), False),
            ("short_line_ratio", _above("fw_short_line_ratio", p.short_line_thr), False),
            ("char_dup_ratio", _above("fw_char_dup_ratio", p.char_duplicates_ratio), False),
            ("list_ratio", _above("fw_newline_ratio", p.new_line_ratio), False)],
    }


class QualityRulesMethod(Method):
    name = "quality-rules"
    summary = "web-text quality rules (Gopher quality + repetition, C4, FineWeb) with published defaults"
    cost = "one pass of word splitting and counting, O(characters); no model"
    Params = QualityRulesParams

    def needs(self, p: QualityRulesParams, req: Request):
        return {"values": stage_for(effective(p))}

    def score(self, p: QualityRulesParams, inputs: Inputs) -> pl.DataFrame:
        p = effective(p)
        values = inputs["values"].frame()
        kind = inputs.candidates.select("id", "kind")
        frame = values.join(kind, on="id", how="left", maintain_order="left")
        chat = pl.col("kind") == "chat"
        chat_ok = pl.col("gq_words") >= p.chat_min_words
        rules = []
        for group in p.filters:
            for name, fails, on_chat, spec in rules_for(p)[group]:
                if fails is None:
                    continue
                if p.chat_rules == "repetition" and not on_chat:
                    fails = fails & ~chat
                rules.append(Rule(f"{group}:{name}", fails & (~chat | chat_ok), *(spec or ())))
        scores, counts = apply_rules(frame, rules)
        counts["chat_rows_not_judged"] = int(frame.filter(chat & (pl.col("gq_words").is_null()
                                                                  | ~chat_ok)).height)
        inputs.note("rules", counts)
        inputs.note("report_lines", [f"quality rules: kept {counts['kept']} of {counts['rows']} rows"]
                    + [f"  {k}: first {v['first']}, any {v['any']}, only {v['only']}"
                       for k, v in counts["rules"].items() if v["any"]])
        return scores.drop("kind")

    def selector(self, p, inputs: Inputs, scored: pl.DataFrame) -> KeepFlag:
        return KeepFlag(kept="passes every quality rule")

