"""Incremental ingest: unchanged input files are copied, not read; the pool equals a fresh one."""

import json

from thresher.pipeline.io.ingest import ingest
from thresher.pipeline.io.pool import Pool


def _write(path, ids, tag="x"):
    rows = [{"id": i, "messages": [{"role": "user", "content": f"q {i} {tag}"},
                                   {"role": "assistant", "content": f"a {i}"}]} for i in ids]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _shard_bytes(pool_dir):
    pool = Pool(pool_dir)
    return [s.read_bytes() for s in pool.shards]


def test_added_file_reuses_the_others_and_matches_a_fresh_ingest(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _write(src / "a.jsonl", ["a1", "a2", "a3"])
    _write(src / "c.jsonl", ["c1", "c2"])
    (src / "c.jsonl").write_text((src / "c.jsonl").read_text() + "{broken\n")
    first = ingest([src], tmp_path / "pool", reuse=True)
    assert first.reused == [] and first.quarantined == 1
    before = _shard_bytes(tmp_path / "pool")
    assert len(before) == 2   # one shard per input file

    _write(src / "b.jsonl", ["b1", "b2"])
    again = ingest([src], tmp_path / "pool", reuse=True)
    assert again.reused == [str(src / "a.jsonl"), str(src / "c.jsonl")]
    assert (again.read, again.kept, again.quarantined) == (8, 7, 1)
    fresh = ingest([src], tmp_path / "fresh")
    assert again.fingerprint == fresh.fingerprint
    assert _shard_bytes(tmp_path / "pool") == _shard_bytes(tmp_path / "fresh")
    assert _shard_bytes(tmp_path / "pool")[0] == before[0] and \
        _shard_bytes(tmp_path / "pool")[2] == before[1]
    assert (tmp_path / "pool" / "quarantine.jsonl").read_text() == \
        (tmp_path / "fresh" / "quarantine.jsonl").read_text()


def test_removed_and_changed_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _write(src / "a.jsonl", ["a1", "a2"])
    _write(src / "b.jsonl", ["b1"])
    ingest([src], tmp_path / "pool", reuse=True)
    (src / "a.jsonl").unlink()
    _write(src / "b.jsonl", ["b1", "b2"], tag="changed")
    rep = ingest([src], tmp_path / "pool", reuse=True)
    assert rep.removed == [{"path": str(src / "a.jsonl"), "kept": 2}]
    assert rep.reused == []   # b changed: read again
    assert Pool(tmp_path / "pool").frame(["id"])["id"].to_list() == ["b1", "b2"]


def test_an_id_taken_by_a_new_earlier_file_forces_a_reread(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _write(src / "b.jsonl", ["x", "b1"])
    ingest([src], tmp_path / "pool", reuse=True)
    _write(src / "a.jsonl", ["x"], tag="first")   # sorts before b and takes id x
    rep = ingest([src], tmp_path / "pool", reuse=True)
    assert rep.reused == []
    fresh = ingest([src], tmp_path / "fresh")
    assert rep.fingerprint == fresh.fingerprint
    assert Pool(tmp_path / "pool").frame(["id"])["id"].to_list() == ["x", "x#dup1", "b1"]


def test_changed_ingest_options_read_everything_again(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _write(src / "a.jsonl", ["a1", "a2", "a3"])
    ingest([src], tmp_path / "pool", reuse=True)
    rep = ingest([src], tmp_path / "pool", rows_per_shard=2, reuse=True)
    assert rep.reused == [] and len(Pool(tmp_path / "pool").shards) == 2
