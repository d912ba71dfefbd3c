"""Property-based tests (hypothesis) of the readers and of ingest's accounting: for any mix of
valid and invalid rows, in every input format and compression, with or without damaged bytes,
every row read is kept or quarantined with a reason, the counts add up, ids are unique and no
field a kept row carried is lost."""

import bz2
import gzip
import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from thresher.pipeline.io.ingest import ingest
from thresher.pipeline.io.pool import Pool
from thresher.pipeline.io.schema import TURN_FIELDS

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
COMPRESS = {"": lambda b: b, ".gz": gzip.compress, ".bz2": bz2.compress,
            ".zst": lambda b: zstandard.ZstdCompressor().compress(b)}

text = st.text(min_size=1, max_size=20).filter(lambda s: s.strip())
keys = st.text(alphabet="abcdefghij_", min_size=1, max_size=6).filter(
    lambda k: k not in {"id", "source", "messages", "conversations", "instruction", "input",
                        "output", "system", "history", "text", TURN_FIELDS})
json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
    max_leaves=8)
extras = st.dictionaries(keys, json_value, max_size=3)


@st.composite
def valid_record(draw, flat=False):
    shape = draw(st.sampled_from(["alpaca", "text"] if flat else
                                 ["messages", "sharegpt", "alpaca", "text"]))
    extra = draw(st.dictionaries(keys, st.text(min_size=1, max_size=8), max_size=2) if flat
                 else extras)
    if shape == "messages":
        rec = {"messages": [{"role": "user", "content": draw(text)},
                            {"role": "assistant", "content": draw(text)}]}
    elif shape == "sharegpt":
        rec = {"conversations": [{"from": "human", "value": draw(text)},
                                 {"from": "gpt", "value": draw(text)}]}
    elif shape == "alpaca":
        rec = {"instruction": draw(text), "output": draw(text)}
    else:
        rec = {"text": draw(text)}
    if draw(st.booleans()):
        rec["id"] = draw(st.sampled_from(["a", "a#dup1", "b", "7"]))
    return {**extra, **rec}


@st.composite
def invalid_record(draw, flat=False):
    if flat:
        return draw(st.sampled_from([{"instruction": "only an instruction"},
                                     {"text": " "}, {"other": "no known field"}]))
    return draw(st.sampled_from([
        {}, {"messages": []}, {"messages": [{"role": "user", "content": "no reply"}]},
        {"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"messages": "not a list"}, {"text": ""}, {"text": 5}, {"instruction": "x"},
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]},
        {"id": 1.5, "text": "float id"}]))


def rows_strategy(flat):
    return st.lists(st.tuples(st.booleans(), st.booleans()).flatmap(
        lambda t: (valid_record(flat) if t[0] else invalid_record(flat)).map(lambda r: (t[0], r))),
        min_size=0, max_size=25)


def serialize(fmt: str, records: list[dict], path: Path) -> None:
    if fmt == "jsonl":
        path.write_bytes("".join(json.dumps(r) + "\n" for r in records).encode())
    elif fmt == "json":
        path.write_bytes(json.dumps(records, indent=1).encode())
    elif fmt == "csv":
        import csv

        cols = sorted({k for r in records for k in r}) or ["text"]
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(cols)
            for r in records:
                w.writerow([r.get(c, "") for c in cols])
    else:
        cols = sorted({k for r in records for k in r}) or ["text"]
        table = pa.table({c: pa.array([r.get(c) for r in records], pa.string()) for c in cols})
        pq.write_table(table, path)


def run(fmt, comp, labelled, damage=None):
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        plain = d / f"in.{fmt}"
        serialize(fmt, [r for _, r in labelled], plain)
        data = COMPRESS[comp](plain.read_bytes())
        if damage is not None and data:
            at, junk = damage
            at %= len(data)
            data = data[:at] + junk + data[at + len(junk):]
        src = d / f"src.{fmt}{comp}"
        src.write_bytes(data)
        rep = ingest([src], d / "pool")
        pool = Pool(d / "pool")
        rows = list(pool.iter_rows())
        q = [json.loads(x) for x in (d / "pool" / "quarantine.jsonl").read_text().split("\n") if x]
        return rep, rows, q


def check_accounting(rep, rows, q):
    assert rep.read == rep.kept + rep.quarantined
    assert len(rows) == rep.kept and len(q) == rep.quarantined
    assert all(e["reason"] and e["location"] for e in q)
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids)


@SETTINGS
@given(fmt=st.sampled_from(["jsonl", "json"]), comp=st.sampled_from(list(COMPRESS)),
       labelled=rows_strategy(flat=False))
def test_json_formats_count_every_row_and_lose_no_field(fmt, comp, labelled):
    rep, rows, q = run(fmt, comp, labelled)
    check_accounting(rep, rows, q)
    assert rep.read == len(labelled)
    assert rep.kept == sum(ok for ok, _ in labelled)
    valid = [r for ok, r in labelled if ok]
    for row, rec in zip(rows, valid):  # kept rows stay in input order
        meta = json.loads(row["meta"])
        for k, v in rec.items():
            if k not in {"id", "source", "messages", "conversations", "instruction", "input",
                         "output", "system", "history", "text"}:
                assert meta[k] == v


@SETTINGS
@given(fmt=st.sampled_from(["csv", "parquet"]), comp=st.sampled_from(list(COMPRESS)),
       labelled=rows_strategy(flat=True))
def test_table_formats_count_every_row(fmt, comp, labelled):
    rep, rows, q = run(fmt, comp, labelled)
    check_accounting(rep, rows, q)
    assert rep.read == len(labelled)
    assert rep.kept == sum(ok for ok, _ in labelled)


@SETTINGS
@given(fmt=st.sampled_from(["jsonl", "json", "csv", "parquet"]),
       comp=st.sampled_from(list(COMPRESS)), labelled=rows_strategy(flat=True),
       damage=st.tuples(st.integers(0, 10**6), st.binary(min_size=1, max_size=8)))
def test_damaged_bytes_never_break_the_accounting(fmt, comp, labelled, damage):
    rep, rows, q = run(fmt, comp, labelled, damage)
    check_accounting(rep, rows, q)
