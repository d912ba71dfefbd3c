"""A pool: a directory of Parquet shards in the canonical schema, plus its accounting.

    POOL/
      pool.json          fingerprint, counts, inputs (path, sha256, shape, read/kept/quarantined)
      shards/part-00000.parquet ...   canonical rows, in input order
      quarantine.jsonl   every row that was not kept: file, location, reason, a snippet
      duplicate_ids.jsonl  rows whose id was already taken: kept under "<id>#dup<k>"

This module is the reading side (`Pool`, and `load_rows` for a file or pool read whole);
`ingest.py` writes pools; pool.json's checks are `poolfile.py`'s.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from thresher.pipeline.artifacts import file_fingerprint
from thresher.pipeline.io.poolfile import file_stamp, read_pool_json
from thresher.pipeline.io.readers import file_type, read_records
from thresher.pipeline.io.schema import POOL_SCHEMA, RowError, detect_shape, to_canonical

FORMAT_VERSION = 2  # 2: per-shard entries {"name", "rows", "bytes", "sha256"} in pool.json
SNIPPET = 300


def _empty_frame() -> pl.DataFrame:
    return pl.from_arrow(POOL_SCHEMA.empty_table())


class Pool:
    """Read side of a pool directory. Opening checks pool.json's format version and every
    shard's size and row count against pool.json (cheap: file sizes and Parquet footers); the
    content hashes are checked once per Pool object, when its rows are first read."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        manifest = self.path / "pool.json"
        if not manifest.is_file():
            what = "no such directory" if not self.path.exists() else "no pool.json"
            raise FileNotFoundError(f"{self.path}: not a pool ({what}); run `thresher ingest` first")
        self._stamp = file_stamp(manifest)
        self.info = read_pool_json(self.path)
        self.entries = self.info["shards"]
        self.shards = [self.path / "shards" / e["name"] for e in self.entries]
        self._by_path = {str(p): e for p, e in zip(self.shards, self.entries)}
        self._hashes_checked = False
        self._check_layout()

    def check_unchanged(self) -> None:
        """ValueError when the pool was replaced (re-ingested) since this object opened it: the
        rows read so far and those still to read would come from two different pools."""
        if file_stamp(self.path / "pool.json") != self._stamp:
            raise ValueError(f"{self.path}: the pool changed while this command ran (another "
                             "`thresher ingest` replaced it); nothing was written: run the "
                             "command again")

    def input_files(self) -> list[Path]:
        """The files this pool was ingested from (the user's data: never an output)."""
        return [Path(i["path"]) for i in self.info["inputs"]]

    def _check_layout(self) -> None:
        for shard, entry in zip(self.shards, self.entries):
            if not shard.is_file():
                raise ValueError(f"{shard}: shard listed in pool.json is missing; re-run ingest")
            size = shard.stat().st_size
            if "bytes" in entry and size != entry["bytes"]:
                raise ValueError(f"{shard}: {size} bytes, pool.json records {entry['bytes']}: the "
                                 "shard was changed or truncated after ingest; re-run ingest")
            try:
                rows = pq.read_metadata(shard).num_rows
            except (pa.ArrowException, OSError) as e:
                raise ValueError(f"{shard}: unreadable shard ({e}); re-run ingest") from None
            if "rows" in entry and rows != entry["rows"]:
                raise ValueError(f"{shard}: {rows} rows, pool.json records {entry['rows']}; "
                                 "re-run ingest")

    def verify_contents(self) -> None:
        """Check every shard's sha256 against pool.json (once per Pool object)."""
        if self._hashes_checked:
            return
        for shard, entry in zip(self.shards, self.entries):
            if "sha256" in entry and file_fingerprint(shard) != entry["sha256"]:
                self.check_unchanged()
                raise ValueError(f"{shard}: content differs from pool.json's sha256: the shard "
                                 "was changed after ingest; re-run ingest")
        self._hashes_checked = True

    def shard_fingerprint(self, shard: Path | str) -> str:
        """The shard's sha256 (from pool.json; hashed from the file for version-1 pools)."""
        entry = self._by_path.get(str(shard)) or self._by_path.get(str(self.path / "shards" / Path(shard).name))
        if entry is None:
            raise ValueError(f"{shard}: not a shard of pool {self.path}")
        if "sha256" not in entry:
            entry["sha256"] = file_fingerprint(self.path / "shards" / entry["name"])
        return entry["sha256"]

    def shard_rows(self, shard: Path | str) -> int:
        """Rows of one shard (from pool.json; the Parquet footer for version-1 pools)."""
        entry = self._by_path.get(str(shard))
        if entry is None:
            raise ValueError(f"{shard}: not a shard of pool {self.path}")
        if "rows" not in entry:
            entry["rows"] = pq.read_metadata(shard).num_rows
        return int(entry["rows"])

    @property
    def fingerprint(self) -> str:
        return self.info["fingerprint"]

    @property
    def n_rows(self) -> int:
        return self.info["kept"]

    def scan(self) -> pl.LazyFrame:
        self.verify_contents()
        if not self.shards:
            return _empty_frame().lazy()
        return pl.scan_parquet([str(s) for s in self.shards])

    def frame(self, columns: list[str] | None = None) -> pl.DataFrame:
        """Columns of every row, in pool order (row index = position)."""
        lf = self.scan()
        with self._reading():
            out = (lf.select(columns) if columns else lf).collect()
        self.check_unchanged()
        return out

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """A shard that vanished or broke mid-read: first, was the whole pool replaced?"""
        try:
            yield
        except (OSError, pa.ArrowException, pl.exceptions.ComputeError):
            self.check_unchanged()
            raise

    def meta_field(self, name: str) -> pl.Series:
        """One original field (a top-level key of `meta`) for every row, as strings."""
        return self.frame(["meta"])["meta"].str.json_path_match(f"$.{name}").alias(name)

    def iter_rows(self, columns: list[str] | None = None, batch_rows: int = 1024) -> Iterator[dict]:
        self.verify_contents()
        for shard in self.shards:
            with self._reading():
                batches = list(pq.ParquetFile(shard).iter_batches(batch_size=batch_rows,
                                                                  columns=columns))
            self.check_unchanged()
            for batch in batches:
                yield from batch.to_pylist()

    def iter_shards(self, columns: list[str] | None = None) -> Iterator[tuple[str, list[dict]]]:
        """(shard name, rows) per shard: the unit at which stages cache and resume."""
        self.verify_contents()
        for shard in self.shards:
            with self._reading():
                table = pq.read_table(shard, columns=columns)
            self.check_unchanged()
            yield shard.stem, table.to_pylist()

    def iter_selected(self, ids: list[str]) -> Iterator[tuple[np.ndarray, pa.Table]]:
        """Shard by shard (one in memory at a time), the rows of `ids` the shard holds, in pool
        order, as an Arrow table, with their positions in `ids`. KeyError, after the last shard,
        when an id is not in the pool; ValueError when `ids` repeat or the pool holds one twice."""
        wanted = pa.array(ids, type=pa.string())
        if pc.count_distinct(wanted).as_py() < len(ids):
            raise ValueError("the ids to read repeat")
        found = np.zeros(len(ids), dtype=bool)
        self.verify_contents()
        for shard in self.shards:
            with self._reading():
                table = pq.read_table(shard)
            self.check_unchanged()
            pos = pc.index_in(table["id"], value_set=wanted)
            keep = pc.is_valid(pos)
            if not pc.any(keep).as_py():
                continue
            at = pos.filter(keep).to_numpy().astype(np.int64)
            vals, counts = np.unique(at, return_counts=True)
            twice = np.concatenate([at[found[at]], vals[counts > 1]])
            if len(twice):
                raise ValueError(f"pool {self.path} holds id {ids[int(twice[0])]!r} twice; "
                                 "re-run ingest")
            found[at] = True
            yield at, table.filter(keep)
        if not found.all():
            self.check_unchanged()
            missing = [ids[i] for i in np.flatnonzero(~found)[:3]]
            raise KeyError(f"{int((~found).sum())} ids not in pool {self.path}, e.g. {missing}")

    def rows(self, ids: list[str]) -> list[dict]:
        """Full canonical rows for `ids`, in the order given."""
        wanted = pl.Series("id", ids, dtype=pl.String)
        with self._reading():
            found = self.scan().filter(pl.col("id").is_in(wanted.implode())).collect()
        self.check_unchanged()
        by_id: dict[str, dict] = {}
        for r in found.to_dicts():
            if r["id"] in by_id:  # only pools from before ids were made unique can have this
                raise ValueError(f"pool {self.path} holds id {r['id']!r} twice; re-run ingest")
            by_id[r["id"]] = r
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise KeyError(f"{len(missing)} ids not in pool {self.path}, e.g. {missing[:3]}")
        return [by_id[i] for i in ids]


def _snippet(rec) -> str | None:
    if rec is None:
        return None
    if isinstance(rec, str):  # the raw text of a row that could not be decoded
        return _clean(rec[:SNIPPET])
    try:
        s = json.dumps(rec, ensure_ascii=False, default=str)
    except (TypeError, ValueError, RecursionError):
        s = repr(rec)[:SNIPPET * 4]
    return _clean(s[:SNIPPET])


def _clean(s: str) -> str:
    """Text safe to write as UTF-8 (undecodable bytes and lone surrogates become U+FFFD)."""
    return s.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def _row_shape(rec, declared: str | None, file_shape: str | None) -> tuple[str | None, str | None]:
    """(shape of this row, shape of the file so far).

    Declared: every row has that shape. Detected: per row, so a file may mix chat rows and
    plain-text rows (as thresher's own subsets do); a row with no recognisable key is judged
    by the file's shape, which gives a precise reason ("row is missing 'messages'")."""
    row_shape = declared or (detect_shape(rec) if isinstance(rec, dict) else None) or file_shape
    return row_shape, file_shape or row_shape


def _convert(rec, row_shape: str | None, path: Path) -> dict:
    if not isinstance(rec, dict):
        raise RowError(f"record is {type(rec).__name__}, expected a JSON object")
    if row_shape is None:
        raise RowError("cannot tell the format (no messages/conversations/instruction/output/"
                       "text field); pass --format" if rec else "empty object")
    try:
        return to_canonical(rec, row_shape, default_source=path.stem)
    except RecursionError:
        raise RowError("nested too deeply") from None


def load_rows(path: Path | str, shape: str | None = None, encoding: str | None = None
              ) -> tuple[list[dict], list[dict]]:
    """Canonical rows of a pool directory or of one small file (a subset, an eval set) held in
    memory, and the rows that could not be used (file, location, reason), which callers report."""
    path = Path(path)
    if path.is_dir():
        return list(Pool(path).iter_rows(["id", "source", "kind", "messages", "text", "n_chars", "meta"])), []
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    rows, bad, file_shape = [], [], shape
    for where, rec, err in read_records(path, encoding):
        if err is None:
            row_shape, file_shape = _row_shape(rec, shape, file_shape)
            try:
                rows.append(_convert(rec, row_shape, path))
                continue
            except RowError as e:
                err = str(e)
        bad.append({"file": str(path), "location": where, "reason": err})
    if not rows:
        raise ValueError(f"{path}: no usable rows ({len(bad)} quarantined"
                         + (f", e.g. {bad[0]['location']}: {bad[0]['reason']})" if bad else ")"))
    return rows, bad


def check_rows_file(path: Path | str, option: str, shape: str | None = None) -> None:
    """Fail before any work when `path` (a target set, an eval set, a subset) is missing, not a
    readable file, or holds no usable row; reads only up to its first usable row."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory; give a file" if path.is_dir() else "no such file"
        raise FileNotFoundError(f"{option} {path}: {what}")
    file_type(path)
    bad, file_shape = [], shape
    for where, rec, err in read_records(path):
        if err is None:
            row_shape, file_shape = _row_shape(rec, shape, file_shape)
            try:
                _convert(rec, row_shape, path)
                return
            except RowError as e:
                err = str(e)
        bad.append(f"{where}: {err}")
    detail = f"{len(bad)} unusable, e.g. {bad[0]}" if bad else "the file is empty"
    raise ValueError(f"{option} {path}: no usable rows ({detail})")
