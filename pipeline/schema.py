"""The canonical row: one shape for every input format.

A canonical row is a dict with
    id        str   the row's own id, else a content hash (``h-`` + 16 hex digits)
    source    str   the row's ``source`` field, else the input file's stem
    kind      str   "chat" (has ``messages``) or "text" (plain pretraining text)
    messages  list[{"role", "content"}] or None
    text      str or None
    meta      str   JSON object of every original field not consumed above (nothing is lost)

`to_canonical` raises `RowError` with a human-readable reason for anything it cannot accept;
readers turn that into a quarantine entry.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa

SHAPES = ("messages", "sharegpt", "alpaca", "text")

POOL_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("kind", pa.string()),
        ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("text", pa.string()),
        ("n_chars", pa.int64()),
        ("meta", pa.string()),
    ]
)

ROLES = {
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant",
    "chatgpt": "assistant", "function_call": "assistant",
    "system": "system",
    "tool": "tool", "observation": "tool", "function": "tool", "ipython": "tool",
}


class RowError(ValueError):
    """A row that cannot be converted; the message is the quarantine reason."""


def detect_shape(record: dict) -> str | None:
    """Which input shape a record has, or None when no known key is present."""
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record or "output" in record:
        return "alpaca"
    if "text" in record:
        return "text"
    return None


def _require_str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise RowError(f"{what} is {type(value).__name__}, expected a string")
    return value


def _messages_from(turns: Any, role_key: str, content_key: str, field: str) -> list[dict]:
    if isinstance(turns, str):  # CSV and some Parquet files carry the list as a JSON string
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError as e:
            raise RowError(f"'{field}' is a string that is not JSON: {e.msg}") from None
    if not isinstance(turns, list):
        raise RowError(f"'{field}' is {type(turns).__name__}, expected a list")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RowError(f"'{field}[{i}]' is {type(turn).__name__}, expected an object")
        if role_key not in turn or content_key not in turn:
            raise RowError(f"'{field}[{i}]' lacks '{role_key}' or '{content_key}'")
        role = ROLES.get(str(turn[role_key]).lower())
        if role is None:
            raise RowError(f"'{field}[{i}]' has unknown role {turn[role_key]!r}")
        content = _require_str(turn[content_key], f"'{field}[{i}].{content_key}'")
        out.append({"role": role, "content": content})
    return out


def _alpaca_messages(rec: dict) -> list[dict]:
    for key in ("instruction", "output"):
        if key not in rec or rec[key] is None:
            raise RowError(f"alpaca row is missing '{key}'")
    instruction = _require_str(rec["instruction"], "'instruction'")
    output = _require_str(rec["output"], "'output'")
    extra = rec.get("input") or ""
    extra = _require_str(extra, "'input'")
    msgs: list[dict] = []
    if rec.get("system"):
        msgs.append({"role": "system", "content": _require_str(rec["system"], "'system'")})
    for pair in rec.get("history") or []:  # LLaMA-Factory's alpaca extension
        if not (isinstance(pair, list | tuple) and len(pair) == 2):
            raise RowError("'history' entries must be [user, assistant] pairs")
        msgs.append({"role": "user", "content": _require_str(pair[0], "'history' user turn")})
        msgs.append({"role": "assistant", "content": _require_str(pair[1], "'history' reply")})
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    msgs.append({"role": "user", "content": user})
    msgs.append({"role": "assistant", "content": output})
    return msgs


CONSUMED = {
    "messages": {"id", "source", "messages"},
    "sharegpt": {"id", "source", "conversations"},
    "alpaca": {"id", "source", "instruction", "input", "output", "system", "history"},
    "text": {"id", "source", "text"},
}


def validate_messages(msgs: list[dict]) -> None:
    if not msgs:
        raise RowError("empty conversation")
    for i, m in enumerate(msgs):
        if not m["content"].strip():
            raise RowError(f"empty content in turn {i} ({m['role']})")
    if not any(m["role"] == "user" for m in msgs):
        raise RowError("conversation has no user turn")
    if not any(m["role"] == "assistant" for m in msgs):
        raise RowError("conversation has no assistant turn")


def content_hash(kind: str, messages: list[dict] | None, text: str | None) -> str:
    payload = json.dumps(messages if kind == "chat" else text, ensure_ascii=False, sort_keys=True)
    return "h-" + hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def to_canonical(record: Any, shape: str, default_source: str) -> dict:
    """Convert one decoded record of the given shape into a canonical row, or raise RowError."""
    if not isinstance(record, dict):
        raise RowError(f"record is {type(record).__name__}, expected a JSON object")
    if not record:
        raise RowError("empty object")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    if shape == "text":
        if "text" not in record or record["text"] is None:
            raise RowError("text row is missing 'text'")
        text = _require_str(record["text"], "'text'")
        if not text.strip():
            raise RowError("empty text")
        kind, messages = "text", None
    else:
        if shape == "messages":
            if "messages" not in record:
                raise RowError("row is missing 'messages'")
            messages = _messages_from(record["messages"], "role", "content", "messages")
        elif shape == "sharegpt":
            if "conversations" not in record:
                raise RowError("row is missing 'conversations'")
            messages = _messages_from(record["conversations"], "from", "value", "conversations")
        else:
            messages = _alpaca_messages(record)
        validate_messages(messages)
        kind, text = "chat", None

    rid = record.get("id")
    if rid is None or (isinstance(rid, str) and not rid.strip()):
        rid = content_hash(kind, messages, text)
    elif isinstance(rid, bool) or not isinstance(rid, str | int):
        raise RowError(f"'id' is {type(rid).__name__}, expected a string or integer")
    source = record.get("source")
    if not isinstance(source, str) or not source:
        source = default_source
    meta = {k: v for k, v in record.items() if k not in CONSUMED[shape]}
    try:
        meta_json = json.dumps(meta, ensure_ascii=False, sort_keys=True, default=str)
        meta_json.encode("utf-8")  # lone surrogates (from undecodable bytes) fail here
    except UnicodeEncodeError:
        raise RowError("invalid UTF-8 in a field") from None
    n_chars = len(text) if kind == "text" else sum(len(m["content"]) for m in messages)
    return {
        "id": str(rid),
        "source": source,
        "kind": kind,
        "messages": messages,
        "text": text,
        "n_chars": n_chars,
        "meta": meta_json,
    }


def row_text(row: dict, part: str = "conversation") -> str:
    """Text of a canonical row for embedding or hashing.

    part: "first_user" (first user turn), "conversation" (all turns), or "response"
    (assistant turns). Plain-text rows return their text for every part.
    """
    if row["kind"] == "text" or row.get("messages") is None:
        return row["text"]
    msgs = row["messages"]
    if part == "first_user":
        return next(m["content"] for m in msgs if m["role"] == "user")
    if part == "response":
        return "\n\n".join(m["content"] for m in msgs if m["role"] == "assistant")
    if part == "conversation":
        return "\n\n".join(f"{m['role']}: {m['content']}" for m in msgs)
    raise ValueError(f"unknown text part {part!r}; expected first_user, conversation or response")
