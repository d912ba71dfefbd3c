"""DataTrove's side of bench/pretrain_filters.py: run INSIDE the bench-only DataTrove venv.

    bench/.venv-datatrove/bin/python bench/datatrove_side.py DOCS.jsonl OUT.json [--lid MODEL.ftz]

Reads {"id", "text"} lines; writes, per document, each filter's decision (True or its reason)
with every other rule of that filter on (`filters`), and each rule alone (`isolated`: the
filter built with every other rule switched off), plus the seconds of one pass of the four
filters (and of the language filter, given the fastText model file) over all documents.
Never imported by thresher.
"""

from __future__ import annotations

import json
import sys
import time

from datatrove.data import Document
from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
    LanguageFilter,
)

NO_TERMINAL = "--terminal-punct" not in sys.argv
GQ_OFF = {"min_doc_words": None, "max_doc_words": None, "min_avg_word_length": None,
              "max_avg_word_length": None, "max_symbol_word_ratio": None, "max_bullet_lines_ratio": None,
              "max_ellipsis_lines_ratio": None, "max_non_alpha_words_ratio": None, "min_stop_words": None}
GQ_ON = {"min_doc_words": 50, "max_doc_words": 100000, "min_avg_word_length": 3,
             "max_avg_word_length": 10, "max_symbol_word_ratio": 0.1, "max_bullet_lines_ratio": 0.9,
             "max_ellipsis_lines_ratio": 0.3, "max_non_alpha_words_ratio": 0.8, "min_stop_words": 2}
GR_OFF = {"dup_line_frac": None, "dup_para_frac": None, "dup_line_char_frac": None,
              "dup_para_char_frac": None, "top_n_grams": (), "dup_n_grams": ()}
GR_ON = {"dup_line_frac": 0.3, "dup_para_frac": 0.3, "dup_line_char_frac": 0.2, "dup_para_char_frac": 0.2}
TOP = ((2, 0.2), (3, 0.18), (4, 0.16))
DUP = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))
FW_OFF = {"line_punct_thr": -1.0, "short_line_thr": 2.0, "char_duplicates_ratio": 2.0, "new_line_ratio": 1e9}
FW_ON = {"line_punct_thr": 0.12, "short_line_thr": 0.67, "char_duplicates_ratio": 0.01, "new_line_ratio": 0.3}
C4_ON = {"filter_lorem_ipsum": True, "filter_curly_bracket": True, "min_num_sentences": 5}
C4_OFF = {"filter_lorem_ipsum": False, "filter_curly_bracket": False, "min_num_sentences": -1}


def c4(**kw):
    return C4QualityFilter(filter_no_terminal_punct=not NO_TERMINAL, **kw)


def isolated() -> dict:
    """rule name (thresher's) -> a filter that applies that rule alone."""
    out = {}
    for k, v in GQ_ON.items():
        names = {"min_doc_words": ["short_doc"], "max_doc_words": ["long_doc"],
                 "min_avg_word_length": ["below_avg_word_length"],
                 "max_avg_word_length": ["above_avg_word_length"],
                 "max_symbol_word_ratio": ["too_many_hashes+too_many_ellipsis"],
                 "max_bullet_lines_ratio": ["too_many_bullets"],
                 "max_ellipsis_lines_ratio": ["too_many_end_ellipsis"],
                 "max_non_alpha_words_ratio": ["below_alpha_threshold"],
                 "min_stop_words": ["too_few_stop_words"]}[k]
        out["gopher_quality:" + names[0]] = GopherQualityFilter(**{**GQ_OFF, k: v})
    for k, v in GR_ON.items():
        out["gopher_repetition:" + k] = GopherRepetitionFilter(**{**GR_OFF, k: v})
    for n, f in TOP:
        out[f"gopher_repetition:top_{n}_gram"] = GopherRepetitionFilter(**{**GR_OFF, "top_n_grams": ((n, f),)})
    for n, f in DUP:
        out[f"gopher_repetition:duplicated_{n}_n_grams"] = GopherRepetitionFilter(
            **{**GR_OFF, "dup_n_grams": ((n, f),)})
    for k, name in (("filter_lorem_ipsum", "lorem_ipsum"), ("filter_curly_bracket", "curly_bracket"),
                    ("min_num_sentences", "too_few_sentences")):
        out["c4:" + name] = c4(**{**C4_OFF, k: C4_ON[k]})
    for k, name in (("line_punct_thr", "line_punct_ratio"), ("short_line_thr", "short_line_ratio"),
                    ("char_duplicates_ratio", "char_dup_ratio"), ("new_line_ratio", "list_ratio")):
        out["fineweb:" + name] = FineWebQualityFilter(**{**FW_OFF, k: FW_ON[k]})
    return out


def decide(f, text: str):
    r = f.filter(Document(text=text, id="x"))
    return True if r is True else (r[1] if isinstance(r, tuple) else bool(r))


class _NumpyScores:
    """fasttext-predict returns floats where the fasttext wheel DataTrove expects returns numpy."""

    def __init__(self, model):
        self.model = model

    def predict(self, text, k=1):
        import numpy as np

        labels, scores = self.model.predict(text, k=k)
        return labels, np.asarray(scores)


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    full = {"gopher_repetition": GopherRepetitionFilter(), "gopher_quality": GopherQualityFilter(),
            "c4": c4(), "fineweb": FineWebQualityFilter()}
    for d in docs[:20]:                     # imports and spaCy's load, untimed (as thresher's)
        for f in full.values():
            decide(f, d["text"])
    t0 = time.perf_counter()
    filters = [{name: decide(f, d["text"]) for name, f in full.items()} for d in docs]
    seconds = time.perf_counter() - t0
    alone = isolated()
    iso = [{name: decide(f, d["text"]) is not True for name, f in alone.items()} for d in docs]
    out = {"seconds": seconds, "docs": len(docs), "filters": filters, "isolated": iso}
    if "--lid" in sys.argv:
        from fasttext.FastText import _FastText

        # fasttext-predict provides the `fasttext` module DataTrove loads the model with, under
        # another distribution name than the one it checks for: skip that check only
        LanguageFilter._requires_dependencies = []
        lf = LanguageFilter(languages=["en"])
        lf.model._model = _NumpyScores(_FastText(sys.argv[sys.argv.index("--lid") + 1]))
        for d in docs[:20]:
            lf.filter(Document(text=d["text"], id="x"))
        t0 = time.perf_counter()
        out["lid"] = [[bool(lf.filter(doc := Document(text=d["text"], id="x"))),
                       doc.metadata["language"], doc.metadata["language_score"]] for d in docs]
        out["lid_seconds"] = time.perf_counter() - t0
    with open(sys.argv[2], "w", encoding="utf-8") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
