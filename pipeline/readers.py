"""Streaming readers: JSONL, JSON arrays, Parquet and CSV, in bounded memory.

`read_records(path)` yields `(location, record, error)` one row at a time: `record` is the
decoded object, or, when the raw row could not even be decoded (bad UTF-8, malformed JSON),
the raw text (undecodable bytes replaced) with `error` giving the reason. Shape detection and conversion happen in `schema`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow.csv as pacsv
import pyarrow.parquet as pq

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet",
            ".csv": "csv"}
BATCH_ROWS = 1024
CHUNK_CHARS = 1 << 20


def file_type(path: Path) -> str:
    try:
        return SUFFIXES[path.suffix.lower()]
    except KeyError:
        raise ValueError(
            f"{path}: unsupported file type {path.suffix!r}; expected one of {sorted(SUFFIXES)}"
        ) from None


def expand_inputs(sources: list[Path]) -> list[Path]:
    """Files named directly, plus every supported file under named directories (sorted)."""
    files: list[Path] = []
    for src in sources:
        if src.is_dir():
            found = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
            if not found:
                raise ValueError(f"{src}: directory holds no {'/'.join(sorted(SUFFIXES))} files")
            files.extend(found)
        elif src.is_file():
            file_type(src)
            files.append(src)
        else:
            raise FileNotFoundError(f"{src}: no such file or directory")
    return files


Row = tuple[str, dict | None, str | None]


def read_records(path: Path) -> Iterator[Row]:
    kind = file_type(path)
    yield from {"jsonl": _jsonl, "json": _json_array, "parquet": _parquet, "csv": _csv}[kind](path)


def _jsonl(path: Path) -> Iterator[Row]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"line {lineno}"
            raw = raw.rstrip(b"\r\n")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, raw.decode("utf-8", "replace"), f"invalid UTF-8 at byte {e.start} of the line"
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                yield where, line, f"malformed JSON: {e.msg} (column {e.colno})"
                continue
            yield where, rec, None


def _has_surrogates(obj) -> bool:
    if isinstance(obj, str):
        return any("\udc80" <= ch <= "\udcff" for ch in obj)
    if isinstance(obj, dict):
        return any(_has_surrogates(k) or _has_surrogates(v) for k, v in obj.items())
    if isinstance(obj, list):
        return any(_has_surrogates(v) for v in obj)
    return False


def _json_array(path: Path) -> Iterator[Row]:
    """Incrementally decode a top-level JSON array (or a single object) in bounded memory.

    Undecodable bytes are carried as surrogate escapes so one bad item is quarantined alone.
    A structural error ends the parse: the remainder is reported as one quarantined entry.
    """
    dec = json.JSONDecoder()
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        buf, pos, line, eof = "", 0, 1, False

        def fill() -> bool:
            nonlocal buf, pos, eof
            chunk = f.read(CHUNK_CHARS)
            if not chunk:
                eof = True
                return False
            buf = buf[pos:] + chunk
            pos = 0
            return True

        def skip_ws() -> None:
            nonlocal pos, line
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    line += buf[pos] == "\n"
                    pos += 1
                if pos < len(buf) or not fill():
                    return

        skip_ws()
        if pos >= len(buf):
            return
        if buf[pos] == "{":  # a single object
            fill_all = buf[pos:] + f.read()
            try:
                rec = json.loads(fill_all)
            except json.JSONDecodeError as e:
                yield "item 1 (line 1)", None, f"malformed JSON: {e.msg}"
                return
            yield "item 1 (line 1)", rec, ("invalid UTF-8" if _has_surrogates(rec) else None)
            return
        if buf[pos] != "[":
            yield f"line {line}", None, "malformed JSON: expected '[' or '{' at start of file"
            return
        pos += 1
        item = 0
        while True:
            skip_ws()
            if pos >= len(buf):
                yield f"item {item + 1} (line {line})", None, "malformed JSON: unterminated array"
                return
            if buf[pos] == "]":
                return
            if item > 0:
                if buf[pos] != ",":
                    yield (f"item {item + 1} (line {line})", None,
                           "malformed JSON: expected ',' between items; rest of file not read")
                    return
                pos += 1
                skip_ws()
            item += 1
            where = f"item {item} (line {line})"
            while True:
                try:
                    rec, end = dec.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError as e:
                    if not eof and fill():
                        continue  # the item may straddle the chunk boundary
                    yield where, None, f"malformed JSON: {e.msg}; rest of file not read"
                    return
            line += buf.count("\n", pos, end)
            pos = end
            if _has_surrogates(rec):
                yield where, None, "invalid UTF-8"
            else:
                yield where, rec, None


def _parquet(path: Path) -> Iterator[Row]:
    pf = pq.ParquetFile(path)
    n = 0
    for batch in pf.iter_batches(batch_size=BATCH_ROWS):
        for rec in batch.to_pylist():
            n += 1
            yield f"row {n}", rec, None


def _csv(path: Path) -> Iterator[Row]:
    opts = pacsv.ConvertOptions(strings_can_be_null=False)
    try:
        reader = pacsv.open_csv(path, convert_options=opts,
                                read_options=pacsv.ReadOptions(block_size=1 << 22))
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid with a clear message
        yield "line 1", None, f"unreadable CSV header: {e}"
        return
    n = 0
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001
            yield f"data row {n + 1}", None, f"malformed CSV (rest of file not read): {e}"
            return
        for rec in batch.to_pylist():
            n += 1
            yield f"data row {n}", {k: v for k, v in rec.items() if v != ""}, None
