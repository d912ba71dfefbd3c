"""Decontamination annotations: which evaluation rows each pool row shares a long n-gram with.

    stage = EvalOverlap(evals=("eval/gsm8k_test.jsonl",), n_gram=13)
    ann = run_stage(stage, pool, store)          # Annotations: id, decon_ngrams, decon_matches

Both sides are compared as fuzzy dedup compares rows: the row's key (text; a chat row's user and
assistant turns, `textnorm.row_key`) normalised as DataTrove's simplify_text, then word n-grams
(13 by default, as GPT-3 and the Tulu decontamination) hashed with xxh64. Per pool row:

    decon_ngrams    distinct n-grams it shares with any evaluation row
    decon_matches   the evaluation rows it shares one with, as "<file name>:<row id>", sorted

The evaluation files are read as target files are (any input shape, `io.pool.load_rows`) by
each worker (`open_worker`), which keeps their n-grams as one sorted array of hashes and, beside
it, which rows hold each: a few bytes per evaluation n-gram, whatever the pool's size. Before any
work (`check_requirements`, which every plan runs first), a missing file, a file with no usable
row, or a file with any row that cannot be read is a one-line error naming the file (and line):
decontaminating against part of an evaluation set would pass its other rows silently.
Evaluation rows with fewer than n_gram tokens have no n-gram and can match nothing: `eval_rows`
counts them per file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import polars as pl
import pyarrow as pa
from thresher.pipeline.artifacts import file_fingerprint
from thresher.pipeline.stages import ngram_kernels as K
from thresher.pipeline.stages.annotate import AnnotationStage
from thresher.pipeline.stages.textnorm import (
    normalise_buffer,
    row_keys,
    spacy_split,
    split_table,
    text_buffer,
)


def read_eval(path: str) -> list[dict]:
    """The canonical rows of one evaluation file; every problem is a one-line error."""
    from thresher.pipeline.io.pool import load_rows

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"evaluation file {path}: no such file")
    rows, bad = load_rows(p)
    if bad:
        raise ValueError(f"evaluation file {path}: {bad[0]['location']}: {bad[0]['reason']} "
                         f"({len(bad)} of {len(rows) + len(bad)} rows unusable; fix or remove them)")
    return rows


def ngrams_of(texts: list[str], n_gram: int, cjk_chars: bool
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n-gram hashes of every text, concatenated; CSR offsets per text; tokens per text)."""
    buf, off = spacy_split(*normalise_buffer(*text_buffer(pl.Series(texts, dtype=pl.String)),
                                             cjk_chars))
    return K.ngram_sets(buf, off, n_gram, *split_table())


@dataclass
class EvalTable:
    """The evaluation n-grams: sorted unique hashes, and per hash the rows holding it (CSR)."""

    hashes: np.ndarray
    row_off: np.ndarray
    rows: np.ndarray
    labels: list[str]
    per_file: list[dict]

    @classmethod
    def build(cls, evals: tuple[str, ...], n_gram: int, cjk_chars: bool) -> EvalTable:
        all_h, all_r, labels, per_file = [], [], [], []
        for path in evals:
            rows = read_eval(path)
            h, off, n_tok = ngrams_of(row_keys(rows), n_gram, cjk_chars)
            first = len(labels)
            labels += [f"{Path(path).name}:{r['id']}" for r in rows]
            all_h.append(h)
            all_r.append(first + np.repeat(np.arange(len(rows)), np.diff(off)))
            per_file.append({"file": path, "rows": len(rows),
                             "rows_too_short": int((n_tok < n_gram).sum())})
        h = np.concatenate(all_h) if all_h else np.zeros(0, np.uint64)
        r = np.concatenate(all_r) if all_r else np.zeros(0, np.int64)
        order = np.lexsort((r, h))
        h, r = h[order], r[order]
        keep = np.r_[True, (h[1:] != h[:-1]) | (r[1:] != r[:-1])]    # each (hash, row) once
        h, r = h[keep], r[keep]
        starts = np.flatnonzero(np.r_[True, h[1:] != h[:-1]]) if len(h) else np.zeros(0, np.int64)
        return cls(h[starts], np.r_[starts, len(h)].astype(np.int64), r, labels, per_file)


@dataclass(frozen=True)
class EvalOverlap(AnnotationStage):
    kind: ClassVar[str] = "decontam"
    evals: tuple[str, ...] = ()
    n_gram: int = field(default=13, metadata={"help": "words per n-gram"})
    cjk_chars: bool = True

    def __post_init__(self):
        if not self.evals:
            raise ValueError("decontamination needs at least one evaluation file")
        if not isinstance(self.n_gram, int) or self.n_gram < 1:
            raise ValueError(f"n_gram must be a positive integer, got {self.n_gram!r}")

    def check_requirements(self) -> None:
        super().check_requirements()
        for path in self.evals:
            read_eval(path)

    def key_config(self) -> dict:
        out = super().key_config()
        out["evals"] = [Path(p).name for p in self.evals]      # content below, not place
        return out

    def key_extra(self) -> dict:
        return {"eval_sha256": [file_fingerprint(Path(p)) for p in self.evals]}

    def describe(self) -> str:
        names = ", ".join(Path(p).name for p in self.evals)
        return f"decontam(n_gram={self.n_gram}, evals=[{names}])"

    def schema(self) -> pa.Schema:
        return pa.schema([("decon_ngrams", pa.int32()), ("decon_matches", pa.list_(pa.string()))])

    def open_worker(self, device: str) -> EvalTable:
        return EvalTable.build(self.evals, self.n_gram, self.cjk_chars)

    def annotate(self, worker: EvalTable, rows: list[dict]) -> dict:
        h, off, _ = ngrams_of(row_keys(rows), self.n_gram, self.cjk_chars)
        found, found_off = K.lookup(h, off, worker.hashes)
        counts = np.diff(found_off).astype(np.int32)
        matches: list[list[str]] = [[] for _ in rows]
        for d in np.flatnonzero(counts):
            pos = found[found_off[d]:found_off[d + 1]]
            hit = np.unique(np.concatenate([worker.rows[worker.row_off[p]:worker.row_off[p + 1]]
                                            for p in pos]))
            matches[d] = sorted(worker.labels[i] for i in hit)
        return {"decon_ngrams": counts, "decon_matches": matches}
