"""Damaged files in the work directory, found and named when reading the cache fails.

    with cache_guard(lambda: [artifact_dir, shard_dir], store.root):
        out = stage.load(run)          # a truncated .npy: "mmap length is greater than file size"

A cache file cut short (a full disk, a copy interrupted) or overwritten fails deep inside numpy,
pyarrow or polars with a message that names no file. When reading or computing a stage fails,
`cache_guard` checks the stage's cached files (each .npy's header against its size, each
.parquet's footer, each .json) and, when one is damaged, raises one ValueError naming it and
saying how to clear that stage's cache; otherwise the original error goes on unchanged.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np


def _npy_problem(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read(f)
            header = f.tell()
    except (ValueError, OSError, EOFError, SyntaxError) as e:
        return f"not a NumPy array file ({e})"
    if dtype.hasobject:
        return "holds pickled objects, which thresher never writes nor loads"
    want = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = path.stat().st_size
    if size != want:
        return f"{size} bytes, its header says {want}: cut short or overwritten"
    return None


def _parquet_problem(path: Path) -> str | None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pq.read_metadata(path)
    except (pa.ArrowException, OSError, ValueError) as e:
        return f"not a readable Parquet file ({str(e).splitlines()[0]})"
    return None


def _json_problem(path: Path) -> str | None:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, OSError) as e:
        return f"not JSON ({str(e).splitlines()[0]})"
    return None


CHECKS = {".npy": _npy_problem, ".parquet": _parquet_problem, ".json": _json_problem}


def find_damaged(paths: Iterable[Path]) -> tuple[Path, str] | None:
    """The first damaged cache file among `paths` (files, or directories searched through)."""
    for p in paths:
        p = Path(p)
        files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
        for f in files:
            if f.name.startswith("."):      # a temporary being written: not the cache
                continue
            check = CHECKS.get(f.suffix)
            problem = check(f) if check and f.exists() else None
            if problem:
                return f, problem
    return None


@contextlib.contextmanager
def cache_guard(paths: Callable[[], Iterable[Path]], root: Path) -> Iterator[None]:
    """Name a damaged cache file under `paths()` (listed only on failure) of the work directory
    `root` when the block fails; its stage is the file's first folder under `root`."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except Exception as e:
        hit = find_damaged(list(paths()))
        if hit is None:
            raise
        path, problem = hit
        try:
            kind = Path(path).resolve().relative_to(Path(root).resolve()).parts[0]
        except (ValueError, IndexError):
            raise ValueError(f"{path}: damaged cache file ({problem}); delete it and run "
                             "again") from e
        raise ValueError(f"{path}: damaged cache file of the {kind} stage ({problem}); delete "
                         f"{Path(root) / kind} to clear that stage's cache, then run again "
                         "(it is recomputed)") from e
