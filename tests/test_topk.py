"""pipeline/topk.BlockIndex: the streamed search gives the exact top-k (ties included) and the
same RDS+ lists as a FAISS IndexFlatIP holding every row."""

from __future__ import annotations

import numpy as np
import pytest
from thresher.pipeline.stages.topk import BlockIndex
from thresher.scoring.rds import FaissRanking


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def tied(tmp_path):
    """A float16 memmap whose rows repeat (exact ties) and a non-contiguous subset of them."""
    rng = np.random.default_rng(7)
    base = rng.normal(size=(60, 8))
    mat = base[rng.integers(0, 60, size=500)].astype(np.float16)   # ~8 copies of each vector
    np.save(tmp_path / "v.npy", mat)
    vec = np.load(tmp_path / "v.npy", mmap_mode="r")
    rows = np.sort(rng.choice(500, size=430, replace=False))
    queries = _unit(rng.normal(size=(23, 8))).astype(np.float32)     # >= 20: FAISS's BLAS path
    return vec, rows, queries


def _exact(vec, rows, queries):
    x = _unit(np.asarray(vec[rows], dtype=np.float64))
    return queries.astype(np.float64) @ x.T


@pytest.mark.parametrize("block", [1, 7, 64, 1024])
@pytest.mark.parametrize("k", [1, 5, 37, 430, 500])
def test_block_search_is_the_exact_top_k_with_ties(tied, block, k):
    vec, rows, queries = tied
    D, I = BlockIndex(vec, rows, block=block).search(queries, k)
    sims = _exact(vec, rows, queries)
    assert D.shape == I.shape == (len(queries), k)
    for q in range(len(queries)):
        got = I[q][I[q] >= 0]
        assert len(got) == min(k, len(rows)) and len(set(got.tolist())) == len(got)
        best = np.sort(sims[q])[::-1][:len(got)]
        np.testing.assert_allclose(D[q][:len(got)], best, atol=1e-6)   # best first, exact values
        np.testing.assert_allclose(sims[q][got], best, atol=1e-6)      # each id has its score
        kth = best[-1]
        above = set(np.flatnonzero(sims[q] > kth + 1e-6).tolist())
        assert above <= set(got.tolist())             # every row above the k-th score is there
        assert np.all(sims[q][got] >= kth - 1e-6)     # the rest are ties of the k-th score
        assert np.all(I[q][len(got):] == -1)          # past the end: -1, as FAISS


def test_block_search_matches_faiss_flat_index_and_rds_rankings(tied):
    import faiss

    vec, rows, queries = tied
    flat = faiss.IndexFlatIP(vec.shape[1])
    x = np.ascontiguousarray(vec[rows], dtype=np.float32)
    faiss.normalize_L2(x)
    flat.add(x)
    stream = BlockIndex(vec, rows, block=50)
    D0, _ = flat.search(queries, 40)
    D1, _ = stream.search(queries, 40)
    assert np.array_equal(D0, D1)                     # the same floats, not just close
    a, b = FaissRanking(flat, queries, k=3), FaissRanking(stream, queries, k=3)
    for members, n in [([0], 25), ([1, 4, 9], 60), (list(range(23)), 430), ([5], 430)]:
        ra, sa = a.ranked(members, n)
        rb, sb = b.ranked(members, n)
        assert ra.tolist() == rb.tolist() and np.array_equal(sa, sb)
        assert len(rb) == n


def test_empty_search():
    D, I = BlockIndex(np.zeros((3, 4), np.float16), np.arange(3)).search(np.ones((2, 4)), 0)
    assert D.shape == I.shape == (2, 0)


def _rss_file_mb() -> float:
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith("RssFile:"))
    return int(line.split()[1]) / 1024


def test_memmap_reads_release_their_pages(tmp_path):
    """copy_rows / gather give x[rows] and leave the file's pages out of the process's resident
    memory (a plain read of the same memmap keeps them)."""
    from thresher.pipeline.io.memmap import copy_rows, gather

    x = np.random.default_rng(0).normal(size=(40_000, 512)).astype(np.float16)   # 40 MB
    np.save(tmp_path / "x.npy", x)
    rows = np.sort(np.random.default_rng(1).choice(len(x), 9000, replace=False))
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    before = _rss_file_mb()
    got = gather(mm, rows, block=4096)
    whole = copy_rows(mm, slice(0, len(x)), np.float16)
    grown = _rss_file_mb() - before
    assert np.array_equal(got, x[rows].astype(np.float32)) and np.array_equal(whole, x)
    plain = np.load(tmp_path / "x.npy", mmap_mode="r")
    before = _rss_file_mb()
    assert float(np.asarray(plain, dtype=np.float32).sum()) == float(x.astype(np.float32).sum())
    assert _rss_file_mb() - before > 30 and grown < 5     # 40 MB kept by a plain read, not ours
    assert np.array_equal(gather(x, rows), x[rows].astype(np.float32))       # plain arrays too
    with pytest.raises(ValueError, match="sorted"):
        gather(mm, rows[::-1])


_PEAK = """
import sys, numpy as np
from thresher.pipeline.io.memmap import copy_rows, gather

def hwm_mb():   # this process's peak resident memory (VmHWM starts afresh at exec; ru_maxrss not)
    with open("/proc/self/status") as f:
        return int(next(ln for ln in f if ln.startswith("VmHWM:")).split()[1]) / 1024

mm = np.load(sys.argv[1], mmap_mode="r")
rows = np.arange(0, len(mm), 32)                    # one row per 64 KB of the file
before = hwm_mb()
out = gather(mm, rows) if sys.argv[2] == "gather" else copy_rows(mm, rows)
print(hwm_mb() - before, float(out.sum()))
"""


def test_gather_of_scattered_rows_keeps_few_pages_at_once(tmp_path):
    """A page fault on a file mapping maps its neighbours too (fault-around), so one copy of rows
    64 KB apart holds the whole file at its peak; gather releases every SCATTER rows."""
    import subprocess
    import sys

    x = np.lib.format.open_memmap(tmp_path / "x.npy", "w+", np.float16, (100_000, 1024))  # 200 MB
    rng = np.random.default_rng(0)
    for i in range(0, len(x), 10_000):
        x[i:i + 10_000] = rng.random((10_000, 1024), dtype=np.float32)
    x.flush()
    want = float(np.asarray(x[::32], dtype=np.float32).sum())
    del x
    peak = {}
    for how in ("gather", "copy_rows"):
        res = subprocess.run([sys.executable, "-c", _PEAK, str(tmp_path / "x.npy"), how],
                             capture_output=True, text=True, check=True)
        grown, total = res.stdout.split()
        peak[how] = float(grown)
        assert float(total) == pytest.approx(want, rel=1e-4)
    assert peak["gather"] < 60, peak                    # 3,125 rows: 12.5 MB out + 512 x 64 KB
    assert peak["copy_rows"] > 2 * peak["gather"], peak
