"""A pool: a directory of Parquet shards in the canonical schema, plus its accounting.

    POOL/
      pool.json          fingerprint, counts, inputs (path, sha256, shape, read/kept/quarantined)
      shards/part-00000.parquet ...   canonical rows, in input order
      quarantine.jsonl   every row that was not kept: file, location, reason, a snippet
      duplicate_ids.jsonl  rows whose id was already taken: kept under "<id>#dup<k>"

`ingest` streams the inputs (memory does not grow with their size: rows are converted one at a
time and written shard by shard), and always satisfies read = kept + quarantined.

A shard never spans two input files, so an unchanged input file gives byte-identical shards in
every pool it is part of (per-shard stage caches then reuse its artifacts). With `reuse=True`,
ingesting over an existing pool copies the shards and quarantine entries of every input whose
path and sha256 are unchanged instead of reading it again, and reports the inputs that are gone
(`IngestReport.reused`, `.removed`): incremental curation of a folder that grows.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from thresher.pipeline.artifacts import file_fingerprint, write_json_atomic
from thresher.pipeline.readers import expand_inputs, read_records
from thresher.pipeline.schema import POOL_SCHEMA, SHAPES, RowError, detect_shape, to_canonical

FORMAT_VERSION = 1
SNIPPET = 300


class Pool:
    """Read side of a pool directory."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        manifest = self.path / "pool.json"
        if not manifest.exists():
            raise FileNotFoundError(f"{self.path}: not a pool (no pool.json); run `thresher ingest` first")
        self.info = json.loads(manifest.read_text())
        self.shards = [self.path / "shards" / s for s in self.info["shards"]]
        self._hashed: dict[Path, str] = {}

    @property
    def fingerprint(self) -> str:
        return self.info["fingerprint"]

    def shard_fingerprint(self, shard: Path) -> str:
        """The sha256 of one shard's content (from pool.json when recorded, else hashed once)."""
        recorded = {e["name"]: e.get("sha256") for e in self.info.get("shard_info", [])}
        fp = recorded.get(Path(shard).name) or self._hashed.get(shard)
        if fp is None:
            fp = self._hashed[shard] = file_fingerprint(Path(shard))
        return fp

    @property
    def n_rows(self) -> int:
        return self.info["kept"]

    def scan(self) -> pl.LazyFrame:
        return pl.scan_parquet([str(s) for s in self.shards])

    def frame(self, columns: list[str] | None = None) -> pl.DataFrame:
        """Columns of every row, in pool order (row index = position)."""
        lf = self.scan()
        return (lf.select(columns) if columns else lf).collect()

    def meta_field(self, name: str) -> pl.Series:
        """One original field (a top-level key of `meta`) for every row, as strings."""
        return self.frame(["meta"])["meta"].str.json_path_match(f"$.{name}").alias(name)

    def iter_rows(self, columns: list[str] | None = None, batch_rows: int = 1024) -> Iterator[dict]:
        for shard in self.shards:
            for batch in pq.ParquetFile(shard).iter_batches(batch_size=batch_rows, columns=columns):
                yield from batch.to_pylist()

    def iter_shards(self, columns: list[str] | None = None) -> Iterator[tuple[str, list[dict]]]:
        """(shard name, rows) per shard: the unit at which stages cache and resume."""
        for shard in self.shards:
            yield shard.stem, pq.read_table(shard, columns=columns).to_pylist()

    def rows(self, ids: list[str]) -> list[dict]:
        """Full canonical rows for `ids`, in the order given."""
        wanted = pl.Series("id", ids, dtype=pl.String)
        found = self.scan().filter(pl.col("id").is_in(wanted.implode())).collect()
        by_id = {r["id"]: r for r in found.to_dicts()}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise KeyError(f"{len(missing)} ids not in pool {self.path}, e.g. {missing[:3]}")
        return [by_id[i] for i in ids]


@dataclass
class InputReport:
    path: str
    sha256: str
    shape: str | None
    read: int = 0
    kept: int = 0
    quarantined: int = 0
    duplicate_ids: int = 0
    shards: list[str] = field(default_factory=list)
    rows_sha256: str = ""      # hash of this file's canonical rows (the pool fingerprint's part)
    reused: bool = False       # copied from the previous pool instead of read again


@dataclass
class IngestReport:
    pool: str
    fingerprint: str
    inputs: list[InputReport] = field(default_factory=list)
    duplicate_ids: int = 0
    removed: list[dict] = field(default_factory=list)   # inputs of the previous pool now gone

    @property
    def reused(self) -> list[str]:
        return [i.path for i in self.inputs if i.reused]

    @property
    def read(self) -> int:
        return sum(i.read for i in self.inputs)

    @property
    def kept(self) -> int:
        return sum(i.kept for i in self.inputs)

    @property
    def quarantined(self) -> int:
        return sum(i.quarantined for i in self.inputs)


def _snippet(rec) -> str | None:
    if rec is None:
        return None
    if isinstance(rec, str):  # the raw text of a row that could not be decoded
        return rec[:SNIPPET]
    try:
        s = json.dumps(rec, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        s = repr(rec)
    return s.encode("utf-8", "replace").decode("utf-8")[:SNIPPET]


def _row_shape(rec, declared: str | None, file_shape: str | None) -> tuple[str | None, str | None]:
    """(shape of this row, shape of the file so far).

    Declared: every row has that shape. Detected: per row, so a file may mix chat rows and
    plain-text rows (as thresher's own subsets do); a row with no recognisable key is judged
    by the file's shape, which gives a precise reason ("row is missing 'messages'")."""
    row_shape = declared or (detect_shape(rec) if isinstance(rec, dict) else None) or file_shape
    return row_shape, file_shape or row_shape


def _convert(rec, row_shape: str | None, path: Path) -> dict:
    if row_shape is None:
        raise RowError("cannot tell the format (no messages/conversations/instruction/output/"
                       "text field); pass --format" if rec else "empty object")
    return to_canonical(rec, row_shape, default_source=path.stem)


def load_rows(path: Path | str, shape: str | None = None) -> tuple[list[dict], list[dict]]:
    """Canonical rows of a pool directory or of one small file (a subset, an eval set) held in
    memory, and the rows that could not be used (file, location, reason), which callers report."""
    path = Path(path)
    if path.is_dir():
        return list(Pool(path).iter_rows(["id", "source", "kind", "messages", "text", "n_chars", "meta"])), []
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    rows, bad, file_shape = [], [], shape
    for where, rec, err in read_records(path):
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


def _previous(out: Path, shape: str | None, rows_per_shard: int) -> tuple[dict, dict]:
    """Inputs of the pool at `out` that can be reused (path -> entry), and its quarantine lines
    by file; nothing when ingest options changed or the pool predates per-file shards."""
    info_path = out / "pool.json"
    if not info_path.exists():
        return {}, {}
    info = json.loads(info_path.read_text())
    if info.get("declared_format") != shape or info.get("rows_per_shard") != rows_per_shard:
        return {}, {}
    inputs = {i["path"]: i for i in info["inputs"] if "shards" in i and "rows_sha256" in i}
    quarantine: dict[str, list[str]] = {}
    with open(out / "quarantine.jsonl", encoding="utf-8") as f:
        for line in f:
            quarantine.setdefault(json.loads(line)["file"], []).append(line)
    return inputs, quarantine


def _reuse_input(prev: dict | None, sha256: str, src: Path, seen: set[bytes]) -> list[str] | None:
    """Ids of an unchanged input's shards in the previous pool at `src`, if they can be copied:
    same sha256, no renamed duplicate ids, and none of its ids taken by an earlier input now."""
    if prev is None or prev["sha256"] != sha256 or prev.get("duplicate_ids", 1):
        return None
    if not all((src / "shards" / s).exists() for s in prev["shards"]):
        return None
    ids = [i for s in prev["shards"]
           for i in pq.read_table(src / "shards" / s, columns=["id"])["id"].to_pylist()]
    if any(hashlib.blake2b(i.encode(), digest_size=12).digest() in seen for i in ids):
        return None
    return ids


def ingest(sources: list[Path], out: Path, shape: str | None = None, rows_per_shard: int = 10_000,
           progress=None, reuse: bool = False) -> IngestReport:
    """Read every source file into a new pool at `out` (replacing any pool already there).

    reuse: copy what an unchanged input gave the pool already at `out` instead of reading it."""
    if shape is not None and shape not in SHAPES:
        raise ValueError(f"unknown format {shape!r}; expected one of {', '.join(SHAPES)}")
    files = expand_inputs([Path(s) for s in sources])
    out = Path(out)
    tmp = out.with_name(f".{out.name}.ingest{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "shards").mkdir(parents=True)

    content = hashlib.sha256()
    seen: set[bytes] = set()
    dup_counts: dict[str, int] = {}
    buffer: list[dict] = []
    shards: list[str] = []
    report = IngestReport(pool=str(out), fingerprint="")
    prev_inputs, prev_quarantine = _previous(out, shape, rows_per_shard) if reuse else ({}, {})

    def flush() -> str:
        name = f"part-{len(shards):05d}.parquet"
        pq.write_table(pa.Table.from_pylist(buffer, schema=POOL_SCHEMA), tmp / "shards" / name)
        shards.append(name)
        buffer.clear()
        return name

    with open(tmp / "quarantine.jsonl", "w", encoding="utf-8") as qf, \
            open(tmp / "duplicate_ids.jsonl", "w", encoding="utf-8") as df:
        for path in files:
            rep = InputReport(path=str(path), sha256=file_fingerprint(path), shape=shape)
            report.inputs.append(rep)
            prev = prev_inputs.get(str(path))
            ids = _reuse_input(prev, rep.sha256, out, seen)
            if ids is not None:
                for s in prev["shards"]:
                    name = f"part-{len(shards):05d}.parquet"
                    shutil.copyfile(out / "shards" / s, tmp / "shards" / name)
                    shards.append(name)
                    rep.shards.append(name)
                seen.update(hashlib.blake2b(i.encode(), digest_size=12).digest() for i in ids)
                qf.writelines(prev_quarantine.get(str(path), []))
                for k in ("shape", "read", "kept", "quarantined", "rows_sha256"):
                    setattr(rep, k, prev[k])
                rep.reused = True
                continue
            file_content = hashlib.sha256()
            file_shape, shapes_seen = shape, set()
            for where, rec, err in read_records(path):
                rep.read += 1
                if progress is not None:
                    progress(1)
                if err is None:
                    row_shape, file_shape = _row_shape(rec, shape, file_shape)
                    if row_shape:
                        shapes_seen.add(row_shape)
                    try:
                        row = _convert(rec, row_shape, path)
                    except RowError as e:
                        err = str(e)
                if err is not None:
                    rep.quarantined += 1
                    qf.write(json.dumps({"file": str(path), "location": where, "reason": err,
                                         "snippet": _snippet(rec)},
                                        ensure_ascii=False) + "\n")
                    continue
                key = hashlib.blake2b(row["id"].encode(), digest_size=12).digest()
                if key in seen:
                    k = dup_counts[row["id"]] = dup_counts.get(row["id"], 0) + 1
                    new_id = f"{row['id']}#dup{k}"
                    df.write(json.dumps({"id": row["id"], "kept_as": new_id, "file": str(path),
                                         "location": where}, ensure_ascii=False) + "\n")
                    row["id"] = new_id
                    report.duplicate_ids += 1
                    rep.duplicate_ids += 1
                    key = hashlib.blake2b(new_id.encode(), digest_size=12).digest()
                seen.add(key)
                file_content.update(json.dumps(row, ensure_ascii=False, sort_keys=True).encode())
                buffer.append(row)
                rep.kept += 1
                if len(buffer) >= rows_per_shard:
                    rep.shards.append(flush())
            rep.shape = "+".join(sorted(shapes_seen)) or shape
            if buffer:   # a shard never spans two input files
                rep.shards.append(flush())
            rep.rows_sha256 = file_content.hexdigest()

    for rep in report.inputs:
        content.update(rep.rows_sha256.encode())
    report.fingerprint = content.hexdigest()[:32]
    now = {i.path for i in report.inputs}
    report.removed = [{"path": p, "kept": i["kept"]} for p, i in prev_inputs.items() if p not in now]
    write_json_atomic(tmp / "pool.json", {
        "format_version": FORMAT_VERSION,
        "fingerprint": report.fingerprint,
        "read": report.read, "kept": report.kept, "quarantined": report.quarantined,
        "duplicate_ids": report.duplicate_ids,
        "declared_format": shape, "rows_per_shard": rows_per_shard,
        "shards": shards,
        "inputs": [vars(i) for i in report.inputs],
    })
    assert report.read == report.kept + report.quarantined
    if out.exists():
        if not (out / "pool.json").exists():
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(f"{out} exists and is not a pool; refusing to replace it")
        old = out.with_name(f".{out.name}.old{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    return report
