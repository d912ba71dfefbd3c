import json

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from thresher.pipeline.io.ingest import ingest
from thresher.pipeline.io.pool import Pool
from thresher.pipeline.io.schema import RowError, to_canonical


def write_lines(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def quarantine(pool_dir):
    return [json.loads(l) for l in (pool_dir / "quarantine.jsonl").read_text().splitlines()]


def test_bad_rows_are_quarantined_with_line_numbers(tmp_path):
    src = write_lines(tmp_path / "mixed.jsonl", [
        json.dumps({"instruction": "Add 2 and 3", "input": "", "output": "5"}).encode(),
        b'{"instruction": "truncated", "output": "x',
        json.dumps({"instruction": "No output", "input": ""}).encode(),
        b"{}",
        b'{"instruction": "bad \xff\xfe bytes", "output": "y"}',
        json.dumps({"instruction": "Name a color", "input": "", "output": "Blue"}).encode(),
    ])
    rep = ingest([src], tmp_path / "pool")
    assert (rep.read, rep.kept, rep.quarantined) == (6, 2, 4)
    q = {e["location"]: e["reason"] for e in quarantine(tmp_path / "pool")}
    assert set(q) == {"line 2", "line 3", "line 4", "line 5"}
    assert "malformed JSON" in q["line 2"]
    assert "missing 'output'" in q["line 3"]
    assert q["line 4"] == "empty object"
    assert "invalid UTF-8" in q["line 5"]
    pool = Pool(tmp_path / "pool")
    assert pool.n_rows == 2 and pool.info["read"] == 6 and pool.info["quarantined"] == 4
    msgs = pool.frame(["messages"])["messages"].to_list()
    assert msgs[0] == [{"role": "user", "content": "Add 2 and 3"}, {"role": "assistant", "content": "5"}]


def test_all_shapes_and_file_types(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([
        {"instruction": "Say hi", "input": "to Bob", "output": "Hi Bob", "system": "Be nice"},
        {"instruction": "Count", "output": "1 2 3", "history": [["q0", "a0"]]}]))
    write_lines(tmp_path / "s.jsonl", [json.dumps({"id": "sg1", "conversations": [
        {"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi!"}]}).encode()])
    pq.write_table(pa.Table.from_pylist([{"id": 7, "text": "plain pretraining text"}]),
                   tmp_path / "t.parquet")
    (tmp_path / "m.csv").write_text(
        'id,messages\nc1,"[{""role"": ""user"", ""content"": ""2+2?""}, {""role"": ""assistant"", ""content"": ""4""}]"\n')
    rep = ingest([tmp_path], tmp_path / "pool")
    assert rep.quarantined == 0 and rep.kept == 5
    assert {i.shape for i in rep.inputs} == {"alpaca", "sharegpt", "text", "messages"}
    df = Pool(tmp_path / "pool").frame()
    rows = {r["id"]: r for r in df.to_dicts()}
    assert rows["sg1"]["messages"][1] == {"role": "assistant", "content": "Hi!"}
    assert rows["7"]["kind"] == "text" and rows["7"]["messages"] is None
    assert rows["c1"]["messages"][0]["content"] == "2+2?"
    alpaca = [r for r in rows.values() if r["id"].startswith("h-")]
    assert len(alpaca) == 2  # no id given: content hash
    first = next(r for r in alpaca if r["messages"][0]["role"] == "system")
    assert [m["role"] for m in first["messages"]] == ["system", "user", "assistant"]
    assert first["messages"][1]["content"] == "Say hi\n\nto Bob"
    history = next(r for r in alpaca if r is not first)
    assert [m["content"] for m in history["messages"]] == ["q0", "a0", "Count", "1 2 3"]


def test_original_fields_kept_in_meta(tmp_path):
    src = write_lines(tmp_path / "x.jsonl", [json.dumps({
        "id": "r1", "capability": "math", "original": {"q": 1},
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}).encode()])
    ingest([src], tmp_path / "pool")
    pool = Pool(tmp_path / "pool")
    assert json.loads(pool.frame(["meta"])["meta"][0]) == {"capability": "math", "original": {"q": 1}}
    assert pool.meta_field("capability").to_list() == ["math"]
    assert pool.frame(["source"])["source"][0] == "x"  # file stem when the row names none


def test_duplicate_ids_are_reported_not_merged(tmp_path):
    row = {"id": "same", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    src = write_lines(tmp_path / "d.jsonl", [json.dumps(row).encode()] * 3)
    rep = ingest([src], tmp_path / "pool")
    assert rep.kept == 3 and rep.duplicate_ids == 2
    assert Pool(tmp_path / "pool").frame(["id"])["id"].to_list() == ["same", "same#dup1", "same#dup2"]
    dups = (tmp_path / "pool" / "duplicate_ids.jsonl").read_text().splitlines()
    assert [json.loads(d)["location"] for d in dups] == ["line 2", "line 3"]


@pytest.mark.parametrize("record,reason", [
    ({"messages": []}, "empty conversation"),
    ({"messages": [{"role": "user", "content": "q"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}, "empty content"),
    ({"messages": [{"role": "wizard", "content": "q"}]}, "unknown role"),
    ({"conversations": "not json"}, "not JSON"),
    ({"text": ""}, "empty text"),
    ([1, 2], "expected a JSON object"),
])
def test_row_errors_have_reasons(record, reason):
    shape = {"messages": "messages", "conversations": "sharegpt", "text": "text"}
    key = next(iter(record)) if isinstance(record, dict) else "messages"
    with pytest.raises(RowError, match=reason):
        to_canonical(record, shape[key], "src")


def test_broken_json_array_reports_remainder(tmp_path):
    good = json.dumps({"instruction": "a", "output": "b"})
    (tmp_path / "arr.json").write_text(f"[{good},\n{good},\n{{\"instruction\": \"c\", ")
    rep = ingest([tmp_path / "arr.json"], tmp_path / "pool")
    assert rep.kept == 2 and rep.quarantined == 1 and rep.read == 3
    (entry,) = quarantine(tmp_path / "pool")
    assert entry["location"].startswith("item 3") and "rest of file not read" in entry["reason"]


def test_declared_format_and_unknown_shape(tmp_path):
    src = write_lines(tmp_path / "p.jsonl", [json.dumps({"body": "x"}).encode()])
    rep = ingest([src], tmp_path / "pool")
    assert rep.quarantined == 1
    assert "pass --format" in quarantine(tmp_path / "pool")[0]["reason"]
    with pytest.raises(ValueError, match="unknown format"):
        ingest([src], tmp_path / "pool2", shape="yaml")


def test_streams_in_shards_and_keeps_order(tmp_path):
    lines = [json.dumps({"id": f"r{i}", "text": f"doc {i}"}).encode() for i in range(25)]
    rep = ingest([write_lines(tmp_path / "t.jsonl", lines)], tmp_path / "pool", rows_per_shard=10)
    pool = Pool(tmp_path / "pool")
    assert len(pool.shards) == 3 and rep.kept == 25
    assert pool.frame(["id"])["id"].to_list() == [f"r{i}" for i in range(25)]
    assert [r["id"] for r in pool.rows(["r20", "r3"])] == ["r20", "r3"]


def test_sample_pool_counts_add_up(sample_pool):
    info = sample_pool.info
    assert info["read"] == info["kept"] + info["quarantined"] == 775
    assert {i["shape"] for i in info["inputs"]} == {"messages", "alpaca", "sharegpt", "text"}
    counts = dict(sample_pool.frame(["source"])["source"].value_counts().iter_rows())
    assert counts["gsm8k"] == 300 and counts["mbpp"] == 150


def test_same_inputs_same_fingerprint(tmp_path, sample_pool_dir):
    a = ingest([sample_pool_dir], tmp_path / "a").fingerprint
    b = ingest([sample_pool_dir], tmp_path / "b").fingerprint
    assert a == b
    assert pl.read_parquet(tmp_path / "a" / "shards").equals(pl.read_parquet(tmp_path / "b" / "shards"))


def test_detected_shape_is_per_row_so_subsets_with_text_rows_reingest(tmp_path):
    chat = {"id": "c", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    src = write_lines(tmp_path / "subset.jsonl", [json.dumps(chat).encode(),
                                                  json.dumps({"id": "t", "text": "web text"}).encode(),
                                                  json.dumps({"id": "x", "body": 1}).encode()])
    rep = ingest([src], tmp_path / "pool")
    assert (rep.kept, rep.quarantined) == (2, 1)
    assert rep.inputs[0].shape == "messages+text"
    assert quarantine(tmp_path / "pool")[0]["reason"] == "row is missing 'messages'"
    declared = ingest([src], tmp_path / "pool2", shape="messages")
    assert (declared.kept, declared.quarantined) == (1, 2)
