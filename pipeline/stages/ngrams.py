"""Gopher's n-gram repetition values, vectorised: DataTrove's results from hashed n-grams.

    g = NGrams(words)
    g.top_chars(2)          # len(most common space-joined 2-gram) x its count
    g.duplicated_chars(5)   # characters of repeated 5-grams, scanned as DataTrove scans them

An n-gram is identified by a 64-bit hash instead of its string, computed for all positions at
once with numpy:
- space-joined n-grams (the top n-gram rule) are equal exactly when their word sequences are
  (words hold no spaces), so they are keyed by the words' ids mixed with one random odd
  multiplier per position (wrapping uint64 arithmetic);
- the duplicated n-gram rule joins words WITHOUT spaces, so different word sequences can spell
  the same string ("ab c" and "a bc"); those are keyed by a polynomial hash of the characters,
  two moduli of 2^31 - 1, normalised to the n-gram's start, plus its length.
Two different n-grams share a key with probability about (n-grams)^2 / 2^62: never, in practice.
The greedy left-to-right scan of the duplicated n-gram rule then runs over integers, and only for
a text where some n-gram repeats.
"""

from __future__ import annotations

import numpy as np

M = (1 << 31) - 1
_RNG = np.random.default_rng(20240611)
BASES = (int(_RNG.integers(1 << 20, M)), int(_RNG.integers(1 << 20, M)))
MIX = _RNG.integers(1, 1 << 63, size=16, dtype=np.uint64) | np.uint64(1)
_POW: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _powers(base: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """base^t and base^-t mod M for t < n (cached, grown by doubling)."""
    have = _POW.get(base)
    if have is not None and len(have[0]) >= n:
        return have
    size = max(n, 2 * len(have[0]) if have else 4096)
    t = np.arange(size, dtype=np.int64)
    out = []
    for b in (base, pow(base, M - 2, M)):
        res, sq = np.ones(size, dtype=np.int64), b
        bit = 0
        while (1 << bit) < size:
            res = np.where((t >> bit) & 1, res * sq % M, res)
            sq = sq * sq % M
            bit += 1
        out.append(res)
    if size <= 1 << 22:          # a huge document's powers are not kept
        _POW[base] = (out[0], out[1])
    return out[0], out[1]


class NGrams:
    def __init__(self, words: list[str]):
        self.n = len(words)
        vocab: dict[str, int] = {}
        self.ids = np.fromiter((vocab.setdefault(w, len(vocab)) for w in words), np.uint64, self.n)
        lengths = np.fromiter(map(len, words), np.int64, self.n)
        self.ends = np.concatenate([[0], np.cumsum(lengths)])       # in "".join(words)
        codes = np.frombuffer("".join(words).encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        self.prefix = []
        for base in BASES:
            pw, inv = _powers(base, len(codes) + 1)
            q = np.concatenate([[0], np.cumsum(codes * pw[:len(codes)] % M) % M])
            self.prefix.append((q, inv))

    def _spaced_keys(self, n: int) -> np.ndarray:
        k = self.n - n + 1
        key = np.zeros(k, dtype=np.uint64)
        for j in range(n):
            key += (self.ids[j:j + k] + np.uint64(1)) * MIX[j]
        return key

    def top_chars(self, n: int) -> int | None:
        """len(most common space-joined n-gram) x its count, the first seen winning a tie."""
        if self.n < n:
            return None
        keys = self._spaced_keys(n)
        _, first, counts = np.unique(keys, return_index=True, return_counts=True)
        best = counts.max()
        at = int(first[counts == best].min())
        chars = int(self.ends[at + n] - self.ends[at]) + n - 1
        return chars * int(best)

    def _joined_keys(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.ends[:self.n - n + 1], self.ends[n:]
        parts = []
        for q, inv in self.prefix:
            parts.append((q[b] - q[a]) % M * inv[a] % M)
        key = (parts[0].astype(np.uint64) << np.uint64(31)) | parts[1].astype(np.uint64)
        return key ^ ((b - a).astype(np.uint64) * MIX[15]), b - a

    def duplicated_chars(self, n: int) -> int:
        """Characters of repeated n-grams joined without spaces, scanned left to right and
        jumping n words past each repeat (as DataTrove's find_all_duplicate)."""
        if self.n < n:
            return 0
        keys, lengths = self._joined_keys(n)
        if np.unique(keys).size == keys.size:
            return 0
        keys, lengths = keys.tolist(), lengths.tolist()
        seen: set[int] = set()
        chars, i, last = 0, 0, len(keys) - 1
        while i <= last:
            if keys[i] in seen:
                chars += lengths[i]
                i += n
            else:
                seen.add(keys[i])
                i += 1
        return chars
