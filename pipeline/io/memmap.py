"""Read rows of a memory-mapped matrix without its pages piling up in this process.

    block = copy_rows(x, slice(a, b))        # x[a:b] as float32, a fresh array
    sample = gather(x, sorted_rows)          # x[rows] as float32, read block by block

Pages of a file mapping that a process has read count in its resident memory until the kernel
needs them back, so streaming a 1 GB float16 matrix block by block would still show ~1 GB
resident at the end. After each copy, the pages of a read-only `numpy.memmap` (as `np.load(...,
mmap_mode="r")` gives) are dropped from the process with `madvise(MADV_DONTNEED)`: they stay in
the OS page cache (a reread costs a minor fault, not disk I/O) and the process keeps one block.
Any other array is read as it is. Scattered rows cost more than their bytes: each page fault on
a file mapping maps its neighbours too (the kernel's fault-around, 64 KB), so `gather` copies at
most SCATTER rows between releases.
"""

from __future__ import annotations

import itertools
import mmap

import numpy as np

BLOCK = 65_536
SCATTER = 512           # rows per copy in `gather`: at most ~32 MB of faulted-around pages


def release(x: np.ndarray) -> None:
    """Drop the pages of x's read-only file mapping from this process (no-op otherwise)."""
    m = getattr(x, "_mmap", None)      # numpy.memmap's mapping; views of it share it
    if m is not None and getattr(x, "mode", None) == "r" and hasattr(mmap, "MADV_DONTNEED"):
        m.madvise(mmap.MADV_DONTNEED)


def copy_rows(x: np.ndarray, rows, dtype=np.float32) -> np.ndarray:
    """x[rows] (a slice or an index array) as a new C-contiguous `dtype` array; x's mapped
    pages are released afterwards."""
    out = np.array(x[rows], dtype=dtype, order="C")
    release(x)
    return out


def gather(x: np.ndarray, rows: np.ndarray, dtype=np.float32, block: int = BLOCK) -> np.ndarray:
    """x[rows] for sorted row indices, read `block` rows of x (and at most SCATTER of `rows`) at
    a time (resident: the result plus one block of pages)."""
    rows = np.asarray(rows, dtype=np.int64)
    if np.any(np.diff(rows) < 0):
        raise ValueError("gather needs sorted row indices")
    out = np.empty((len(rows), *x.shape[1:]), dtype=dtype)
    bounds = np.searchsorted(rows, np.arange(0, x.shape[0] + block, block))
    for lo, hi in itertools.pairwise(bounds):
        for a in range(lo, hi, SCATTER):
            b = min(hi, a + SCATTER)
            out[a:b] = copy_rows(x, rows[a:b], dtype)
    return out


def reserved_memmap(path, dtype, shape) -> np.memmap:
    """`np.lib.format.open_memmap(path, "w+")` with the file's blocks reserved before anything
    is written: a fresh mapping is a sparse file, and writing its pages on a full disk (or past
    a file-size limit) kills the process with SIGBUS; reserving them first raises the OSError
    (ENOSPC, EFBIG) naming the file instead."""
    import os

    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        del out
        raise OSError(e.errno, os.strerror(e.errno), str(path)) from None
    finally:
        os.close(fd)
    return out
