"""Emit a selection in the shapes downstream trainers read, plus its manifest.

Formats
    messages  JSONL {"id", "messages": [{"role", "content"}]}        TRL, axolotl, torchtune
              (each turn also carries the fields it had on input: tool_calls, name, content
              parts, ...)
    alpaca    JSONL {"id", "instruction", "input", "output", "system", "history"}  LLaMA-Factory
    sharegpt  JSONL {"id", "conversations": [{"from", "value"}]}      LLaMA-Factory, FastChat
    parquet   the canonical rows (id, source, kind, messages, text, n_chars, meta)
    hf        a Hugging Face dataset directory: OUT/data/train-00000-of-00001.parquet (the
              canonical rows); its dataset card OUT/README.md (pipeline/io/card.py) names the
              files, so `datasets.load_dataset(OUT)` and the Hub read it as is. An existing
              OUT is replaced only when thresher wrote it (OUT.manifest.json beside it) and it
              holds nothing else (pipeline/io/guard.py)
Plain-text rows are written as {"id", "text"} in every JSONL shape (pretraining format).
Output is a pure function of the rows and their order: the same selection gives the same bytes.

`write_selection(pool, ids, out, fmt)` writes a pool's rows without holding them: shards are
read one at a time, each selected row is converted as it comes and its line appended to an
anonymous spill file beside the output, then the lines are copied out in `ids` order (memory:
one shard plus two integers per selected row). Parquet and hf keep the selected rows as Arrow
columns (compact, no Python objects) to write them in order.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from thresher.pipeline.artifacts import atomic_path
from thresher.pipeline.io.guard import check_replace_dir
from thresher.pipeline.io.schema import POOL_SCHEMA, TURN_FIELDS

FORMATS = ("messages", "alpaca", "sharegpt", "parquet", "hf")
HF_DATA = "data/train-00000-of-00001.parquet"   # the Hub's file naming for one train shard
HF_OWN = (HF_DATA, "README.md")                 # every file of an hf directory thresher writes
SHAREGPT_ROLE = {"user": "human", "assistant": "gpt", "system": "system", "tool": "observation"}


def to_alpaca(row: dict) -> dict:
    msgs = list(row["messages"])
    system = msgs.pop(0)["content"] if msgs and msgs[0]["role"] == "system" else ""
    if msgs[-1]["role"] != "assistant":
        msgs = msgs[: max(i for i, m in enumerate(msgs) if m["role"] == "assistant") + 1]
    roles = [m["role"] for m in msgs]
    if roles != ["user", "assistant"] * (len(msgs) // 2):
        raise ValueError(
            f"row {row['id']}: turns {roles} do not alternate user/assistant, so the alpaca shape "
            "cannot hold them; write --format messages or sharegpt instead")
    pairs = [[msgs[i]["content"], msgs[i + 1]["content"]] for i in range(0, len(msgs), 2)]
    (instruction, output), history = pairs[-1], pairs[:-1]
    return {"id": row["id"], "instruction": instruction, "input": "", "output": output,
            "system": system, "history": history}


def _turn_fields(row: dict) -> dict:
    """Per-turn fields ingest kept beside role and content (content parts, tool calls, name...)."""
    meta = row.get("meta")
    if not meta or TURN_FIELDS not in meta:
        return {}
    return json.loads(meta).get(TURN_FIELDS) or {}


def to_record(row: dict, fmt: str) -> dict:
    if row["kind"] == "text":
        return {"id": row["id"], "text": row["text"]}
    if fmt == "messages":
        extras = _turn_fields(row)
        return {"id": row["id"], "messages": [{"role": m["role"], "content": m["content"],
                                               **extras.get(str(i), {})}
                                              for i, m in enumerate(row["messages"])]}
    if fmt == "sharegpt":
        return {"id": row["id"], "conversations": [
            {"from": SHAREGPT_ROLE[m["role"]], "value": m["content"]} for m in row["messages"]]}
    if fmt == "alpaca":
        return to_alpaca(row)
    raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def _canonical_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([{k: r[k] for k in POOL_SCHEMA.names} for r in rows],
                                schema=POOL_SCHEMA)


def write_hf(table: pa.Table, out: Path) -> None:
    """A Hugging Face dataset directory at `out`, replacing an earlier one written here."""
    out = Path(out)
    check_replace_dir(out, HF_OWN, manifest_path(out))   # never a directory of other files
    with atomic_path(out) as tmp:
        (tmp / HF_DATA).parent.mkdir(parents=True)
        pq.write_table(table, tmp / HF_DATA)
        if out.exists():   # os.replace cannot put a directory over a non-empty one
            old = out.with_name(f".{out.name}.old{os.getpid()}")
            os.replace(out, old)
            shutil.rmtree(old, ignore_errors=True)


def write_rows(rows: list[dict], out: Path, fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt == "hf":
        return write_hf(_canonical_table(rows), out)
    records = None if fmt == "parquet" else [to_record(r, fmt) for r in rows]  # fail before writing
    with atomic_path(Path(out)) as tmp:
        if fmt == "parquet":
            pq.write_table(_canonical_table(rows), tmp)
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records)


def write_selection(pool, ids: list[str], out: Path, fmt: str,
                    on_row: Callable[[dict], None] | None = None) -> int:
    """The rows `ids` of `pool`, in that order, streamed to `out` in `fmt` (see the module
    doc); `on_row(row)` sees every row, in pool order. Returns the number of rows written."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt in ("parquet", "hf"):
        return _write_selection_table(pool, ids, out, fmt, on_row)
    out = Path(out)
    start, length = np.zeros(len(ids), dtype=np.int64), np.zeros(len(ids), dtype=np.int64)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=out.parent) as spill:   # unlinked: never left behind
        end = 0
        for at, table in pool.iter_selected(ids):
            for p, row in zip(at.tolist(), table.to_pylist()):
                if on_row:
                    on_row(row)
                line = (json.dumps(to_record(row, fmt), ensure_ascii=False) + "\n").encode()
                spill.write(line)
                start[p], length[p], end = end, len(line), end + len(line)
        spill.flush()
        with atomic_path(out) as tmp, open(tmp, "wb") as f:   # fails before this: nothing written
            if end:
                with mmap.mmap(spill.fileno(), 0, access=mmap.ACCESS_READ) as lines:
                    f.writelines(lines[s:s + n] for s, n in zip(start.tolist(), length.tolist()))
    return len(ids)


def _write_selection_table(pool, ids: list[str], out: Path, fmt: str, on_row) -> int:
    parts, where = [], []
    for at, table in pool.iter_selected(ids):
        if on_row:
            for row in table.to_pylist():
                on_row(row)
        parts.append(table.select(POOL_SCHEMA.names).cast(POOL_SCHEMA))
        where.append(at)
    table = pa.concat_tables(parts) if parts else POOL_SCHEMA.empty_table()
    if parts:
        table = table.take(pa.array(np.argsort(np.concatenate(where)))).combine_chunks()
    if fmt == "hf":
        write_hf(table, out)
    else:
        with atomic_path(Path(out)) as tmp:
            pq.write_table(table, tmp)
    return table.num_rows


def manifest_path(out: Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".manifest.json")
