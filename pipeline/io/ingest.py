"""Ingest: files or folders into a pool (`pool.py` reads it).

    rep = ingest([Path("data/sample/pool")], Path("out/pool"))     # an IngestReport
    rep.read == rep.kept + rep.quarantined

`ingest` streams the inputs (memory does not grow with their size: rows are converted one at a
time and written shard by shard), and always satisfies read = kept + quarantined.

A shard never spans two input files, so an unchanged input file gives byte-identical shards in
every pool it is part of (per-shard stage caches then reuse its artifacts). With `reuse=True`,
ingesting over an existing pool copies the shards and quarantine entries of every input whose
path and sha256 are unchanged instead of reading it again, and reports the inputs that are gone
(`IngestReport.reused`, `.removed`): incremental curation of a folder that grows.

Which files are read is `inputs.py`'s (each once, every file not read listed in pool.json's
`skipped_files`); rows no chat template can render are quarantined (`models/chat.py:
RenderCheck`), so ingest sits above the models layer, and the pool's reader below it.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from thresher.pipeline.artifacts import file_fingerprint, write_json_atomic
from thresher.pipeline.io.guard import check_outputs, is_pool, write_error
from thresher.pipeline.io.inputs import Found, walk_inputs
from thresher.pipeline.io.outputs import clean_stale, replace_dir, temp_name
from thresher.pipeline.io.pool import (
    FORMAT_VERSION,
    Pool,
    _clean,
    _convert,
    _row_shape,
    _snippet,
)
from thresher.pipeline.io.readers import read_records
from thresher.pipeline.io.schema import POOL_SCHEMA, SHAPES, RowError


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

