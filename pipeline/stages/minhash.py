"""MinHash signatures per shard: the first half of fuzzy dedup, cached and resumable per shard.

    stage = MinHashSignatures(bands=14, rows=8)           # DataTrove / FineWeb defaults
    sigs = run_stage(stage, pool, store)                   # MinHashSigs: per-shard file paths
    sig, n_tokens, whole = sign_texts(["some text ..."], stage)   # the same, in memory

Per row: the row's key (`textnorm.row_key`: text, or a chat row's user and assistant turns),
normalised as DataTrove's `simplify_text`; word 5-grams hashed with xxh64; `bands * rows`
permutations (a*x + b) mod (2^61 - 1) with (a, b) drawn as DataTrove draws them
(`np.random.RandomState(seed)`, a then b), so with the same (n_gram, bands, rows, seed) a
signature equals DataTrove's `MinhashDedupSignature` for the same tokens. Each shard writes:

    n_tokens.npy   int64 [n]          tokens of the normalised key (0: nothing left to compare)
    whole.npy      uint64 [n]         xxh64 of the whole normalised key (exact dedup of short rows)
    sig.npy        uint64 [n, H]      the signature (all 2^64-1 for rows under n_gram tokens)
    keys.npy       uint64 [bands, n]  xxh64 of each band: what LSH buckets compare, band-major
                                      so one band of a shard is one contiguous read

A 10 MB document, binary junk or one repeated character signs like any text (the kernels are
linear in its bytes); a row whose key normalises to nothing gets n_tokens 0 and no signature.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import ClassVar

import numpy as np
import polars as pl
from thresher.pipeline.stage import Resources, ShardResult, Stage, StageRun, shard_file
from thresher.pipeline.stages import ngram_kernels as K
from thresher.pipeline.stages.textnorm import (
    normalise_buffer,
    row_keys,
    spacy_split,
    split_table,
    text_buffer,
)

MERSENNE = (1 << 61) - 1


@lru_cache(maxsize=8)
def permutations(n_hash: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) as DataTrove's MinhashDedupSignature.parameters draws them."""
    gen = np.random.RandomState(seed)
    a = gen.randint(1, MERSENNE, dtype=np.uint64, size=(1, n_hash))
    b = gen.randint(0, MERSENNE, dtype=np.uint64, size=(1, n_hash))
    return a.ravel().copy(), b.ravel().copy()


def check_shape(n_gram: int, bands: int, rows: int) -> None:
    for name, v in (("n_gram", n_gram), ("bands", bands), ("rows", rows)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if bands * rows > 1024:
        raise ValueError(f"bands x rows = {bands * rows} hashes per row; at most 1024")


def threads_available() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def sign_texts(texts: list[str] | pl.Series, stage: MinHashSignatures, threads: int = 1
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(signatures [n, H] uint64, n_tokens [n] int64, whole-text hashes [n] uint64). Texts are
    normalised and split as DataTrove's spaCy tokenizer splits them (textnorm) in this thread;
    the signing kernel releases the GIL: `threads` sign contiguous slices of the texts side by
    side (the result does not depend on it)."""
    series = texts if isinstance(texts, pl.Series) else pl.Series(texts, dtype=pl.String)
    buf, offsets = spacy_split(*normalise_buffer(*text_buffer(series), stage.cjk_chars))
    a, b = permutations(stage.bands * stage.rows, stage.seed)
    n = len(offsets) - 1
    sig = np.empty((n, len(a)), np.uint64)
    n_tokens = np.empty(n, np.int64)
    whole = np.empty(n, np.uint64)
    splits = split_table()

    def part(lo: int, hi: int) -> None:
        K.sign(buf, offsets[lo:hi + 1], a, b, stage.n_gram, *splits, sig[lo:hi], n_tokens[lo:hi],
               whole[lo:hi])

    bounds = np.linspace(0, n, max(1, min(threads, n)) + 1).astype(int)
    if len(bounds) <= 2:
        part(0, n)
    else:
        with ThreadPoolExecutor(len(bounds) - 1) as pool:
            list(pool.map(part, bounds[:-1], bounds[1:]))
    return sig, n_tokens, whole


@dataclass
class MinHashSigs:
    """The signatures of a pool, one file set per shard (in pool order)."""

    shard_prefixes: list[str]
    rows_per_shard: list[int]
    bands: int
    rows: int
    n_gram: int
    key: str

    @property
    def fingerprint(self) -> str:
        return f"minhash:{self.key}"

    def files(self, name: str) -> list[Path]:
        return [Path(f"{p}.{name}") for p in self.shard_prefixes]


@dataclass(frozen=True)
class MinHashSignatures(Stage):
    kind: ClassVar[str] = "minhash"
    n_gram: int = field(default=5, metadata={"help": "words per shingle"})
    bands: int = 14
    rows: int = 8
    seed: int = 1
    cjk_chars: bool = True
    threads: int = field(default=0, metadata={"key": False, "help": "0: every core available"})

    def __post_init__(self):
        check_shape(self.n_gram, self.bands, self.rows)

    def resources(self) -> Resources:
        return Resources(cpus=1, memory_gb=1)

    def columns(self) -> list[str]:
        return ["id", "kind", "messages", "text"]

    def run_shard(self, worker, rows: list[dict]) -> ShardResult:
        sig, n_tokens, whole = sign_texts(row_keys(rows), self,
                                          self.threads or threads_available())
        keys = K.band_keys(sig, self.bands, self.rows)
        return ShardResult(arrays={"n_tokens": n_tokens, "whole": whole, "sig": sig,
                                   "keys": keys}, tokens=int(n_tokens.sum()))

    def assemble(self, run: StageRun) -> dict:
        return {"rows": run.pool.n_rows}

    def load(self, run: StageRun) -> MinHashSigs:
        prefixes = [str(shard_file(run, s, "")).rstrip(".") for s in run.pool.shards]
        counts = [int(np.load(f"{p}.n_tokens.npy", mmap_mode="r").shape[0]) for p in prefixes]
        return MinHashSigs(prefixes, counts, self.bands, self.rows, self.n_gram, run.dir.key)
