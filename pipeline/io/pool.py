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

Which files are read is `inputs.py`'s (each once, every file not read listed in pool.json's
`skipped_files`); pool.json's checks are `poolfile.py`'s; rows no chat template can render are
quarantined (`models/chat.py: RenderCheck`). This module is longer than most (~600 lines)
because it is both sides of one on-disk format, the reader (`Pool`) and the writer (`ingest`),
whose invariants (shard entries, counts, fingerprints) must change together; every command and
many modules import both from here.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from thresher.pipeline.artifacts import file_fingerprint, write_json_atomic
from thresher.pipeline.io.guard import check_outputs, is_pool, write_error
from thresher.pipeline.io.inputs import Found, walk_inputs
from thresher.pipeline.io.outputs import clean_stale, replace_dir, temp_name
from thresher.pipeline.io.poolfile import file_stamp, read_pool_json
from thresher.pipeline.io.readers import file_type, read_records
from thresher.pipeline.io.schema import POOL_SCHEMA, SHAPES, RowError, detect_shape, to_canonical

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
    skipped: list[dict] = field(default_factory=list)   # files found and not read: path, reason

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


def _id_key(rid: str) -> bytes:
    return hashlib.blake2b(rid.encode(), digest_size=12).digest()


class _Ids:
    """Unique ids: a repeated id is kept as `<id>#dup<k>`, k the smallest suffix not yet taken
    (so `a#dup1`, `a`, `a` gives `a#dup1`, `a`, `a#dup2`), and logged."""

    def __init__(self, log):
        self.log, self.seen, self.next_k, self.renamed = log, set(), {}, 0

    def claim(self, row: dict, path: Path, where: str) -> bool:
        """Make row["id"] unique; True when it had to be renamed."""
        rid, key = row["id"], _id_key(row["id"])
        renamed = key in self.seen
        if renamed:
            k = self.next_k.get(rid, 0)
            while True:
                k += 1
                new_id = f"{rid}#dup{k}"
                key = _id_key(new_id)
                if key not in self.seen:
                    break
            self.next_k[rid] = k
            self.log.write(json.dumps({"id": rid, "kept_as": new_id, "file": str(path),
                                       "location": where}, ensure_ascii=False) + "\n")
            row["id"] = new_id
            self.renamed += 1
        self.seen.add(key)
        return renamed


class _ShardWriter:
    """Buffers canonical rows and writes numbered Parquet shards, recording name, rows, bytes
    and sha256 of each for pool.json. A shard never spans two input files (`end_file`)."""

    def __init__(self, directory: Path, rows_per_shard: int):
        self.dir, self.rows_per_shard = directory, rows_per_shard
        self.buffer: list[dict] = []
        self.entries: list[dict] = []

    def _next(self) -> Path:
        return self.dir / f"part-{len(self.entries):05d}.parquet"

    def _record(self, path: Path, rows: int) -> str:
        self.entries.append({"name": path.name, "rows": rows, "bytes": path.stat().st_size,
                             "sha256": file_fingerprint(path)})
        return path.name

    def add(self, row: dict) -> str | None:
        """Buffer a row; the name of the shard it completed, if any."""
        self.buffer.append(row)
        return self.flush() if len(self.buffer) >= self.rows_per_shard else None

    def flush(self) -> str | None:
        if not self.buffer:
            return None
        path = self._next()
        pq.write_table(pa.Table.from_pylist(self.buffer, schema=POOL_SCHEMA), path)
        rows = len(self.buffer)
        self.buffer.clear()
        return self._record(path, rows)

    def copy(self, src: Path) -> str:
        """Take an existing shard (an unchanged input's, from the previous pool) as the next one."""
        self.flush()
        path = self._next()
        shutil.copyfile(src, path)
        return self._record(path, pq.read_metadata(path).num_rows)


def _previous(out: Path, shape: str | None, rows_per_shard: int) -> tuple[dict, dict]:
    """Inputs of the pool at `out` that can be reused (path -> entry), and its quarantine lines
    by file; nothing when ingest options changed or the pool predates per-file shards."""
    info_path = out / "pool.json"
    if not info_path.exists():
        return {}, {}
    try:
        info = Pool(out).info  # also checks its format version and its shards' sizes and rows
    except ValueError:
        return {}, {}  # a damaged previous pool is simply not reused
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
    if any(_id_key(i) in seen for i in ids):
        return None
    return ids


class _Run:
    """The state of one ingest: the open quarantine and duplicate logs, ids, shards, and what an
    earlier pool at the output path offers for reuse."""

    def __init__(self, tmp: Path, out: Path, shape, encoding, rows_per_shard, progress, reuse):
        self.out, self.shape, self.encoding, self.progress = out, shape, encoding, progress
        self.qf = open(tmp / "quarantine.jsonl", "w", encoding="utf-8")  # noqa: SIM115
        self.df = open(tmp / "duplicate_ids.jsonl", "w", encoding="utf-8")  # noqa: SIM115
        self.ids = _Ids(self.df)
        self.shards = _ShardWriter(tmp / "shards", rows_per_shard)
        self.prev_inputs, self.prev_quarantine = (_previous(out, shape, rows_per_shard)
                                                  if reuse else ({}, {}))
        self._render = None

    def unrenderable(self, row: dict) -> str | None:
        """Why the default chat template cannot render a chat row (quarantined), or None."""
        if row["kind"] != "chat":
            return None
        if self._render is None:
            from thresher.pipeline.models.chat import RenderCheck

            self._render = RenderCheck.default()
        return self._render.check(row["messages"])

    def close(self) -> None:
        self.qf.close()
        self.df.close()

    def reuse(self, rep: InputReport) -> bool:
        prev = self.prev_inputs.get(rep.path)
        ids = _reuse_input(prev, rep.sha256, self.out, self.ids.seen)
        if ids is None:
            return False
        for s in prev["shards"]:
            rep.shards.append(self.shards.copy(self.out / "shards" / s))
        self.ids.seen.update(_id_key(i) for i in ids)
        self.qf.writelines(self.prev_quarantine.get(rep.path, []))
        for k in ("shape", "read", "kept", "quarantined", "rows_sha256"):
            setattr(rep, k, prev[k])
        rep.reused = True
        return True

    def read(self, path: Path) -> InputReport:
        rep = InputReport(path=str(path), sha256=file_fingerprint(path), shape=self.shape)
        if self.reuse(rep):
            return rep
        file_content = hashlib.sha256()
        file_shape, shapes_seen = self.shape, set()
        for where, rec, err in read_records(path, self.encoding):
            rep.read += 1
            if self.progress is not None:
                self.progress(1)
            if err is None:
                row_shape, file_shape = _row_shape(rec, self.shape, file_shape)
                if row_shape:
                    shapes_seen.add(row_shape)
                try:
                    row = _convert(rec, row_shape, path)
                    err = self.unrenderable(row)
                except RowError as e:
                    err = str(e)
            if err is not None:
                rep.quarantined += 1
                self.qf.write(json.dumps({"file": str(path), "location": _clean(where),
                                          "reason": _clean(err), "snippet": _snippet(rec)},
                                         ensure_ascii=False) + "\n")
                continue
            rep.duplicate_ids += self.ids.claim(row, path, where)
            file_content.update(json.dumps(row, ensure_ascii=False, sort_keys=True).encode())
            rep.kept += 1
            if name := self.shards.add(row):
                rep.shards.append(name)
        rep.shape = "+".join(sorted(shapes_seen)) or self.shape
        if name := self.shards.flush():  # a shard never spans two input files
            rep.shards.append(name)
        rep.rows_sha256 = file_content.hexdigest()
        return rep


def ingest(sources: list[Path], out: Path, shape: str | None = None, rows_per_shard: int = 10_000,
           progress=None, reuse: bool = False, encoding: str | None = None,
           exclude: list[Path] = (), cache: bool = False) -> IngestReport:
    """Read every source file into a new pool at `out` (replacing a pool already there, never
    anything else, and never a directory this ingest reads from).

    reuse: copy what an unchanged input gave the pool already at `out` instead of reading it.
    exclude: paths never read (a recipe's own outputs); like `out`, listed as skipped.
    cache: `out` is in a stage's own artifact directory (a target set's pool, `TargetPool`)."""
    if shape is not None and shape not in SHAPES:
        raise ValueError(f"unknown format {shape!r}; expected one of {', '.join(SHAPES)}")
    if rows_per_shard < 1:
        raise ValueError(f"--rows-per-shard {rows_per_shard}: must be at least 1")
    if encoding is not None:
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise ValueError(f"--encoding {encoding!r}: unknown encoding") from None
    out = Path(out)
    found = _inputs_outside(sources, out, exclude, cache)
    if out.exists() and not (out.is_dir() and (out / "pool.json").exists()):
        raise FileExistsError(f"{out} exists and is not a pool; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tmp = temp_name(out)
    try:
        (tmp / "shards").mkdir(parents=True)
        run = _Run(tmp, out, shape, encoding, rows_per_shard, progress, reuse)
        try:
            report = _ingest_into(found, run, tmp, out, shape, rows_per_shard)
        finally:
            run.close()
        replace_dir(tmp, out, lambda d: (d / "pool.json").exists())
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # Ctrl-C included: no temporary left behind
        named = write_error(e, out) if isinstance(e, OSError) else e
        if named is not e:
            raise named from e
        raise
    return report


def _inputs_outside(sources: list[Path], out: Path, exclude, cache: bool = False) -> Found:
    """The input files, never the output pool (an earlier version of it inside an input
    directory is skipped, so `ingest data --out data/pool` can be rerun) nor `exclude`;
    refuses an output that would replace an input or land inside a pool or a cache."""
    real_out = Path(os.path.realpath(out))
    named = [Path(s) for s in sources if Path(s).exists()]
    for src in named:
        real = Path(os.path.realpath(src))
        # a file inside the pool being replaced (a glob's match: its pool.json, quarantine) is
        # skipped by the walk instead; anything else inside --out would be lost with it
        if real == real_out or (real.is_relative_to(real_out) and not is_pool(real_out)):
            raise ValueError(f"--out {out} would replace the input {src}; write the pool elsewhere")
        if real.is_dir() and (real / "pool.json").exists() and real_out.is_relative_to(real):
            raise ValueError(f"--out {out} lies inside the input pool {src}; write it elsewhere")
    found = walk_inputs([Path(s) for s in sources], exclude=[out, *exclude])
    if not found.files:
        raise ValueError(f"no input files outside --out {out}")
    check_outputs([], inputs=found.files, dir_outputs=[out], pools=[out], cache=cache)
    return found


def _ingest_into(found: Found, run: _Run, tmp: Path, out: Path, shape, rows_per_shard
                 ) -> IngestReport:
    report = IngestReport(pool=str(out), fingerprint="", skipped=found.skipped)
    for path in found.files:
        report.inputs.append(run.read(path))
    report.duplicate_ids = run.ids.renamed
    content = hashlib.sha256()
    for rep in report.inputs:
        content.update(rep.rows_sha256.encode())
    report.fingerprint = content.hexdigest()[:32]
    now = {i.path for i in report.inputs}
    report.removed = [{"path": p, "kept": i["kept"]} for p, i in run.prev_inputs.items()
                      if p not in now]
    write_json_atomic(tmp / "pool.json", {
        "format_version": FORMAT_VERSION,
        "fingerprint": report.fingerprint,
        "read": report.read, "kept": report.kept, "quarantined": report.quarantined,
        "duplicate_ids": report.duplicate_ids,
        "declared_format": shape, "rows_per_shard": rows_per_shard,
        "shards": run.shards.entries,
        "inputs": [vars(i) for i in report.inputs],
        "skipped_files": found.summary(),
    })
    if report.read != report.kept + report.quarantined:  # an invariant: a bug if it fails
        raise AssertionError(f"read {report.read} != kept {report.kept} + quarantined {report.quarantined}")
    return report
