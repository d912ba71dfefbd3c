"""pool.json: read, checked field by field, and watched for replacement while a command runs.

    info = read_pool_json(pool_dir)          # ValueError naming pool.json and the bad field
    stamp = file_stamp(pool_dir / "pool.json")   # compare later: was the pool replaced?

A damaged pool.json (not JSON, not an object, a missing or mistyped field, a shard name that
leaves the shards folder, counts that do not add up) is one error line naming the file and the
field, with the way out: re-run `thresher ingest`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

READABLE_VERSIONS = (1, 2)
COUNTS = ("read", "kept", "quarantined")


class PoolJsonError(ValueError):
    """pool.json cannot be trusted; the message is one line naming it."""


def _fail(path: Path, what: str) -> PoolJsonError:
    return PoolJsonError(f"{path}: damaged pool.json ({what}); re-run `thresher ingest` to "
                         "rebuild the pool")


def _count(info: dict, key: str, path: Path) -> int:
    v = info.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise _fail(path, f"'{key}' is {v!r}, expected a count")
    return v


def _shard(entry: Any, i: int, path: Path) -> dict:
    """One shard entry as {"name", ...}: version 1 listed bare names."""
    e = {"name": entry} if isinstance(entry, str) else entry
    if not isinstance(e, dict) or not isinstance(e.get("name"), str):
        raise _fail(path, f"shards[{i}] has no name")
    name = e["name"]
    if not name.endswith(".parquet") or os.sep in name or "/" in name or name.startswith("."):
        raise _fail(path, f"shards[{i}] name {name!r} is not a shard file name")
    for key in ("rows", "bytes"):
        if key in e and (isinstance(e[key], bool) or not isinstance(e[key], int) or e[key] < 0):
            raise _fail(path, f"shards[{i}].{key} is {e[key]!r}, expected a count")
    if "sha256" in e and not isinstance(e["sha256"], str):
        raise _fail(path, f"shards[{i}].sha256 is {e['sha256']!r}, expected a hash")
    return e


def _inputs(info: dict, path: Path) -> list[dict]:
    inputs = info.get("inputs", [])
    if not isinstance(inputs, list):
        raise _fail(path, "'inputs' is not a list")
    for i, e in enumerate(inputs):
        if not isinstance(e, dict) or not isinstance(e.get("path"), str) \
                or not isinstance(e.get("sha256"), str):
            raise _fail(path, f"inputs[{i}] lacks its path or sha256")
    return inputs


def check_pool_json(info: Any, path: Path) -> dict:
    """`info` (pool.json's content) with shard entries normalised, or PoolJsonError."""
    if not isinstance(info, dict):
        raise _fail(path, f"a JSON {type(info).__name__}, expected an object")
    version = info.get("format_version")
    if version not in READABLE_VERSIONS:
        raise PoolJsonError(
            f"{path}: pool format version {version!r} is not one this thresher reads "
            f"({', '.join(map(str, READABLE_VERSIONS))}); re-run `thresher ingest` with this "
            "version (or upgrade thresher)")
    if not isinstance(info.get("fingerprint"), str) or not info["fingerprint"]:
        raise _fail(path, "no fingerprint")
    read, kept, quarantined = (_count(info, k, path) for k in COUNTS)
    if read != kept + quarantined:
        raise _fail(path, f"read {read} != kept {kept} + quarantined {quarantined}")
    info["duplicate_ids"] = _count({"duplicate_ids": info.get("duplicate_ids", 0)},
                                   "duplicate_ids", path)
    shards = info.get("shards")
    if not isinstance(shards, list):
        raise _fail(path, "'shards' is not a list")
    entries = [_shard(e, i, path) for i, e in enumerate(shards)]
    names = [e["name"] for e in entries]
    if len(set(names)) != len(names):
        raise _fail(path, "a shard is listed twice")
    if all("rows" in e for e in entries) and sum(e["rows"] for e in entries) != kept:
        raise _fail(path, f"its shards hold {sum(e['rows'] for e in entries)} rows, "
                          f"'kept' says {kept}")
    info["inputs"] = _inputs(info, path)
    info["shards"] = entries
    return info


def read_pool_json(pool: Path) -> dict:
    """pool.json of the pool directory `pool`, checked (see `check_pool_json`)."""
    path = Path(pool) / "pool.json"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise _fail(path, f"not JSON: {str(e).splitlines()[0]}") from None
    return check_pool_json(info, path)


def file_stamp(path: Path) -> tuple[int, int, int, int] | None:
    """What changes when a file is replaced or rewritten (device, inode, size, mtime)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns
