"""The `QualityValues` stage: every web-text quality rule's value, per row, cached per shard.

    QualityValues(language="en", chat="skip")     # columns gq_*, gr_*, c4_*, fw_* (text_rules.py)

The stage computes values, never decisions: `scoring/quality_rules.py` compares them with its
thresholds, so changing a threshold recomputes nothing. What changes a value is in this config:
the word splitter's language, the stop-word list, FineWeb's short-line length, and C4's line
rules (which lines C4 keeps decides what its lorem-ipsum, curly-bracket and sentence values see).

Chat rows: `chat="skip"` (the default) leaves every value null for them (web rules measured on
instruction data remove most code, math and tool-call rows: docs/pretraining.md);
`"assistant"` measures the assistant turns joined by blank lines; `"conversation"` every turn.
`n_words` (all tokens) and `text_chars` say what was measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import pyarrow as pa
from thresher.pipeline.stage import Resources
from thresher.pipeline.stages import text_rules as tr
from thresher.pipeline.stages.annotate import AnnotationStage
from thresher.pipeline.stages.words import Words

F = pa.float64()
I = pa.int64()


def _schema() -> pa.Schema:
    fields = [("n_words", I), ("text_chars", I),
              ("gq_words", I), ("gq_mean_word_length", F), ("gq_hash_ratio", F),
              ("gq_ellipsis_ratio", F), ("gq_bullet_lines", F), ("gq_end_ellipsis_lines", F),
              ("gq_alpha_words", F), ("gq_stop_words", I),
              ("gr_dup_para_frac", F), ("gr_dup_para_char_frac", F), ("gr_dup_line_frac", F),
              ("gr_dup_line_char_frac", F)]
    fields += [(f"gr_top_{n}gram", F) for n in tr.TOP_NGRAMS]
    fields += [(f"gr_dup_{n}gram", F) for n in tr.DUP_NGRAMS]
    fields += [("c4_lorem_line", I), ("c4_curly_line", I), ("c4_sentences", I),
               ("c4_lines_removed", I), ("c4_removed_lines", pa.list_(pa.int32())),
               ("fw_lines", I), ("fw_line_punct_ratio", F), ("fw_short_line_ratio", F),
               ("fw_char_dup_ratio", F), ("fw_newline_ratio", F)]
    return pa.schema(fields)


SCHEMA = _schema()


def measured_text(row: dict, chat: str) -> str | None:
    """The text the rules measure: a text row's text; a chat row's per `chat`, or None."""
    if row["kind"] == "text" or row.get("messages") is None:
        return row["text"]
    if chat == "assistant":
        return "\n\n".join(m["content"] for m in row["messages"] if m["role"] == "assistant")
    if chat == "conversation":
        return "\n\n".join(m["content"] for m in row["messages"])
    return None


@dataclass(frozen=True)
class QualityValues(AnnotationStage):
    kind: ClassVar[str] = "quality-values"
    requires: ClassVar[tuple] = (("spacy", "spacy>=3.8,<4"),)
    language: str = "en"                      # spaCy language of the word splitter
    chat: Literal["skip", "assistant", "conversation"] = "skip"
    stop_words: tuple[str, ...] = tr.STOP_WORDS
    short_line_length: int = 30               # FineWeb's short line, in characters
    c4_no_terminal_punct: bool = False        # FineWeb's setting (C4's own: True)
    c4_min_words_per_line: int = 3
    c4_max_word_length: int = 1000
    c4_citations: bool = True
    c4_javascript: bool = True
    c4_policy: bool = True
    batch: int = field(default=1000, metadata={"key": False})   # rows per spaCy call

    def resources(self) -> Resources:
        return Resources(cpus=1, memory_gb=1)

    def schema(self) -> pa.Schema:
        return SCHEMA

    def open_worker(self, device: str) -> Words:
        return Words(self.language)

    def values(self, w: Words, text: str | None) -> dict:
        if text is None:
            return {}
        words = w.words(text)
        out = {"n_words": len(words), "text_chars": len(text)}
        out.update(tr.gopher_quality(text, words, frozenset(self.stop_words)))
        out.update(tr.gopher_repetition(text, words))
        out.update(tr.c4(text, w, self.c4_no_terminal_punct, self.c4_min_words_per_line,
                         self.c4_max_word_length, self.c4_citations, self.c4_javascript,
                         self.c4_policy))
        out.update(tr.fineweb(text, words, self.short_line_length))
        return out

    def annotate(self, worker: Words, rows: list[dict]) -> dict:
        cols: dict[str, list] = {name: [] for name in SCHEMA.names}
        for start in range(0, len(rows), self.batch):
            texts = [measured_text(r, self.chat) for r in rows[start:start + self.batch]]
            worker.prepare([t for t in texts if t is not None])
            for text in texts:
                vals = self.values(worker, text)
                for name, col in cols.items():
                    col.append(vals.get(name))
        return cols
