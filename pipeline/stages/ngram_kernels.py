"""Compiled (numba) kernels over normalised text: word n-gram hashes, MinHash signatures, band keys.

The texts arrive as one UTF-8 byte buffer plus Arrow-style offsets (`text_buffer`), already
normalised (`pipeline/stages/textnorm.py`): words separated by single spaces. Tokens are the
space-separated words, except that the English contractions spaCy's tokenizer splits (`cannot`
-> `can not`, `dont` -> `do nt`; `textnorm.SPLITS`) are split the same way, so shingles equal
DataTrove's (its MinHash tokenises with spaCy `blank("en")`). An n-gram is its tokens joined by
one space, hashed with xxh64 over the UTF-8 bytes (seed 0), as DataTrove's `xxhash64(" ".join(x))`.

Signatures follow DataTrove's `MinhashDedupSignature.get_signature` bit for bit: for each of H
permutations (a, b) (from `np.random.RandomState(seed)`, see `minhash.permutations`), the
minimum over shingles x of ((a*x + b) mod 2^64) mod (2^61 - 1): numpy's uint64 product wraps
before the modulo in DataTrove too, and the wrap is kept so signatures stay comparable. The
modulo by the Mersenne prime is two additions and a compare (2^61 = 1 mod p), not a division.

A band key is xxh64 over the band's r values as little-endian uint64 bytes.
"""

from __future__ import annotations

import numpy as np
from numba import njit, uint64

P1 = uint64(0x9E3779B185EBCA87)
P2 = uint64(0xC2B2AE3D27D4EB4F)
P3 = uint64(0x165667B19E3779F9)
P4 = uint64(0x85EBCA77C2B2AE63)
P5 = uint64(0x27D4EB2F165667C5)
MERSENNE = uint64((1 << 61) - 1)
EMPTY = np.iinfo(np.uint64).max     # a signature value no shingle gives (all are < 2^61)


@njit(inline="always")
def _rotl(x, r):
    return (x << uint64(r)) | (x >> uint64(64 - r))


@njit(inline="always")
def _read64(buf, i):
    v = uint64(0)
    for k in range(8):
        v |= uint64(buf[i + k]) << uint64(8 * k)
    return v


@njit(inline="always")
def _read32(buf, i):
    v = uint64(0)
    for k in range(4):
        v |= uint64(buf[i + k]) << uint64(8 * k)
    return v


@njit(inline="always")
def _round(acc, lane):
    acc = acc + lane * P2
    return _rotl(acc, 31) * P1


@njit(inline="always")
def _merge(acc, val):
    acc ^= _round(uint64(0), val)
    return acc * P1 + P4


@njit(cache=True, nogil=True)
def xxh64(buf, start, length):
    """xxh64 (seed 0) of buf[start:start+length] (a uint8 array)."""
    p, end = start, start + length
    if length >= 32:
        v1, v2, v3, v4 = P1 + P2, P2, uint64(0), uint64(0) - P1
        while p + 32 <= end:
            v1 = _round(v1, _read64(buf, p))
            v2 = _round(v2, _read64(buf, p + 8))
            v3 = _round(v3, _read64(buf, p + 16))
            v4 = _round(v4, _read64(buf, p + 24))
            p += 32
        h = _rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)
        h = _merge(_merge(_merge(_merge(h, v1), v2), v3), v4)
    else:
        h = P5
    h += uint64(length)
    while p + 8 <= end:
        h ^= _round(uint64(0), _read64(buf, p))
        h = _rotl(h, 27) * P1 + P4
        p += 8
    if p + 4 <= end:
        h ^= _read32(buf, p) * P1
        h = _rotl(h, 23) * P2 + P3
        p += 4
    while p < end:
        h ^= uint64(buf[p]) * P5
        h = _rotl(h, 11) * P1
        p += 1
    h ^= h >> uint64(33)
    h *= P2
    h ^= h >> uint64(29)
    h *= P3
    h ^= h >> uint64(32)
    return h


@njit(cache=True, nogil=True)
def _grow(arr, n):
    bigger = np.empty(max(16, 2 * n), arr.dtype)
    bigger[:n] = arr[:n]
    return bigger


@njit(inline="always")
def _cuts(buf, i, j, quick, splits, split_at):
    """Cut offsets of the word buf[i:j] if the split table holds it, else (0, 0). `quick` is a
    bitmap over (length, first byte, last byte) of the table's words: most words stop there."""
    if j - i > 15:
        return 0, 0
    key = ((j - i) << 16) | (np.int64(buf[i]) << 8) | buf[j - 1]
    if not (quick[key >> 3] >> (key & 7)) & 1:
        return 0, 0
    x = xxh64(buf, i, j - i)
    k = np.searchsorted(splits, x)
    if k < len(splits) and splits[k] == x:
        return split_at[k, 0], split_at[k, 1]
    return 0, 0


@njit(cache=True, nogil=True)
def _token_pass(buf, start, end, quick, splits, split_at, starts, ends, fill):
    """Count the tokens of buf[start:end] (and, with fill, write their spans)."""
    n = 0
    i = start
    while i < end:
        while i < end and buf[i] == 32:
            i += 1
        if i >= end:
            break
        j = i
        while j < end and buf[j] != 32:
            j += 1
        cut0, cut1 = _cuts(buf, i, j, quick, splits, split_at)
        prev = i
        for cut in (cut0, cut1):
            if cut > 0:
                if fill:
                    starts[n], ends[n] = prev, i + cut
                n += 1
                prev = i + cut
        if fill:
            starts[n], ends[n] = prev, j
        n += 1
        i = j
    return n


@njit(cache=True, nogil=True)
def _tokens(buf, start, end, quick, splits, split_at):
    """(starts, ends) of the tokens of buf[start:end]: space-separated words, a word found in
    the split table cut at its offsets (split_at[k] holds up to two cut points, 0 = none).
    Counted first, so the arrays are allocated once, at their size."""
    none = np.empty(0, np.int64)
    n = _token_pass(buf, start, end, quick, splits, split_at, none, none, False)
    starts = np.empty(n, np.int64)
    ends = np.empty(n, np.int64)
    _token_pass(buf, start, end, quick, splits, split_at, starts, ends, True)
    return starts, ends


@njit(cache=True, nogil=True)
def _ngram_hashes(buf, starts, ends, n_gram, scratch):
    """xxh64 of every n-gram (its tokens joined by one space), in order. Where the tokens sit
    in the text separated by single spaces (no split word), that is a span of the text itself;
    otherwise the tokens are copied into `scratch` first."""
    count = max(0, len(starts) - n_gram + 1)
    out = np.empty(count, np.uint64)
    bad = 0                       # gaps in the current window that are not one space
    for t in range(min(n_gram - 1, len(starts) - 1)):
        bad += starts[t + 1] != ends[t] + 1
    for g in range(count):
        if g > 0:
            bad -= starts[g] != ends[g - 1] + 1
            last = g + n_gram - 1
            bad += starts[last] != ends[last - 1] + 1
        if bad == 0:
            out[g] = xxh64(buf, starts[g], ends[g + n_gram - 1] - starts[g])
            continue
        m = 0
        for t in range(g, g + n_gram):
            if t > g:
                scratch[m] = 32
                m += 1
            for q in range(starts[t], ends[t]):
                scratch[m] = buf[q]
                m += 1
        out[g] = xxh64(scratch, 0, m)
    return out


@njit(cache=True, nogil=True)
def sign(buf, offsets, a, b, n_gram, quick, splits, split_at, sig, n_tokens, whole):
    """Per document d: n_tokens[d]; whole[d] = xxh64 of its whole normalised bytes; and, when it
    has at least n_gram tokens, its signature row sig[d] (else left at EMPTY)."""
    n_hash = len(a)
    for d in range(len(offsets) - 1):
        s, e = offsets[d], offsets[d + 1]
        whole[d] = xxh64(buf, s, e - s)
        starts, ends = _tokens(buf, s, e, quick, splits, split_at)
        n_tokens[d] = len(starts)
        sig[d, :] = EMPTY
        if len(starts) < n_gram:
            continue
        shingles = _ngram_hashes(buf, starts, ends, n_gram, np.empty(e - s + n_gram, np.uint8))
        row = sig[d]
        for x in shingles:
            for j in range(n_hash):
                v = x * a[j] + b[j]
                r = (v & MERSENNE) + (v >> uint64(61))
                if r >= MERSENNE:
                    r -= MERSENNE
                row[j] = min(row[j], r)


@njit(cache=True, nogil=True)
def band_keys(sig, bands, rows):
    """keys[k, d] = xxh64 of band k of signature d (r values, little-endian bytes)."""
    n = sig.shape[0]
    keys = np.empty((bands, n), np.uint64)
    scratch = np.empty(rows * 8, np.uint8)
    for d in range(n):
        for k in range(bands):
            for q in range(rows):
                v = sig[d, k * rows + q]
                for byte in range(8):
                    scratch[q * 8 + byte] = (v >> uint64(8 * byte)) & uint64(0xFF)
            keys[k, d] = xxh64(scratch, 0, rows * 8)
    return keys


@njit(cache=True, nogil=True)
def ngram_sets(buf, offsets, n_gram, quick, splits, split_at):
    """Every document's n-gram hashes, concatenated (CSR: hashes, doc offsets), and token counts.
    Tokens are counted first so the output is allocated once, at its size."""
    n_docs = len(offsets) - 1
    doc_off = np.zeros(n_docs + 1, np.int64)
    n_tokens = np.zeros(n_docs, np.int64)
    none = np.empty(0, np.int64)
    for d in range(n_docs):
        n_tokens[d] = _token_pass(buf, offsets[d], offsets[d + 1], quick, splits, split_at,
                                  none, none, False)
        doc_off[d + 1] = doc_off[d] + max(0, n_tokens[d] - n_gram + 1)
    out = np.empty(doc_off[-1], np.uint64)
    for d in range(n_docs):
        if doc_off[d + 1] > doc_off[d]:
            s, e = offsets[d], offsets[d + 1]
            starts, ends = _tokens(buf, s, e, quick, splits, split_at)
            out[doc_off[d]:doc_off[d + 1]] = _ngram_hashes(
                buf, starts, ends, n_gram, np.empty(e - s + n_gram, np.uint8))
    return out, doc_off, n_tokens


@njit(cache=True, nogil=True)
def lookup(hashes, doc_off, table):
    """For each document, the positions in `table` (sorted, unique) of its hashes found there,
    each once, ascending: CSR (positions, doc offsets)."""
    n_docs = len(doc_off) - 1
    out_off = np.zeros(n_docs + 1, np.int64)
    found = np.empty(16, np.int64)
    m = 0
    for d in range(n_docs):
        start = m
        for g in range(doc_off[d], doc_off[d + 1]):
            k = np.searchsorted(table, hashes[g])
            if k < len(table) and table[k] == hashes[g]:
                if m == len(found):
                    found = _grow(found, m)
                found[m] = k
                m += 1
        if m - start > 1:
            uniq = np.unique(found[start:m])
            found[start:start + len(uniq)] = uniq
            m = start + len(uniq)
        out_off[d + 1] = m
    return found[:m].copy(), out_off
