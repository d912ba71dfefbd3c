"""The canonical row: one shape for every input format.

A canonical row is a dict with
    id        str   the row's own id, else a content hash (``h-`` + 16 hex digits)
    source    str   the row's ``source`` field, else the input file's stem
    kind      str   "chat" (has ``messages``) or "text" (plain pretraining text)
    messages  list[{"role", "content"}] or None
    text      str or None
    meta      str   JSON object of every original field not consumed above (nothing is lost);
                    fields of a turn beyond role and content (OpenAI content parts, tool calls,
                    `name`, `weight`...) under "_turn_fields": {turn index: {field: value}}

`to_canonical` raises `RowError` with a human-readable reason for anything it cannot accept;
readers turn that into a quarantine entry.
"""

from __future__ import annotations

import hashlib
import json
import math
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
    """Which input shape a record has, or None when no known key holds a value (a null column
    of a table format, e.g. Parquet with both `instruction` and `text`, is not a key)."""
    def has(key: str) -> bool:
        return record.get(key) is not None

    if has("messages"):
        return "messages"
    if has("conversations"):
        return "sharegpt"
    if has("instruction") or has("output"):
        return "alpaca"
    if has("text"):
        return "text"
    return None


def _require_str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise RowError(f"{what} is {type(value).__name__}, expected a string")
    return value


TURN_FIELDS = "_turn_fields"  # meta key: per-turn fields beyond role and content, by turn index


def _part_text(part: Any, where: str) -> str | None:
    """Text of one OpenAI content part; None for a non-text part (image, audio...)."""
    if isinstance(part, str):
        return part
    if not isinstance(part, dict):
        raise RowError(f"{where} is {type(part).__name__}, expected a content part object")
    if part.get("type", "text") == "text" and isinstance(part.get("text"), str):
        return part["text"]
    return None


def _render_tool_call(call: Any) -> str:
    """A tool call as the text a chat template shows (Hermes/SmolLM style), for scoring."""
    fn = call.get("function", call) if isinstance(call, dict) else call
    if isinstance(fn, dict):
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                pass
        fn = {"name": fn.get("name"), "arguments": args}
    return "<tool_call>\n" + json.dumps(fn, ensure_ascii=False, default=str) + "\n</tool_call>"


def _turn_content(turn: dict, content_key: str, where: str) -> tuple[str, bool]:
    """(text of a turn, whether the original content was not a plain string). Content parts are
    joined (text parts only); tool calls are rendered after the text."""
    content = turn.get(content_key)
    structured = not isinstance(content, str)
    if isinstance(content, list):
        texts = [_part_text(p, f"{where}.{content_key}[{j}]") for j, p in enumerate(content)]
        content = "\n".join(t for t in texts if t is not None)
    elif content is None:
        content = ""
    elif not isinstance(content, str):
        raise RowError(f"{where}.{content_key} is {type(content).__name__}, expected a string "
                       "or a list of content parts")
    calls = turn.get("tool_calls") or ([turn["function_call"]] if turn.get("function_call") else [])
    if calls:
        if not isinstance(calls, list):
            raise RowError(f"{where}.tool_calls is {type(calls).__name__}, expected a list")
        content = "\n".join([c for c in [content] if c.strip()] + [_render_tool_call(c) for c in calls])
    return content, structured


def _messages_from(turns: Any, role_key: str, content_key: str, field: str) -> tuple[list[dict], dict]:
    """(turns as {role, content}, {turn index: the turn's other fields}) - nothing is dropped."""
    if isinstance(turns, str):  # CSV and some Parquet files carry the list as a JSON string
        try:
            turns = json.loads(turns)
        except (ValueError, RecursionError) as e:
            raise RowError(f"'{field}' is a string that is not JSON: {e}") from None
    if not isinstance(turns, list):
        raise RowError(f"'{field}' is {type(turns).__name__}, expected a list")
    out, extras = [], {}
    for i, turn in enumerate(turns):
        where = f"'{field}[{i}]'"
        if not isinstance(turn, dict):
            raise RowError(f"{where} is {type(turn).__name__}, expected an object")
        if role_key not in turn:
            raise RowError(f"{where} lacks '{role_key}'")
        if content_key not in turn and not turn.get("tool_calls") and not turn.get("function_call"):
            raise RowError(f"{where} lacks '{content_key}'")
        role = ROLES.get(str(turn[role_key]).lower())
        if role is None:
            raise RowError(f"{where} has unknown role {turn[role_key]!r}")
        content, structured = _turn_content(turn, content_key, where)
        out.append({"role": role, "content": content})
        extra = {k: v for k, v in turn.items() if k not in (role_key, content_key)}
        if structured and content_key in turn:
            extra[content_key] = turn[content_key]  # the original parts (or null), verbatim
        if extra:
            extras[str(i)] = extra
    return out, extras


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
    roles = [m["role"] for m in msgs]
    if "user" not in roles:
        raise RowError("conversation has no user turn")
    if "assistant" not in roles:
        raise RowError("conversation has no assistant turn")
    first = roles.index("assistant")
    if first < roles.index("user"):
        raise RowError(f"turn {first} (assistant) comes before any user turn: no prompt to "
                       "answer (a chat template cannot render the reply's prompt)")


def content_hash(kind: str, messages: list[dict] | None, text: str | None) -> str:
    payload = json.dumps(messages if kind == "chat" else text, ensure_ascii=False, sort_keys=True)
    return "h-" + hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def _check_text(value: str, what: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RowError(f"{what} holds invalid Unicode (lone surrogate or undecodable byte at "
                       f"character {e.start})") from None


def _finite(obj: Any) -> Any:
    """JSON has no NaN/Infinity: such floats are kept as the strings "NaN", "Infinity"."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj).replace("inf", "Infinity").replace("nan", "NaN")
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _meta_json(meta: dict) -> str:
    try:
        try:
            out = json.dumps(meta, ensure_ascii=False, sort_keys=True, default=str, allow_nan=False)
        except ValueError:
            out = json.dumps(_finite(meta), ensure_ascii=False, sort_keys=True, default=str)
    except RecursionError:
        raise RowError("a field is nested too deeply") from None
    except TypeError as e:  # e.g. keys of mixed types from a Parquet map column
        raise RowError(f"a field cannot be stored as JSON: {e}") from None
    _check_text(out, "a field")
    return out


def _chat(record: dict, shape: str) -> tuple[list[dict], dict]:
    if shape == "messages":
        if "messages" not in record:
            raise RowError("row is missing 'messages'")
        messages, extras = _messages_from(record["messages"], "role", "content", "messages")
    elif shape == "sharegpt":
        if "conversations" not in record:
            raise RowError("row is missing 'conversations'")
        messages, extras = _messages_from(record["conversations"], "from", "value", "conversations")
    else:
        messages, extras = _alpaca_messages(record), {}
    validate_messages(messages)
    for i, m in enumerate(messages):
        _check_text(m["content"], f"turn {i}")
    return messages, extras


CANONICAL = {"kind", "n_chars", "meta"}   # columns of a pool row beyond the input's own


def _unwrap_canonical(record: dict) -> dict:
    """A row thresher wrote in its canonical shape (a pool shard, a `--format parquet` or `hf`
    subset) as the record it came from: `meta`'s fields back at the top level, so that reading
    it again does not wrap `meta` in another `meta`."""
    if not (CANONICAL <= record.keys() and record.get("kind") in ("chat", "text")
            and isinstance(record["meta"], str)):
        return record
    try:
        inner = json.loads(record["meta"]) if record["meta"] else {}
    except (ValueError, RecursionError):
        return record
    if not isinstance(inner, dict):
        return record
    outer = {k: v for k, v in record.items() if k not in CANONICAL
             and not (k in ("messages", "text") and v is None)}
    merged = {**inner, **outer}
    if "source" in inner:   # an unusable original source, kept in meta: the original wins
        merged["source"] = inner["source"]
    return merged


def to_canonical(record: Any, shape: str, default_source: str) -> dict:
    """Convert one decoded record of the given shape into a canonical row, or raise RowError."""
    if not isinstance(record, dict):
        raise RowError(f"record is {type(record).__name__}, expected a JSON object")
    if not record:
        raise RowError("empty object")
    record = _unwrap_canonical(record)
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    extras: dict = {}
    if shape == "text":
        if "text" not in record or record["text"] is None:
            raise RowError("text row is missing 'text'")
        text = _require_str(record["text"], "'text'")
        if not text.strip():
            raise RowError("empty text")
        _check_text(text, "'text'")
        kind, messages = "text", None
    else:
        messages, extras = _chat(record, shape)
        kind, text = "chat", None

    rid = record.get("id")
    if rid is None or (isinstance(rid, str) and not rid.strip()):
        rid = content_hash(kind, messages, text)
    elif isinstance(rid, bool) or not isinstance(rid, str | int):
        raise RowError(f"'id' is {type(rid).__name__}, expected a string or integer")
    rid = str(rid)
    _check_text(rid, "'id'")
    source = record.get("source")
    consumed = set(CONSUMED[shape])
    if isinstance(source, str) and source.strip():
        _check_text(source, "'source'")
    else:  # not a usable source: keep whatever it was in meta
        consumed.discard("source")
        source = default_source
    meta = {k: v for k, v in record.items() if k not in consumed}
    if extras:
        if TURN_FIELDS in meta:
            raise RowError(f"field {TURN_FIELDS!r} is reserved for per-turn fields")
        meta[TURN_FIELDS] = extras
    n_chars = len(text) if kind == "text" else sum(len(m["content"]) for m in messages)
    return {
        "id": rid,
        "source": source,
        "kind": kind,
        "messages": messages,
        "text": text,
        "n_chars": n_chars,
        "meta": _meta_json(meta),
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
