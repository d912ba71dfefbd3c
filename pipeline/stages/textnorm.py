"""The text that fuzzy dedup and decontamination compare: a row's key, normalised as DataTrove does.

    texts = row_keys(rows)                  # text rows: `text`; chat rows: "user: ...\\n\\n..."
    buf, offsets = normalise_buffer(*text_buffer(pl.Series(texts)))   # for the n-gram kernels
    normalise(["Hello, World 3.14!"])       # ["hello world 0"]: the same, as Python strings

`normalise` is DataTrove's `simplify_text` with its default `TextNormConfig`, in the same order:
lowercase; each run of digits in any script, with an optional one-character decimal part,
becomes `0`; the characters of DataTrove's PUNCTUATION set (ASCII and CJK punctuation, control
characters) become spaces; whitespace runs collapse to one space and the ends are stripped; NFD,
combining marks (Mn) dropped; stripped again. It runs as one compiled pass over UTF-8 bytes
(`norm_kernel.py`) with per-code-point tables built from Python's own `unicodedata` and `str`
methods, so it agrees with DataTrove's Python code character for character (tests check it
against a plain-Python restatement; bench/minhash_parity.py against DataTrove itself).

Documents in which more than `CJK_SHARE` of the characters are Han, Hiragana or Katakana are
tokenised per character (a space after each such character) when `cjk_chars` is on: these
scripts put no spaces between words, so a "word" 5-gram would span whole sentences. This is a
deviation from DataTrove (whose English spaCy tokenizer keeps such a run as one token) and
changes nothing for other documents.

Tokens are DataTrove's: its MinHash splits the normalised text with spaCy's `blank("en")`
tokenizer. After normalisation those tokens are the space-separated words except (1) the English
contractions written without an apostrophe (`SPLITS`: `cannot` -> `can`, `not`), which the
kernels split from this table, and (2) words holding something other than letters and digits
(a currency sign, a unit after a number, a symbol, a quote the PUNCTUATION set leaves in), which
`spacy_split` hands to spaCy itself, word by word (a few words in a hundred; cached).
bench/minhash_datatrove.py measures the agreement with DataTrove's signatures.
"""

from __future__ import annotations

import sys
import unicodedata
from functools import lru_cache

import numpy as np
import polars as pl
import pyarrow as pa

# The characters DataTrove's simplify_text turns into spaces (its PUNCTUATION string plus the
# control characters 0-8, 11-12, 13-31, 127-159); tab and newline are whitespace anyway.
PUNCTUATION = ("!/—”:％１〈&(、━\\【#%「」，】；+^]~“《„';’{|∶´[=-`*．（–？！：$～«〉,><》)?）。…@_.\"}►»"
               + "".join(chr(x) for lo, hi in ((0, 9), (11, 13), (13, 32), (127, 160))
                         for x in range(lo, hi)))
CJK_SHARE = 0.3

_SPLIT_TEXT = """\
ai|nt are|nt can|not ca|nt ca|nt|ve could|nt could|nt|ve could|ve dare|nt did|nt did|nt|ve
does|nt does|nt|ve do|nt do|nt|ve gon|na got|ta had|nt had|nt|ve has|nt have|nt he|d he|d|ve
he|ll|ve he|s how|d how|d|ve how|ll how|ll|ve how|re how|s how|ve is|nt it|d it|d|ve it|ll
it|ll|ve i|d i|d|ve i|ll|ve i|m i|m|a i|ve may|nt may|nt|ve might|nt might|nt|ve might|ve
must|nt must|nt|ve must|ve need|nt need|nt|ve not|ve ought|nt ought|nt|ve sha|nt sha|nt|ve
she|d|ve she|ll|ve she|s should|nt should|nt|ve should|ve that|d that|d|ve that|ll that|ll|ve
that|s there|d there|d|ve there|ll there|ll|ve there|re there|s there|ve these|d these|d|ve
these|ll these|ll|ve these|re these|ve they|d they|d|ve they|ll they|ll|ve they|re they|ve
this|d this|d|ve this|ll this|ll|ve this|s those|d those|d|ve those|ll those|ll|ve those|re
those|ve was|nt were|nt we|d we|d|ve we|ll|ve we|ve what|d what|d|ve what|ll what|ll|ve what|re
what|s what|ve when|d when|d|ve when|ll when|ll|ve when|re when|s when|ve where|d where|d|ve
where|ll where|ll|ve where|re where|s where|ve who|d who|d|ve who|ll who|ll|ve who|s who|ve
why|d why|d|ve why|ll why|ll|ve why|re why|s why|ve would|nt would|nt|ve would|ve wo|nt wo|nt|ve
you|d you|d|ve you|ll you|ll|ve you|re you|ve y|all"""
SPLITS = _SPLIT_TEXT.split()


def row_key(row: dict) -> str:
    """What dedup compares: a text row's text; a chat row's user and assistant turns, each
    tagged with its role, joined by blank lines (no system prompt, tool schemas or tool turns)."""
    if row.get("kind") == "text" or row.get("messages") is None:
        return row.get("text") or ""
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in row["messages"]
                       if m["role"] in ("user", "assistant"))


def row_keys(rows: list[dict]) -> list[str]:
    return [row_key(r) for r in rows]


CJK_RANGES = ((0x2E80, 0x2FDF), (0x3040, 0x30FF), (0x31F0, 0x31FF), (0x3400, 0x4DBF),
              (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0xFF66, 0xFF9F), (0x20000, 0x3134F))


@lru_cache(maxsize=1)
def tables() -> tuple[np.ndarray, ...]:
    """Per code point, from Python's unicodedata and str methods (about 0.6 s, once):
    low (lower()), cls (0 ordinary, 1 whitespace or PUNCTUATION, 2 Nd digit), cased, cjk, and
    the NFD form without Mn marks (out_len 255: the character itself; else out_data slice)."""
    from thresher.pipeline.stages.norm_kernel import DIGIT, GROWTH, SPACE

    n = sys.maxunicode + 1
    low = np.arange(n, dtype=np.int64)
    cls = np.zeros(n, np.uint8)
    cased = np.zeros(n, np.bool_)
    cjk = np.zeros(n, np.bool_)
    out_off = np.zeros(n, np.int64)
    out_len = np.full(n, 255, np.uint8)
    data: list[int] = []
    punct = set(PUNCTUATION)
    for cp in range(n):
        ch = chr(cp)
        lo = ch.lower()
        if lo != ch:
            low[cp] = ord(lo[0])        # only U+0130 lowers to two: "i" + a dropped mark
        cased[cp] = lo != ch or ch.upper() != ch
        if ch.isspace() or ch in punct:
            cls[cp] = SPACE
        elif unicodedata.category(ch) == "Nd":
            cls[cp] = DIGIT
        if 0xD800 <= cp <= 0xDFFF:
            continue
        nfd = [c for c in unicodedata.normalize("NFD", ch) if unicodedata.category(c) != "Mn"]
        if nfd != [ch]:
            out_off[cp], out_len[cp] = len(data), len(nfd)
            data.extend(ord(c) for c in nfd)
    for lo_cp, hi_cp in CJK_RANGES:
        cjk[lo_cp:hi_cp + 1] = True
    widest = max((len("".join(map(chr, data[o:o + k])).encode()) + 1) / len(chr(cp).encode())
                 for cp, (o, k) in enumerate(zip(out_off, out_len)) if k != 255)
    if widest > GROWTH:      # the kernel reserves GROWTH output bytes per input byte
        raise AssertionError(f"NFD widens a character {widest}x; norm_kernel.GROWTH is {GROWTH}")
    return low, cls, cased, cjk, out_off, out_len, np.array(data + [0], np.int64)


def normalise_buffer(buf: np.ndarray, offsets: np.ndarray, cjk_chars: bool = True
                     ) -> tuple[np.ndarray, np.ndarray]:
    """simplify_text over texts given as UTF-8 bytes + offsets; returns the same layout."""
    from thresher.pipeline.stages.norm_kernel import normalise_buffer as kernel

    return kernel(buf, offsets, *tables(), CJK_SHARE if cjk_chars else -1.0)


# A word that is not all letters or all digits: spaCy may split a prefix, suffix or infix off it
# (a currency sign, a unit after a number, a symbol, a quote DataTrove's set leaves in).
_SPECIAL = r"[^\p{L}\p{Nd} ]|\p{Nd}\p{L}|\p{L}\p{Nd}"


@lru_cache(maxsize=1)
def _spacy_tokenizer():
    import spacy

    return spacy.blank("en").tokenizer


@lru_cache(maxsize=200_000)
def _spacy_word(word: str) -> str:
    return " ".join(t.text for t in _spacy_tokenizer()(word))


def spacy_split(buf: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalised texts with spaces where spaCy's English tokenizer splits a word that is not
    all letters or all digits (`£0m` -> `£ 0m`... as spaCy does), so the space-separated tokens
    are DataTrove's spaCy tokens. spaCy sees only such words (a few in a hundred), each once
    (cached); plain words go to the kernels as they are. Not thread-safe (spaCy): call it
    before handing the buffer to threads."""
    n = len(offsets) - 1
    if n == 0:
        return buf, offsets
    base = offsets - offsets[0]
    arr = pa.LargeStringArray.from_buffers(n, pa.py_buffer(base.astype(np.int64)),
                                           pa.py_buffer(buf[offsets[0]:offsets[-1]]))
    texts = pl.Series(arr)
    flagged = texts.str.contains(_SPECIAL).arg_true()
    if len(flagged) == 0:
        return buf, offsets
    words = [" ".join(w if w.isalpha() or w.isdigit() else _spacy_word(w) for w in t.split(" "))
             for t in texts.gather(flagged).to_list()]
    return text_buffer(texts.scatter(flagged, pl.Series(words, dtype=pl.String)))


def normalise(texts: list[str] | pl.Series, cjk_chars: bool = True) -> list[str]:
    """DataTrove's simplify_text (TextNormConfig defaults) of each text, as Python strings."""
    series = texts if isinstance(texts, pl.Series) else pl.Series(texts, dtype=pl.String)
    buf, off = normalise_buffer(*text_buffer(series), cjk_chars)
    raw = buf.tobytes()
    return [raw[off[i]:off[i + 1]].decode("utf-8") for i in range(len(off) - 1)]


def text_buffer(texts: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """(UTF-8 bytes of every text, int64 offsets: text i is bytes[offsets[i]:offsets[i+1]])."""
    arr = texts.to_arrow()
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    arr = arr.cast(pa.large_string())
    _, off_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(off_buf, np.int64)[arr.offset:arr.offset + len(arr) + 1]
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    return data, offsets


@lru_cache(maxsize=1)
def split_table() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SPLITS for the kernels: a quick-reject bitmap over (length, first byte, last byte) of each
    word, the sorted xxh64 of each word, and its cut offsets [k, 2] (0 = no cut)."""
    from thresher.pipeline.stages.ngram_kernels import xxh64

    quick = np.zeros(1 << 17, np.uint8)
    rows = []
    for entry in SPLITS:
        parts = entry.split("|")
        word = "".join(parts).encode()
        key = (len(word) << 16) | (word[0] << 8) | word[-1]
        quick[key >> 3] |= 1 << (key & 7)
        cuts = np.cumsum([len(p) for p in parts[:-1]]).tolist() + [0, 0]
        rows.append((int(xxh64(np.frombuffer(word, np.uint8), 0, len(word))), cuts[:2]))
    rows.sort()
    hashes = np.array([h for h, _ in rows], np.uint64)
    cuts = np.array([c for _, c in rows], np.int64).reshape(-1, 2)
    return quick, hashes, cuts
