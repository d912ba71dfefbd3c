"""DataTrove's `simplify_text` as one compiled pass over UTF-8 bytes (see `textnorm.normalise`).

`simplify_text` with TextNormConfig defaults runs, on a Python str: lower(); each match of
`\\p{Nd}+([.,،٫⎖⎗⎘]\\p{Nd}+)?` -> "0"; PUNCTUATION -> " "; `\\s+` -> " " and strip; NFD with
the combining marks (Mn) dropped; strip. The same steps here, per code point, from tables built
with Python's own `unicodedata` and `str` methods (`textnorm.tables`), so the result is the same
string. Whitespace and punctuation runs become one pending space, written before the next
character that is not one (never at the start of a document's output: the leading strip);
trailing spaces are cut. A character whose NFD output is empty (a lone combining mark) still
ends a run, as in DataTrove, where the marks go after the whitespace is collapsed.

Documents whose output is more than `cjk_share` Han/Hiragana/Katakana are redone with a space
after each such character (character tokens; see textnorm).
"""

from __future__ import annotations

import numpy as np
from numba import njit

SIGMA, SMALL_SIGMA, FINAL_SIGMA = 0x3A3, 0x3C3, 0x3C2
SEPARATORS = (0x2E, 0x2C, 0x60C, 0x66B, 0x2396, 0x2397, 0x2398)   # . , ، ٫ ⎖ ⎗ ⎘
ORDINARY, SPACE, DIGIT = 0, 1, 2
GROWTH = 4     # output bytes per input byte at most: NFD of a 3-byte Hangul syllable is three
               # 3-byte jamo; a CJK character (3 bytes) gains one space (textnorm checks it)


@njit(inline="always")
def _decode(buf, i):
    b0 = buf[i]
    if b0 < 0x80:
        return np.int64(b0), 1
    if b0 < 0xE0:
        return (np.int64(b0 & 0x1F) << 6) | (buf[i + 1] & 0x3F), 2
    if b0 < 0xF0:
        return (np.int64(b0 & 0x0F) << 12) | (np.int64(buf[i + 1] & 0x3F) << 6) | \
            (buf[i + 2] & 0x3F), 3
    return (np.int64(b0 & 0x07) << 18) | (np.int64(buf[i + 1] & 0x3F) << 12) | \
        (np.int64(buf[i + 2] & 0x3F) << 6) | (buf[i + 3] & 0x3F), 4


@njit(inline="always")
def _encode(out, m, cp):
    if cp < 0x80:
        out[m] = cp
        return m + 1
    if cp < 0x800:
        out[m] = 0xC0 | (cp >> 6)
        out[m + 1] = 0x80 | (cp & 0x3F)
        return m + 2
    if cp < 0x10000:
        out[m] = 0xE0 | (cp >> 12)
        out[m + 1] = 0x80 | ((cp >> 6) & 0x3F)
        out[m + 2] = 0x80 | (cp & 0x3F)
        return m + 3
    out[m] = 0xF0 | (cp >> 18)
    out[m + 1] = 0x80 | ((cp >> 12) & 0x3F)
    out[m + 2] = 0x80 | ((cp >> 6) & 0x3F)
    out[m + 3] = 0x80 | (cp & 0x3F)
    return m + 4


@njit(cache=True, nogil=True)
def _sigma(buf, i, e, cased, prev_cased):
    """lower() of the Σ at buf[i]: ς at the end of a word (Python's final sigma), else σ."""
    if not prev_cased:
        return SMALL_SIGMA
    j = i + 2                       # Σ is two bytes in UTF-8
    if j >= e or not cased[_decode(buf, j)[0]]:
        return FINAL_SIGMA
    return SMALL_SIGMA


@njit(cache=True, nogil=True)
def _doc(buf, s, e, low, cls, cased, cjk, out_off, out_len, out_data, out, m, spaced):
    """Normalise buf[s:e] into out from m (room for GROWTH * (e - s) bytes: the caller's job);
    returns (new m, characters, CJK characters)."""
    start = m
    pending = False
    n_chars = n_cjk = 0
    prev_cased = False
    i = s
    while i < e:
        cp, nb = _decode(buf, i)
        c = low[cp] if cp != SIGMA else _sigma(buf, i, e, cased, prev_cased)
        prev_cased = cased[cp]
        kind = cls[c]
        i += nb
        if kind == SPACE:
            pending = True
            continue
        if kind == DIGIT:           # \p{Nd}+ ( one separator \p{Nd}+ )?  ->  "0"
            while i < e and cls[low[_decode(buf, i)[0]]] == DIGIT:
                i += _decode(buf, i)[1]
            if i < e:
                sep, nb2 = _decode(buf, i)
                is_sep = False
                for x in SEPARATORS:
                    if sep == x:
                        is_sep = True
                if is_sep and i + nb2 < e and cls[low[_decode(buf, i + nb2)[0]]] == DIGIT:
                    i += nb2
                    while i < e and cls[low[_decode(buf, i)[0]]] == DIGIT:
                        i += _decode(buf, i)[1]
            c = 0x30
            prev_cased = False
        if pending and m > start:
            out[m] = 32
            m += 1
        pending = False
        length = out_len[c]
        if length == 255:           # the character itself
            m = _encode(out, m, c)
            n_chars += 1
        else:
            for q in range(out_off[c], out_off[c] + length):
                m = _encode(out, m, out_data[q])
                n_chars += 1
        if cjk[c]:
            n_cjk += 1
            pending = spaced
    while m > start and out[m - 1] == 32:
        m -= 1
    return m, n_chars, n_cjk


@njit(cache=True, nogil=True)
def normalise_buffer(buf, offsets, low, cls, cased, cjk, out_off, out_len, out_data, cjk_share):
    """Every document normalised: (UTF-8 bytes, int64 offsets). cjk_share < 0: no CJK spacing."""
    n = len(offsets) - 1
    size = offsets[-1] - offsets[0] if n > 0 else 0
    out = np.empty(size + size // 4 + 64, np.uint8)
    new_off = np.zeros(n + 1, np.int64)
    m = 0
    for d in range(n):
        start = m
        need = m + GROWTH * (offsets[d + 1] - offsets[d]) + 8
        if need > len(out):
            bigger = np.empty(max(need, 2 * len(out)), np.uint8)
            bigger[:m] = out[:m]
            out = bigger
        m, n_chars, n_cjk = _doc(buf, offsets[d], offsets[d + 1], low, cls, cased, cjk,
                                      out_off, out_len, out_data, out, m, False)
        if cjk_share >= 0 and n_cjk > cjk_share * n_chars:
            m, n_chars, n_cjk = _doc(buf, offsets[d], offsets[d + 1], low, cls, cased, cjk,
                                          out_off, out_len, out_data, out, start, True)
        new_off[d + 1] = m
    return out[:m], new_off
