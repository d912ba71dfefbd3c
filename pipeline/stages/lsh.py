"""LSH banding, candidate check and union-find over MinHash signatures: duplicate clusters.

    clusters = run_stage(MinHashClusters(threshold=0.7), pool, store)   # its phases run first
    clusters.frame()        # id, dup_cluster_id, dup_cluster_size, dup_check (pool order):
                            # dup_cluster_id is the id of the cluster's first row (its own id
                            # when alone); dup_check says how the row was compared: "minhash",
                            # "exact" (under n_gram tokens: its normalised text), or "none"
                            # (nothing left after normalisation: never a duplicate)
    clusters.pairs()        # id_a, id_b, jaccard: every candidate pair that passed the check

Two phases, each a stage: `MinHashBands` has one unit per band (the executor maps them, and a
killed run keeps its finished bands), `MinHashClusters` one whole-pool unit that checks the
candidates and clusters them; each reads only what it needs from the per-shard signature files:

    band_edges(sigs, band)           one band: rows whose band keys are equal are candidates;
                                     star edges from the lowest row of each bucket to every
                                     other member (not all pairs)
    check_edges(sigs, edge_files, threshold, out)
                                     the edges of every band, each pair once, kept when the
                                     estimated Jaccard (the share of the H signature values
                                     that are equal) is at least `threshold`
    clusters_of(sigs, pairs_file)    union-find over the kept pairs (root = the lowest row, so
                                     a cluster's id is its first row in pool order); rows under
                                     n_gram tokens are grouped by their exact normalised text

Memory: one band's keys (8 bytes a row) and its sort, then the candidate pairs (16 bytes each)
and blocks of their signatures: it grows with the rows and the duplicates, not with H x rows.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from numba import njit
from thresher.pipeline.artifacts import config_key
from thresher.pipeline.io.memmap import copy_rows
from thresher.pipeline.stage import ShardResult, Stage, StageRun, Unit, unit_file
from thresher.pipeline.stages.annotate import FILE, Annotations
from thresher.pipeline.stages.minhash import MinHashSignatures, MinHashSigs

CHECKED_BLOCK = 16_384      # candidate pairs whose signatures are compared at a time


def _concat(files: list[Path], band: int | None = None) -> np.ndarray:
    parts = []
    for f in files:
        a = np.load(f, mmap_mode="r")
        parts.append(copy_rows(a, band if band is not None else slice(None), a.dtype))
    return np.concatenate(parts) if parts else np.zeros(0)


def band_edges(sigs: MinHashSigs, band: int) -> np.ndarray:
    """Candidate pairs of one band: int64 [m, 2], the lower row first."""
    n_tokens = _concat(sigs.files("n_tokens.npy"))
    keys = _concat(sigs.files("keys.npy"), band)
    rows = np.flatnonzero(n_tokens >= sigs.n_gram)
    order = rows[np.argsort(keys[rows], kind="stable")]      # by key, then by row
    k = keys[order]
    same = k[1:] == k[:-1] if len(k) else np.zeros(0, bool)
    first = np.maximum.accumulate(np.where(np.r_[True, ~same], np.arange(len(k)), 0))
    at = np.flatnonzero(same) + 1
    return np.stack([order[first[at]], order[at]], axis=1).astype(np.int64)


class _Signatures:
    """Rows of the per-shard signature files by global row index, read block by block."""

    def __init__(self, sigs: MinHashSigs):
        self.maps = [np.load(f, mmap_mode="r") for f in sigs.files("sig.npy")]
        self.starts = np.cumsum([0] + [m.shape[0] for m in self.maps])

    def rows(self, idx: np.ndarray) -> np.ndarray:
        order = np.argsort(idx, kind="stable")
        ordered = idx[order]
        out = np.empty((len(idx), self.maps[0].shape[1] if self.maps else 0), np.uint64)
        shard = np.searchsorted(self.starts, ordered, side="right") - 1
        bounds = np.searchsorted(shard, np.arange(len(self.maps) + 1))
        for s, (lo, hi) in enumerate(itertools.pairwise(bounds)):
            if hi > lo:
                out[order[lo:hi]] = copy_rows(self.maps[s], ordered[lo:hi] - self.starts[s],
                                              np.uint64)
        return out


def check_edges(sigs: MinHashSigs, edge_files: list[Path], threshold: float, out: Path) -> dict:
    """Every band's candidate pairs, once each, with their estimated Jaccard; those at or above
    `threshold` are written to `out` (Parquet row_a, row_b, jaccard). Returns counts."""
    edges = [np.load(f) for f in edge_files]
    all_edges = np.concatenate(edges) if edges else np.zeros((0, 2), np.int64)
    n = int(sum(sigs.rows_per_shard))
    pair = np.unique(all_edges[:, 0] * n + all_edges[:, 1])
    a, b = pair // n, pair % n
    jac = np.empty(len(pair), np.float32)
    table = _Signatures(sigs)
    for lo in range(0, len(pair), CHECKED_BLOCK):
        hi = min(len(pair), lo + CHECKED_BLOCK)
        jac[lo:hi] = (table.rows(a[lo:hi]) == table.rows(b[lo:hi])).mean(axis=1)
    keep = jac >= threshold
    frame = pa.table({"row_a": a[keep], "row_b": b[keep], "jaccard": jac[keep]})
    with _atomic(out) as tmp:
        pq.write_table(frame, tmp)
    return {"candidate_edges": len(all_edges), "candidate_pairs": len(pair),
            "pairs_kept": int(keep.sum()), "pairs_rejected": int((~keep).sum())}


@njit(cache=True, nogil=True)
def union_find(n, a, b):
    """Root of every row after joining each (a[i], b[i]): the lowest row of its component."""
    parent = np.arange(n)
    for i in range(len(a)):
        x, y = a[i], b[i]
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        while parent[y] != y:
            parent[y] = parent[parent[y]]
            y = parent[y]
        if x < y:
            parent[y] = x
        elif y < x:
            parent[x] = y
    for i in range(n):          # ascending: a parent is always a lower row, already final
        parent[i] = parent[parent[i]]
    return parent


def clusters_of(sigs: MinHashSigs, pairs_file: Path) -> tuple[np.ndarray, np.ndarray]:
    """(root row of every row's cluster, how each row was compared: 0 no words, 1 exact text,
    2 MinHash)."""
    n_tokens = _concat(sigs.files("n_tokens.npy"))
    pairs = pq.read_table(pairs_file, columns=["row_a", "row_b"])
    root = union_find(len(n_tokens), pairs["row_a"].to_numpy(), pairs["row_b"].to_numpy())
    short = np.flatnonzero((n_tokens > 0) & (n_tokens < sigs.n_gram))
    if len(short):
        whole = _concat(sigs.files("whole.npy"))
        order = short[np.argsort(whole[short], kind="stable")]
        w = whole[order]
        same = np.r_[False, w[1:] == w[:-1]]
        first = np.maximum.accumulate(np.where(~same, np.arange(len(order)), 0))
        root[order] = order[first]
    how = np.where(n_tokens >= sigs.n_gram, 2, np.where(n_tokens > 0, 1, 0)).astype(np.int8)
    return root, how


CHECKS = np.array(["none", "exact", "minhash"])


@dataclass
class DupClusters(Annotations):
    """A pool's duplicate clusters: `annotations.parquet` (id, dup_cluster_id, dup_cluster_size,
    dup_check; see the stage) and `pairs.parquet` (the kept candidate pairs, with ids)."""

    def pairs(self) -> pl.DataFrame:
        return pl.read_parquet(self.dir.path("pairs.parquet"))


@dataclass
class BandEdges:
    """Phase 1's output: one candidate-edge file per band."""

    files: list[Path]
    fingerprint: str


@dataclass(frozen=True)
class MinHashBands(Stage):
    """Phase 1: the candidate edges of every LSH band, one unit per band."""

    kind: ClassVar[str] = "minhash_bands"
    signatures: MinHashSignatures = field(default_factory=MinHashSignatures)

    def deps(self) -> tuple[Stage, ...]:
        return (self.signatures, *super().deps())

    def units(self, run: StageRun) -> list[Unit]:
        sigs = run.deps[self.signatures]
        ident = config_key(sigs.fingerprint)[:16]
        return [Unit(f"{ident}-band{b:03d}", worker=("band", b), size=run.pool.n_rows,
                     label=f"band {b}") for b in range(sigs.bands)]

    def open_worker(self, device: str, key: tuple = ()) -> None:
        return None

    def run_unit(self, run: StageRun, worker, unit: Unit) -> ShardResult:
        edges = band_edges(run.deps[self.signatures], unit.worker[1])
        return ShardResult(arrays={"edges": edges}, rows=run.pool.n_rows,
                           info={"edges": len(edges)})

    def load(self, run: StageRun) -> BandEdges:
        return BandEdges([unit_file(run, u, "edges.npy") for u in self.units(run)],
                         f"minhash_bands:{run.dir.key}")


@dataclass(frozen=True)
class MinHashClusters(Stage):
    """Phase 2 (its phase 1 is a dependency): the candidate check, union-find and the table."""

    kind: ClassVar[str] = "minhash_clusters"
    per_shard: ClassVar[bool] = False
    signatures: MinHashSignatures = field(default_factory=MinHashSignatures)
    threshold: float = 0.7

    def __post_init__(self):
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")

    def bands_phase(self) -> MinHashBands:
        return MinHashBands(signatures=self.signatures)

    def deps(self) -> tuple[Stage, ...]:
        return (self.signatures, self.bands_phase(), *super().deps())

    def describe(self) -> str:
        s = self.signatures
        return (f"minhash_clusters(bands={s.bands}, rows={s.rows}, n_gram={s.n_gram}, "
                f"threshold={self.threshold})")

    def run_whole(self, run: StageRun) -> dict:
        sigs: MinHashSigs = run.deps[self.signatures]
        edge_files = run.deps[self.bands_phase()].files
        stats = check_edges(sigs, edge_files, self.threshold, run.dir.path("checked.parquet"))
        root, how = clusters_of(sigs, run.dir.path("checked.parquet"))
        ids = run.pool.frame(["id"])["id"]
        size = np.bincount(root, minlength=len(root))[root]
        table = pa.table({"id": ids.to_arrow(), "dup_cluster_id": ids.gather(root).to_arrow(),
                          "dup_cluster_size": pa.array(size, pa.int64()),
                          "dup_check": pa.array(CHECKS[how], pa.string())})
        with run.dir.writing(FILE) as tmp:
            pq.write_table(table, tmp)
        pairs = pq.read_table(run.dir.path("checked.parquet"))
        named = pa.table({"id_a": ids.gather(pairs["row_a"].to_numpy()).to_arrow(),
                          "id_b": ids.gather(pairs["row_b"].to_numpy()).to_arrow(),
                          "jaccard": pairs["jaccard"]})
        with run.dir.writing("pairs.parquet") as tmp:
            pq.write_table(named, tmp)
        run.dir.path("checked.parquet").unlink()
        in_dup = size > 1
        return {"rows": len(root), **stats, "clusters": len(np.unique(root[in_dup])),
                "rows_in_clusters": int(in_dup.sum()),
                "rows_duplicate": int((in_dup & (root != np.arange(len(root)))).sum()),
                "rows_exact_checked": int((how == 1).sum()), "rows_no_words": int((how == 0).sum())}

    def load(self, run: StageRun) -> DupClusters:
        return DupClusters(run.dir, self.kind)


def _atomic(path: Path):
    from thresher.pipeline.artifacts import atomic_path

    return atomic_path(path)
