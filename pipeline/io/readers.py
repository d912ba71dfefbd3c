"""Streaming readers: JSONL, JSON, Parquet, CSV and TSV, plain or .gz/.zst/.bz2/.xz, in bounded
memory. Which files are read (directory walks, globs) is `inputs.py`'s.

`read_records(path)` yields `(location, record, error)` one row at a time: `record` is the
decoded object, or, when the raw row could not even be decoded (bad bytes, malformed JSON),
its raw text (or None) with `error` giving the reason. Every row of a file is yielded exactly
once, either way; a part of a file that cannot be split into rows any more (a broken JSON array
with no later item boundary, a truncated compressed stream, a corrupt Parquet row group) is
yielded as ONE error entry saying how much was skipped, so it is still counted. Shape detection
and conversion happen in `schema`.

Text encodings: a byte-order mark picks UTF-8, UTF-16 or UTF-32 (and is removed); otherwise
`encoding` (default UTF-8). Bytes that do not decode quarantine their row, not the file.
"""

from __future__ import annotations

import bz2
import codecs
import csv
import gzip
import io
import json
import lzma
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet",
            ".csv": "csv", ".tsv": "tsv"}
COMPRESSIONS = (".gz", ".zst", ".bz2", ".xz")
# our own files beside a subset: never input rows
SIDECARS = (".manifest.json", ".selection.parquet")
BATCH_ROWS = 1024
CHUNK_CHARS = 1 << 20
BOMS = [(codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
        (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
        (codecs.BOM_UTF16_BE, "utf-16")]

Row = tuple[str, "dict | str | None", "str | None"]


def suffixes(path: Path) -> tuple[str, str | None]:
    """(data suffix, compression suffix or None): `a.jsonl.gz` -> ('.jsonl', '.gz')."""
    name = path.name.lower()
    for comp in COMPRESSIONS:
        if name.endswith(comp):
            return Path(name[: -len(comp)]).suffix, comp
    return path.suffix.lower(), None


def file_type(path: Path) -> str:
    suffix, _ = suffixes(Path(path))
    try:
        return SUFFIXES[suffix]
    except KeyError:
        raise ValueError(
            f"{path}: unsupported file type {suffix!r}; expected one of {sorted(SUFFIXES)}"
            f", optionally compressed ({', '.join(COMPRESSIONS)})") from None


def open_binary(path: Path):
    """The file's bytes, decompressed by suffix (.gz, .zst, .bz2, .xz), as a buffered stream."""
    _, comp = suffixes(Path(path))
    if comp == ".gz":
        return gzip.open(path, "rb")
    if comp == ".bz2":
        return bz2.open(path, "rb")
    if comp == ".xz":
        return io.BufferedReader(lzma.open(path, "rb"))
    if comp == ".zst":
        import zstandard

        raw = open(path, "rb")  # noqa: SIM115 - closed by the reader (closefd)
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True,
                                                            closefd=True)
        return io.BufferedReader(reader)
    return open(path, "rb")


def open_text(path: Path, encoding: str | None = None, newline: str | None = "\n"):
    """Decoded text; a BOM wins over `encoding`; undecodable bytes become surrogate escapes
    (found per row by `_bad_text`)."""
    binary = open_binary(path)
    head = binary.peek(4)[:4]
    enc = next((name for bom, name in BOMS if head.startswith(bom)), None) or encoding or "utf-8"
    if enc.replace("_", "-").lower() in ("utf-8", "utf8"):
        enc = "utf-8-sig"  # tolerate a BOM the peek could not see
    return io.TextIOWrapper(binary, encoding=enc, errors="surrogateescape", newline=newline)


def _bad_text(s: str) -> str | None:
    """Why a decoded string cannot be stored (undecodable bytes, lone surrogates), or None."""
    try:
        s.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        ch = s[e.start]
        if "\udc80" <= ch <= "\udcff":
            return (f"invalid UTF-8 (undecodable byte 0x{ord(ch) - 0xDC00:02x} at character "
                    f"{e.start}; for another encoding pass --encoding)")
        return f"lone surrogate U+{ord(ch):04X} at character {e.start} (invalid Unicode)"


# Errors a damaged stream raises while being read: truncated or corrupt compression, a wrong
# encoding that even surrogate escapes cannot carry (UTF-16 with an odd byte count).
def _stream_errors() -> tuple[type[BaseException], ...]:
    errs: list[type[BaseException]] = [OSError, EOFError, UnicodeDecodeError, zlib.error,
                                       lzma.LZMAError]
    try:
        import zstandard

        errs.append(zstandard.ZstdError)
    except ImportError:  # pragma: no cover - zstandard is a dependency
        pass
    return tuple(errs)


def read_records(path: Path, encoding: str | None = None) -> Iterator[Row]:
    path = Path(path)
    kind = file_type(path)
    reader = {"jsonl": _jsonl, "json": _json, "parquet": _parquet, "csv": _csv, "tsv": _tsv}[kind]
    last = "start of file"
    try:
        for row in reader(path, encoding):
            last = row[0]
            yield row
    except _stream_errors() as e:
        yield (f"after {last}", None,
               f"unreadable rest of file ({type(e).__name__}: {e}); nothing after {last} was read")


def _loads(text: str) -> tuple[object, str | None]:
    """json.loads that turns every decoding failure of one value into a reason."""
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        return None, f"malformed JSON: {e.msg} (line {e.lineno} column {e.colno})"
    except ValueError as e:  # e.g. an integer longer than Python's 4300-digit limit
        return None, f"malformed JSON: {e}"
    except RecursionError:
        return None, "malformed JSON: nested too deeply"


def _jsonl(path: Path, encoding: str | None) -> Iterator[Row]:
    with open_text(path, encoding) as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            where = f"line {lineno}"
            bad = _bad_text(line)
            if bad:
                yield where, line.encode("utf-8", "replace").decode("utf-8"), bad
                continue
            rec, err = _loads(line)
            yield where, (line if err else rec), err


class _JsonScanner:
    """Incremental decoding of a top-level JSON array (or of one or more concatenated values)
    with the standard library's decoder, in bounded memory. A malformed item is quarantined and
    reading resumes at the next line that starts an item at the first item's indentation; a
    missing comma between two well-formed items is tolerated."""

    def __init__(self, f):
        self.f, self.buf, self.pos, self.line, self.eof = f, "", 0, 1, False
        self.dec = json.JSONDecoder()

    def fill(self) -> bool:
        chunk = self.f.read(CHUNK_CHARS)
        if not chunk:
            self.eof = True
            return False
        self.buf = self.buf[self.pos:] + chunk
        self.pos = 0
        return True

    def skip_ws(self) -> str:
        """Advance past whitespace; the next character, or '' at the end of the file."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.line += self.buf[self.pos] == "\n"
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.fill():
                return ""

    def column(self) -> int:
        return self.pos - (self.buf.rfind("\n", 0, self.pos) + 1)

    def decode(self) -> tuple[object, str | None, str]:
        """(value, error, raw text) of the value at pos, reading more as needed."""
        while True:
            try:
                value, end = self.dec.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                if not self.eof and self.fill():
                    continue  # the value may straddle the chunk boundary
                return None, f"malformed JSON: {e.msg}", self.buf[self.pos:self.pos + 300]
            except ValueError as e:
                return None, f"malformed JSON: {e}", self.buf[self.pos:self.pos + 300]
            except RecursionError:
                return None, "malformed JSON: nested too deeply", self.buf[self.pos:self.pos + 300]
            raw = self.buf[self.pos:end]
            self.line += raw.count("\n")
            self.pos = end
            return value, None, raw

    def resync(self, indent: int) -> tuple[int, int] | None:
        """Skip to the next line whose first non-blank character is '{' or '[' indented at most
        `indent` (deeper lines are nested values); returns (lines skipped, characters skipped),
        or None when the file ends first."""
        pattern = re.compile(r"\n([ \t]*)[\[{]")
        start_line, skipped = self.line, 0
        search_from = self.pos + 1
        while True:
            for m in pattern.finditer(self.buf, search_from):
                if len(m.group(1)) <= indent:
                    self.line += self.buf.count("\n", self.pos, m.start(1))
                    skipped += m.start(1) - self.pos
                    self.pos = m.start(1)
                    return self.line - start_line, skipped
            # keep the last few characters: a match may straddle the boundary
            keep = max(self.pos, len(self.buf) - 64)
            self.line += self.buf.count("\n", self.pos, keep)
            skipped += keep - self.pos
            self.pos = keep
            search_from = 0
            if not self.fill():
                self.line += self.buf.count("\n", self.pos)
                skipped += len(self.buf) - self.pos
                self.pos = len(self.buf)
                return None


def _item(where: str, value, err: str | None, raw: str) -> Row:
    if err:
        return where, raw, err
    bad = _bad_text(raw)
    if bad:
        return where, raw.encode("utf-8", "replace").decode("utf-8"), bad
    return where, value, None


def _json(path: Path, encoding: str | None) -> Iterator[Row]:
    with open_text(path, encoding, newline="") as f:
        s = _JsonScanner(f)
        first = s.skip_ws()
        if not first:
            return
        if first == "[":
            s.pos += 1
            yield from _json_array(s)
        else:
            yield from _json_values(s)


def _json_values(s: _JsonScanner) -> Iterator[Row]:
    """One object, or several concatenated (JSON Lines saved as .json)."""
    n = 0
    while s.skip_ws():
        n += 1
        where = f"item {n} (line {s.line})"
        value, err, raw = s.decode()
        if err:
            yield _skip(s, where, err, raw, 0)
            if s.pos >= len(s.buf) and s.eof:
                return
            continue
        yield _item(where, value, err, raw)


def _skip(s: _JsonScanner, where: str, err: str, raw: str, indent: int) -> Row:
    """The quarantine entry for a malformed item, after moving to the next item boundary; the
    entry says how much text it covers (one entry, however many items that text held)."""
    at = s.line
    skipped = s.resync(indent)
    if skipped is None:
        reason = f"{err}; rest of file not read (lines {at}-{s.line}: no later item boundary)"
        return where, raw, reason
    return where, raw, f"{err}; skipped lines {at}-{s.line - 1} up to the next item"


def _json_array(s: _JsonScanner) -> Iterator[Row]:
    item, indent = 0, None
    while True:
        c = s.skip_ws()
        if c == "]":
            s.pos += 1
            if s.skip_ws():
                yield (f"line {s.line}", s.buf[s.pos:s.pos + 300],
                       "text after the closing ']' of the array; not read")
            return
        if not c:
            if item == 0:
                yield "line 1", None, "malformed JSON: unterminated array"
            return  # items read so far are complete; only the closing ']' is missing
        if item > 0 and c == ",":
            s.pos += 1
            c = s.skip_ws()
            if c == "]":  # a trailing comma
                continue
        item += 1
        if indent is None:
            indent = s.column()
        where = f"item {item} (line {s.line})"
        value, err, raw = s.decode()
        if err:
            yield _skip(s, where, err, raw, indent)
            if s.pos >= len(s.buf) and s.eof:
                return
            continue
        yield _item(where, value, err, raw)


def _parquet(path: Path, encoding: str | None) -> Iterator[Row]:
    src = path
    if suffixes(path)[1]:  # Parquet needs random access: decompress into memory-backed temp
        import tempfile

        src = tempfile.TemporaryFile()  # noqa: SIM115 - closed when the generator ends
        with open_binary(path) as f:
            while chunk := f.read(1 << 22):
                src.write(chunk)
        src.seek(0)
    try:
        pf = pq.ParquetFile(src)
    except (pa.ArrowException, OSError, ValueError) as e:
        yield "whole file", None, f"unreadable Parquet file ({e}); no row was read"
        return
    n = 0
    for rg in range(pf.num_row_groups):
        size, done = pf.metadata.row_group(rg).num_rows, 0
        try:
            for batch in pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[rg]):
                for rec in batch.to_pylist():
                    n, done = n + 1, done + 1
                    yield f"row {n}", rec, None
        except (pa.ArrowException, OSError, ValueError, OverflowError) as e:
            left = size - done
            yield (f"rows {n + 1}-{n + left}", None,
                   f"unreadable Parquet row group {rg} ({e}); its {left} remaining rows skipped")
            n += left


def _tsv(path: Path, encoding: str | None) -> Iterator[Row]:
    return _csv(path, encoding, delimiter="\t")


def _csv(path: Path, encoding: str | None, delimiter: str = ",") -> Iterator[Row]:
    csv.field_size_limit(1 << 30)
    with open_text(path, encoding, newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield "line 1", None, f"unreadable CSV header ({e}); no row was read"
            return
        bad = next((_bad_text(h) for h in header if _bad_text(h)), None)
        dups = sorted({h for h in header if header.count(h) > 1})
        end = reader.line_num
        while True:
            start = end + 1
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                end = reader.line_num
                yield f"lines {start}-{end}", None, f"malformed CSV: {e}"
                continue
            end = reader.line_num
            if not fields:  # a blank line is not a row
                continue
            where = f"line {start}" if start == end else f"lines {start}-{end}"
            raw = delimiter.join(fields)[:300]
            reason = bad and f"header: {bad}"
            if dups:
                reason = f"the header repeats column(s) {', '.join(dups)}; values would be lost"
            elif len(fields) != len(header):
                reason = f"row has {len(fields)} fields, the header has {len(header)}"
            else:
                reason = reason or next((_bad_text(v) for v in fields if _bad_text(v)), None)
            if reason:
                yield where, raw.encode("utf-8", "replace").decode("utf-8"), reason
            else:  # an empty cell is an absent value
                yield where, {k: v for k, v in zip(header, fields) if v != ""}, None
