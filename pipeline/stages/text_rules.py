"""The values behind the web-text quality rules (Gopher quality and repetition, C4, FineWeb).

Each function returns, for one text and its word tokens (`pipeline/stages/words.py`), the
quantity a rule compares with its threshold, computed as DataTrove computes it (`datatrove/
pipeline/filters/{gopher_quality_filter,gopher_repetition_filter,c4_filters,
fineweb_quality_filter}.py`), so that `value > threshold` reproduces its keep/drop decision;
the thresholds themselves live in the method (`scoring/quality_rules.py`). A value that does not
exist (a mean over no words, a ratio over no lines) is None: its rule then passes (DataTrove
compares a NaN, which passes, or divides by zero after an earlier rule already dropped the text).

Quirks kept on purpose, because they decide keep/drop:
- Words are spaCy tokens: punctuation tokens count as words (in the alpha-word ratio, the
  n-grams, FineWeb's newline ratio), and Gopher's word count and mean length count only
  "non-symbol" words (a token with a character outside `PUNCTUATION_SET`).
- The alpha rule keeps a text when at least 80% of its words hold a letter (`str.isalpha`, so CJK
  characters count as letters); DataTrove names the threshold `max_non_alpha_words_ratio`.
- The top n-gram value counts the most common n-gram even when it occurs once (short texts then
  fail), ties going to the n-gram seen first; duplicated n-grams are scanned left to right with
  the tokens joined WITHOUT spaces, jumping n tokens after each repeat.
- C4 checks a line in DataTrove's order (long word, citations removed, terminal punctuation, fewer
  than 3 words, lorem ipsum, javascript, curly bracket, policy), so the curly-bracket and lorem
  ipsum rules see only lines that survived the earlier line rules; sentences are counted on the
  kept lines with spaCy's sentencizer.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from itertools import accumulate

from thresher.pipeline.stages.ngrams import NGrams
from thresher.pipeline.stages.words import Words

# DataTrove's PUNCTUATION: ASCII punctuation, a fixed list of typographic and CJK marks (the
# full-width digit one among them), and the control characters except tab and newline.
PUNCTUATION = (string.punctuation + "«´»–—’“”„…∶━►、。〈〉《》「」【】！％（），．１：；？～"
               + "".join(map(chr, [*range(9), *range(11, 32), *range(127, 160)])))
# DataTrove's TERMINAL_PUNCTUATION: Unicode's Sentence_Terminal characters (as of Unicode 14)
# and three Khmer signs, 159 characters.
TERMINAL_PUNCTUATION = frozenset("\u0021\u002e\u003f\u0589\u061d\u061e\u061f\u06d4\u0700\u0701\u0702\u07f9\u0837\u0839\u083d\u083e\u0964\u0965\u104a\u104b\u1362\u1367\u1368\u166e\u1735\u1736\u17d4\u17d5\u17d6\u17d9\u17da\u1803\u1809\u1944\u1945\u1aa8\u1aa9\u1aaa\u1aab\u1b5a\u1b5b\u1b5e\u1b5f\u1b7d\u1b7e\u1c3b\u1c3c\u1c7e\u1c7f\u203c\u203d\u2047\u2048\u2049\u2e2e\u2e3c\u2e53\u2e54\u3002\ua4ff\ua60e\ua60f\ua6f3\ua6f7\ua876\ua877\ua8ce\ua8cf\ua92f\ua9c8\ua9c9\uaa5d\uaa5e\uaa5f\uaaf0\uaaf1\uabeb\ufe52\ufe56\ufe57\uff01\uff0e\uff1f\uff61\U00010a56\U00010a57\U00010f55\U00010f56\U00010f57\U00010f58\U00010f59\U00010f86\U00010f87\U00010f88\U00010f89\U00011047\U00011048\U000110be\U000110bf\U000110c0\U000110c1\U00011141\U00011142\U00011143\U000111c5\U000111c6\U000111cd\U000111de\U000111df\U00011238\U00011239\U0001123b\U0001123c\U000112a9\U0001144b\U0001144c\U000115c2\U000115c3\U000115c9\U000115ca\U000115cb\U000115cc\U000115cd\U000115ce\U000115cf\U000115d0\U000115d1\U000115d2\U000115d3\U000115d4\U000115d5\U000115d6\U000115d7\U00011641\U00011642\U0001173c\U0001173d\U0001173e\U00011944\U00011946\U00011a42\U00011a43\U00011a9b\U00011a9c\U00011c41\U00011c42\U00011ef7\U00011ef8\U00011f43\U00011f44\U00016a6e\U00016a6f\U00016af5\U00016b37\U00016b38\U00016b44\U00016e98\U0001bc9f\U0001da88")
PUNCTUATION_SET = frozenset(PUNCTUATION) | TERMINAL_PUNCTUATION
TERMINAL_TUPLE = tuple(sorted(TERMINAL_PUNCTUATION))
STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
TOP_NGRAMS = (2, 3, 4)
DUP_NGRAMS = (5, 6, 7, 8, 9, 10)
_PARAGRAPH = re.compile(r"\n{2,}")
_LINES = re.compile(r"\n+")
CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
C4_END = (".", "?", "!", '"', "'")
POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies",
          "use cookies")


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def gopher_quality(text: str, words: list[str], stop_words: frozenset[str]) -> dict:
    n = len(words)
    counts = Counter(words)
    lengths = [(len(w), k) for w, k in counts.items() if not PUNCTUATION_SET.issuperset(w)]
    n_words = sum(k for _, k in lengths)
    alpha = sum(k for w, k in counts.items() if any(c.isalpha() for c in w))
    lines = text.splitlines()
    return {
        "gq_words": n_words,
        "gq_mean_word_length": sum(x * k for x, k in lengths) / n_words if n_words else None,
        "gq_hash_ratio": _ratio(text.count("#"), n),
        "gq_ellipsis_ratio": _ratio(text.count("...") + text.count("…"), n),
        "gq_bullet_lines": _ratio(sum(s.lstrip().startswith(("•", "-")) for s in lines), len(lines)),
        "gq_end_ellipsis_lines": _ratio(sum(s.rstrip().endswith(("...", "…")) for s in lines),
                                        len(lines)),
        "gq_alpha_words": _ratio(alpha, n),
        "gq_stop_words": len(stop_words.intersection(counts)),
    }


def duplicates(items: list[str]) -> tuple[int, int]:
    """(repeated items, their characters): every occurrence after the first counts."""
    seen: set[str] = set()
    n = chars = 0
    for x in items:
        if x in seen:
            n += 1
            chars += len(x)
        else:
            seen.add(x)
    return n, chars


def top_ngram_chars(words: list[str], n: int, joined: str, starts: list[int]) -> int | None:
    """len(most common space-joined n-gram) x its count (first seen wins a tie); None if no
    n-gram. `joined` is " ".join(words); `starts` the offsets of the words in it. (The plain
    version of `NGrams.top_chars`, which the stage uses: tests hold one to the other.)"""
    if len(words) < n:
        return None
    grams = [joined[starts[i]:starts[i + n] - 1] for i in range(len(words) - n + 1)]
    if len(set(grams)) == len(grams):         # no repeat: the first n-gram, once
        return len(grams[0])
    gram, count = Counter(grams).most_common(1)[0]
    return len(gram) * count


def duplicated_ngram_chars(n: int, joined: str, ends: list[int]) -> int:
    """Characters of repeated n-grams (words joined WITHOUT spaces: `joined`, word i ending at
    ends[i + 1]), scanned left to right, jumping n words past each repeat (Gopher's duplicated
    n-gram fraction, as DataTrove; the plain version of `NGrams.duplicated_chars`)."""
    last = len(ends) - 1 - n
    if last < 0:
        return 0
    grams = [joined[ends[i]:ends[i + n]] for i in range(last + 1)]
    if len(set(grams)) == len(grams):
        return 0                              # no n-gram repeats: nothing to scan
    seen: set[str] = set()
    chars, i = 0, 0
    while i <= last:
        gram = grams[i]
        if gram in seen:
            chars += len(gram)
            i += n
        else:
            seen.add(gram)
            i += 1
    return chars


def _offsets(words: list[str], sep: int) -> list[int]:
    """Where each word starts in the words joined by `sep` characters, then the end + sep."""
    lengths = map(len, words)
    return list(accumulate(map((sep).__add__, lengths) if sep else lengths, initial=0))


def gopher_repetition(text: str, words: list[str]) -> dict:
    size = len(text)
    paragraphs = _PARAGRAPH.split(text.strip())
    p_dup, p_chars = duplicates(paragraphs)
    lines = _LINES.split(text)
    l_dup, l_chars = duplicates(lines)
    out = {"gr_dup_para_frac": p_dup / len(paragraphs), "gr_dup_para_char_frac": _ratio(p_chars, size),
           "gr_dup_line_frac": l_dup / len(lines), "gr_dup_line_char_frac": _ratio(l_chars, size)}
    grams = NGrams(words)
    for n in TOP_NGRAMS:
        top = grams.top_chars(n)
        out[f"gr_top_{n}gram"] = None if top is None else _ratio(top, size)
    for n in DUP_NGRAMS:
        out[f"gr_dup_{n}gram"] = _ratio(grams.duplicated_chars(n), size)
    return out


def c4(text: str, w: Words, no_terminal_punct: bool = False, min_words_per_line: int = 3,
       max_word_length: int = 1000, citations: bool = True, javascript: bool = True,
       policy: bool = True) -> dict:
    """C4's line pass: which lines it removes, where lorem ipsum and '{' are first seen, and the
    sentences of the kept lines. Line indices count `str.splitlines()` lines from 0."""
    removed: list[int] = []
    lorem = curly = None
    sentences = 0
    for i, line in enumerate(text.splitlines()):
        line = line.strip()
        chunks = line.split()
        if max_word_length != -1 and any(len(c) > max_word_length for c in chunks):
            removed.append(i)
            continue
        if citations:
            line = CITATION.sub("", line)
        if no_terminal_punct and (not line.endswith(C4_END) or line.endswith("...")):
            removed.append(i)
            continue
        if len(chunks) < min_words_per_line:
            removed.append(i)
            continue
        low = line.lower()
        if lorem is None and "lorem ipsum" in low:
            lorem = i
        if javascript and "javascript" in low:
            removed.append(i)
            continue
        if curly is None and "{" in line:
            curly = i
        if policy and any(p in low for p in POLICY):
            removed.append(i)
            continue
        sentences += w.sentences(line)
    return {"c4_lorem_line": lorem, "c4_curly_line": curly, "c4_sentences": sentences,
            "c4_lines_removed": len(removed), "c4_removed_lines": removed}


def fineweb(text: str, words: list[str], short_line_length: int = 30) -> dict:
    lines = [line for line in text.split("\n") if line.strip() != ""]
    if not lines:
        return {"fw_lines": 0, "fw_line_punct_ratio": None, "fw_short_line_ratio": None,
                "fw_char_dup_ratio": None, "fw_newline_ratio": None}
    return {
        "fw_lines": len(lines),
        "fw_line_punct_ratio": sum(line.endswith(TERMINAL_TUPLE) for line in lines) / len(lines),
        "fw_short_line_ratio": sum(len(line) <= short_line_length for line in lines) / len(lines),
        "fw_char_dup_ratio": _ratio(duplicates(lines)[1], len(text.replace("\n", ""))),
        "fw_newline_ratio": _ratio(text.count("\n"), len(words)),
    }
