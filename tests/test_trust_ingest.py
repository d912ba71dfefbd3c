"""Hostile inputs through ingest: every row kept or quarantined and counted, nothing dropped,
inputs never overwritten, pools checked against pool.json when read."""

import bz2
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from thresher.pipeline.io.ingest import ingest
from thresher.pipeline.io.inputs import expand_inputs
from thresher.pipeline.io.pool import Pool, load_rows
from thresher.pipeline.io.readers import read_records
from thresher.pipeline.io.writers import to_record

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


def chat(i, **kw):
    return {"id": f"r{i}", "messages": [{"role": "user", "content": f"q{i}"},
                                        {"role": "assistant", "content": f"a{i}"}], **kw}


def quarantine(pool):
    return [json.loads(line) for line in (pool / "quarantine.jsonl").read_text().split("\n") if line]


def counts(rep):
    return rep.read, rep.kept, rep.quarantined


def test_json_array_missing_comma_keeps_every_item(tmp_path):
    items = [json.dumps(chat(i)) for i in range(1000)]
    text = "[\n" + ",\n".join(items[:10]) + "\n" + ",\n".join(items[10:]) + "\n]"
    (tmp_path / "a.json").write_text(text)
    rep = ingest([tmp_path / "a.json"], tmp_path / "pool")
    assert counts(rep) == (1000, 1000, 0)


def test_json_array_bad_item_is_quarantined_alone(tmp_path):
    items = [json.dumps(chat(i), indent=2) for i in range(50)]
    items[20] = items[20].replace('"q20"', '"q20" oops')
    (tmp_path / "a.json").write_text("[\n" + ",\n".join(items) + "\n]\n")
    rep = ingest([tmp_path / "a.json"], tmp_path / "pool")
    assert counts(rep) == (50, 49, 1)
    (q,) = quarantine(tmp_path / "pool")
    assert q["location"].startswith("item 21") and "skipped lines" in q["reason"]
    assert "r20" not in Pool(tmp_path / "pool").frame(["id"])["id"].to_list()


def test_json_compact_array_broken_rest_is_one_counted_entry(tmp_path):
    text = "[" + ",".join(json.dumps(chat(i)) for i in range(5)) + ",{bad" + ",".join(
        json.dumps(chat(i)) for i in range(5, 9)) + "]"
    (tmp_path / "a.json").write_text(text)
    rep = ingest([tmp_path / "a.json"], tmp_path / "pool")
    assert counts(rep) == (6, 5, 1)
    assert "rest of file not read" in quarantine(tmp_path / "pool")[0]["reason"]


def test_json_file_holding_json_lines_and_bom(tmp_path):
    body = "\n".join(json.dumps(chat(i)) for i in range(4)) + "\n"
    (tmp_path / "a.json").write_bytes(b"\xef\xbb\xbf" + body.encode())
    (tmp_path / "b.jsonl").write_bytes(b"\xef\xbb\xbf" + body.replace('"id": "r', '"id": "b').encode())
    (tmp_path / "c.jsonl").write_bytes(body.replace('"id": "r', '"id": "c').encode("utf-16"))
    csv_text = "id,instruction,output\nx1,do,done\n"
    (tmp_path / "d.csv").write_bytes(b"\xef\xbb\xbf" + csv_text.encode())
    rep = ingest([tmp_path / n for n in ("a.json", "b.jsonl", "c.jsonl", "d.csv")], tmp_path / "p")
    assert counts(rep) == (13, 13, 0)
    ids = set(Pool(tmp_path / "p").frame(["id"])["id"])
    assert {"r0", "b3", "c2", "x1"} <= ids


def test_latin1_file_with_encoding_option(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(json.dumps(
        {"instruction": "café", "output": "ok"}, ensure_ascii=False).encode("latin-1") + b"\n")
    rep = ingest([tmp_path / "a.jsonl"], tmp_path / "p1")
    assert counts(rep) == (1, 0, 1) and "invalid UTF-8" in quarantine(tmp_path / "p1")[0]["reason"]
    rep = ingest([tmp_path / "a.jsonl"], tmp_path / "p2", encoding="latin-1")
    assert counts(rep) == (1, 1, 0)
    (row,) = Pool(tmp_path / "p2").iter_rows()
    assert row["messages"][0]["content"] == "café"


def test_csv_ragged_row_keeps_valid_rows_and_strings_stay_strings(tmp_path):
    (tmp_path / "a.csv").write_text(
        "id,instruction,output\n007,a,b\n2,c,d,EXTRA\n3,e\n4,\"multi\nline\",f\n5,g,h\n")
    rep = ingest([tmp_path / "a.csv"], tmp_path / "p")
    assert counts(rep) == (5, 3, 2)
    assert list(Pool(tmp_path / "p").frame(["id"])["id"]) == ["007", "4", "5"]
    reasons = {q["location"]: q["reason"] for q in quarantine(tmp_path / "p")}
    assert reasons == {"line 3": "row has 4 fields, the header has 3",
                       "line 4": "row has 2 fields, the header has 3"}


def test_per_turn_fields_content_parts_and_tool_calls_are_kept(tmp_path):
    rec = {"id": "t", "messages": [
        {"role": "system", "content": "s", "name": "sys"},
        {"role": "user", "content": [{"type": "text", "text": "look"},
                                     {"type": "image_url", "image_url": {"url": "x.png"}},
                                     {"type": "text", "text": "here"}], "weight": 0},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
        {"role": "assistant", "content": "it is 42", "weight": 1}]}
    sg = {"id": "s", "conversations": [{"from": "human", "value": "a", "loss": False},
                                       {"from": "gpt", "value": "b"}]}
    (tmp_path / "a.jsonl").write_text(json.dumps(rec) + "\n" + json.dumps(sg) + "\n")
    rep = ingest([tmp_path / "a.jsonl"], tmp_path / "p")
    assert counts(rep) == (2, 2, 0)
    rows = {r["id"]: r for r in Pool(tmp_path / "p").iter_rows()}
    msgs = rows["t"]["messages"]
    assert msgs[1]["content"] == "look\nhere"
    assert msgs[2]["content"].startswith("<tool_call>") and '"name": "f"' in msgs[2]["content"]
    turns = json.loads(rows["t"]["meta"])["_turn_fields"]
    assert turns["0"] == {"name": "sys"}
    assert turns["1"]["weight"] == 0 and turns["1"]["content"][1]["type"] == "image_url"
    assert turns["2"]["content"] is None and turns["2"]["tool_calls"][0]["id"] == "c1"
    assert turns["3"] == {"tool_call_id": "c1"}
    assert json.loads(rows["s"]["meta"])["_turn_fields"] == {"0": {"loss": False}}
    # the messages output gives the original turns back
    out = to_record(rows["t"], "messages")
    assert out["messages"] == rec["messages"]


def test_ids_stay_unique_under_every_rename(tmp_path):
    recs = [chat(0, id="a#dup1"), chat(1, id="a"), chat(2, id="a"), chat(3, id="a#dup2"),
            chat(4, id=7), chat(5, id="7")]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    rep = ingest([tmp_path / "a.jsonl"], tmp_path / "p")
    ids = list(Pool(tmp_path / "p").frame(["id"])["id"])
    assert len(set(ids)) == len(ids) == 6 and rep.duplicate_ids == 3
    assert ids[:3] == ["a#dup1", "a", "a#dup2"]
    rows = Pool(tmp_path / "p").rows(["a#dup2"])
    assert rows[0]["messages"][0]["content"] == "q2"


@pytest.mark.parametrize("line, reason", [
    (b'{"instruction": "x\\ud800y", "output": "o"}', "invalid Unicode"),
    (b'{"instruction": "x", "output": "o", "n": ' + b"9" * 5001 + b"}", "malformed JSON"),
    (b'{"instruction": "x", "output": "o", "deep": ' + b"[" * 100000 + b"]" * 100000 + b"}",
     "malformed JSON"),
    (b'{"instruction": "x", "output": "o", "v": NaN, "id": 1.5}', "'id' is float"),
    (b'[1, 2]', "expected a JSON object"),
    (b'"just a string"', "expected a JSON object"),
])
def test_one_bad_value_quarantines_its_row_only(tmp_path, line, reason):
    good = json.dumps({"instruction": "fine", "output": "ok"}).encode()
    (tmp_path / "a.jsonl").write_bytes(b"\n".join([good, line, good.replace(b"fine", b"ok2")]))
    rep = ingest([tmp_path / "a.jsonl"], tmp_path / "p")
    assert counts(rep) == (3, 2, 1)
    (q,) = quarantine(tmp_path / "p")
    assert q["location"] == "line 2" and reason in q["reason"]


def test_nan_in_a_kept_row_is_stored_as_valid_json(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"instruction": "x", "output": "o", "score": NaN}\n')
    ingest([tmp_path / "a.jsonl"], tmp_path / "p")
    (row,) = Pool(tmp_path / "p").iter_rows()
    assert json.loads(row["meta"]) == {"score": "NaN"}


@pytest.mark.parametrize("suffix, opener", [
    (".gz", gzip.compress), (".bz2", bz2.compress),
    (".zst", lambda b: zstandard.ZstdCompressor().compress(b[:40]) +
     zstandard.ZstdCompressor().compress(b[40:])),  # two frames
])
def test_compressed_inputs(tmp_path, suffix, opener):
    body = "".join(json.dumps(chat(i)) + "\n" for i in range(20)).encode()
    (tmp_path / f"a.jsonl{suffix}").write_bytes(opener(body))
    arr = json.dumps([chat(i) for i in range(20, 25)]).encode()
    (tmp_path / f"b.json{suffix}").write_bytes(opener(arr))
    table = pa.Table.from_pylist([{"text": f"t{i}"} for i in range(3)])
    pq.write_table(table, tmp_path / "c.parquet")
    (tmp_path / f"c.parquet{suffix}").write_bytes(opener((tmp_path / "c.parquet").read_bytes()))
    (tmp_path / "c.parquet").unlink()
    files = expand_inputs([tmp_path])
    assert len(files) == 3
    rep = ingest([tmp_path], tmp_path / "out" / "p")
    assert counts(rep) == (28, 28, 0)


def test_truncated_gzip_is_counted(tmp_path):
    body = "".join(json.dumps(chat(i)) + "\n" for i in range(2000)).encode()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(body)[:5000])
    rep = ingest([tmp_path / "a.jsonl.gz"], tmp_path / "p")
    assert rep.read == rep.kept + rep.quarantined and rep.kept > 0
    assert "unreadable rest of file" in quarantine(tmp_path / "p")[-1]["reason"]


def test_corrupt_parquet_is_one_counted_entry_and_others_are_read(tmp_path):
    pq.write_table(pa.Table.from_pylist([{"text": "a"}, {"text": "b"}]), tmp_path / "ok.parquet")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 garbage not a parquet file")
    rep = ingest([tmp_path / "bad.parquet", tmp_path / "ok.parquet"], tmp_path / "out")
    assert counts(rep) == (3, 2, 1)
    assert "unreadable Parquet file" in quarantine(tmp_path / "out")[0]["reason"]


def test_directory_input_skips_hidden_work_dirs_sidecars_and_pool_internals(tmp_path):
    src = tmp_path / "data"
    src.mkdir()
    (src / "a.jsonl").write_text(json.dumps(chat(1)) + "\n")
    (src / ".thresher-work").mkdir()
    (src / ".thresher-work" / "_SPEC.json").write_text("{}")
    (src / "sub.jsonl.manifest.json").write_text("{}")
    ingest([src], src / "pool")  # an output inside a plain input directory is allowed...
    rep = ingest([src], src / "pool")  # ...and a rerun does not read the pool it replaces
    assert counts(rep) == (1, 1, 0)
    rep = ingest([src / "pool"], tmp_path / "copy")  # a pool as input: its shards only
    assert counts(rep) == (1, 1, 0)


def test_ingest_never_overwrites_its_input(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps(chat(1)) + "\n")
    pool = tmp_path / "pool"
    ingest([tmp_path / "a.jsonl"], pool)
    before = {p.name: p.read_bytes() for p in (pool / "shards").iterdir()}
    for out in (pool, pool / "inner", tmp_path / "a.jsonl", tmp_path):
        with pytest.raises((ValueError, FileExistsError)):
            ingest([pool], out)
    assert {p.name: p.read_bytes() for p in (pool / "shards").iterdir()} == before
    with pytest.raises(ValueError, match="would replace the input"):
        ingest([tmp_path / "a.jsonl"], tmp_path)
    assert not [p for p in tmp_path.iterdir() if "thresher-tmp" in p.name]


def test_pool_shards_are_checked_against_pool_json(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(chat(i)) + "\n" for i in range(30)))
    ingest([tmp_path / "a.jsonl"], tmp_path / "p", rows_per_shard=10)
    info = json.loads((tmp_path / "p" / "pool.json").read_text())
    assert [e["rows"] for e in info["shards"]] == [10, 10, 10]
    pool = Pool(tmp_path / "p")
    assert pool.shard_fingerprint(pool.shards[1]) == info["shards"][1]["sha256"]
    shard = tmp_path / "p" / "shards" / "part-00001.parquet"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])  # truncated
    with pytest.raises(ValueError, match="part-00001.parquet: .* bytes, pool.json records"):
        Pool(tmp_path / "p")
    # same size, different content: caught by the hash when rows are read
    shard.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    p = Pool(tmp_path / "p")
    with pytest.raises(ValueError, match="content differs"):
        p.frame(["id"])


def test_pool_format_version_is_checked(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps(chat(1)) + "\n")
    ingest([tmp_path / "a.jsonl"], tmp_path / "p")
    info = json.loads((tmp_path / "p" / "pool.json").read_text())
    info["format_version"] = 99
    (tmp_path / "p" / "pool.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="format version 99"):
        Pool(tmp_path / "p")
    (tmp_path / "p" / "pool.json").write_text("{not json")
    with pytest.raises(ValueError, match="damaged pool.json .not JSON"):
        Pool(tmp_path / "p")


def test_version_1_pool_still_reads(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps(chat(1)) + "\n")
    ingest([tmp_path / "a.jsonl"], tmp_path / "p")
    info = json.loads((tmp_path / "p" / "pool.json").read_text())
    info["format_version"] = 1
    info["shards"] = [e["name"] for e in info["shards"]]
    (tmp_path / "p" / "pool.json").write_text(json.dumps(info))
    pool = Pool(tmp_path / "p")
    assert pool.frame(["id"])["id"].to_list() == ["r1"]
    assert len(pool.shard_fingerprint(pool.shards[0])) == 64


def test_empty_pool_reads_as_empty(tmp_path):
    (tmp_path / "a.jsonl").write_text("{}\n")
    rep = ingest([tmp_path / "a.jsonl"], tmp_path / "p")
    assert counts(rep) == (1, 0, 1)
    assert Pool(tmp_path / "p").frame(["id"]).height == 0


def test_load_rows_reads_every_format(tmp_path):
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress((json.dumps(CHAT) + "\n").encode()))
    rows, bad = load_rows(tmp_path / "a.jsonl.gz")
    assert len(rows) == 1 and bad == []


def test_reader_yields_one_entry_per_jsonl_line(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'{"a": 1}\n\n{bad\n\xff\n[]\n')
    got = list(read_records(tmp_path / "a.jsonl"))
    assert [w for w, _, _ in got] == ["line 1", "line 3", "line 4", "line 5"]
    assert [e is None for _, _, e in got] == [True, False, False, True]
