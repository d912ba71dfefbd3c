"""Exact inner-product top-k over a matrix read block by block (a float16 memmap of any size).

    index = BlockIndex(vectors, rows)            # vectors[rows], nothing read yet
    D, I = index.search(queries, k)              # as faiss.IndexFlatIP(all rows).search
    for start, block in normalized_blocks(vectors, rows): ...

`BlockIndex` answers `search` like a FAISS `IndexFlatIP` holding every row of vectors[rows]
(re-normalised in float32; positions 0..ntotal-1, -1 past the end), but never holds more than
one block: each search streams the rows in blocks of `block`, scores a block with FAISS's own
brute-force kernel (`faiss.knn`, the function IndexFlatIP.search calls, so the scores are the
same floats) and merges the block's top-k into a running top-k per query (`faiss.ResultHeap`).
Memory: one block (block x dim float32) + queries x k, plus the int64 row positions: independent
of the pool size apart from those O(N) scalars (a memmap's pages are released after each block,
`pipeline/io/memmap.py`). The price is one pass over the rows per search.
Which of several rows tied at the k-th score is returned may differ from IndexFlatIP's choice;
the scores, and every row scoring above the k-th score, are the same.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from thresher.pipeline.io.memmap import copy_rows

BLOCK = 16384   # a multiple of FAISS's database block (1024): the same BLAS tiles as one index


def normalized_blocks(vectors: np.ndarray, rows: np.ndarray, block: int = BLOCK
                      ) -> Iterator[tuple[int, np.ndarray]]:
    """(start, float32 L2-normalised vectors[rows[start:start + block]]) for every block."""
    import faiss

    for s in range(0, len(rows), block):
        part = rows[s:s + block]
        if len(part) and part[-1] - part[0] == len(part) - 1 and np.all(np.diff(part) == 1):
            part = slice(int(part[0]), int(part[-1]) + 1)       # a plain slice of the memmap
        out = copy_rows(vectors, part)                          # its pages released after
        faiss.normalize_L2(out)
        yield s, out


class BlockIndex:
    """Exact inner-product search over vectors[rows], streamed in blocks (see the module doc)."""

    def __init__(self, vectors: np.ndarray, rows: np.ndarray, block: int = BLOCK):
        if block < 1:
            raise ValueError("block must be >= 1")
        self.vectors, self.block = vectors, block
        self.rows = np.asarray(rows, dtype=np.int64)
        self.ntotal, self.d = len(self.rows), vectors.shape[1]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(D, I), each (len(queries), k): best inner products first, positions into `rows`."""
        import faiss

        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if k < 1:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        heap = faiss.ResultHeap(len(queries), k, keep_max=True)
        for start, block in normalized_blocks(self.vectors, self.rows, self.block):
            D, I = faiss.knn(queries, block, min(k, len(block)), faiss.METRIC_INNER_PRODUCT)
            heap.add_result(D, I + start)
        heap.finalize()
        return heap.D, heap.I
