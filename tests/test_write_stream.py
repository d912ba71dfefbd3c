"""Writing a selection streams the pool shard by shard and gives the bytes of writing the
materialised rows, in the selection's order, for every format."""

from __future__ import annotations

import random

import pytest
from thresher.pipeline.io.ingest import ingest
from thresher.pipeline.io.pool import Pool
from thresher.pipeline.io.writers import FORMATS, HF_DATA, write_rows, write_selection


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, sample_pool_dir):
    out = tmp_path_factory.mktemp("stream") / "pool"
    ingest([sample_pool_dir], out, rows_per_shard=64)
    return Pool(out)


def _bytes(path, fmt):
    return (path / HF_DATA if fmt == "hf" else path).read_bytes()


@pytest.mark.parametrize("fmt", FORMATS)
def test_streamed_subset_equals_materialised_rows(tmp_path, sharded, fmt):
    ids = sharded.frame(["id", "kind"])
    if fmt == "alpaca":       # alpaca refuses rows whose turns do not alternate
        ids = ids.filter(ids["kind"] == "text")
    ids = ids["id"].to_list()
    picked = random.Random(3).sample(ids, min(150, len(ids)))   # shuffled, across shards
    assert len(sharded.shards) > 3
    seen = []
    n = write_selection(sharded, picked, tmp_path / "a", fmt, lambda r: seen.append(r["id"]))
    write_rows(sharded.rows(picked), tmp_path / "b", fmt)
    assert n == len(picked) and sorted(seen) == sorted(picked)
    assert _bytes(tmp_path / "a", fmt) == _bytes(tmp_path / "b", fmt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]       # no spill left


def test_streamed_subset_missing_or_repeated_id(tmp_path, sharded):
    first = sharded.frame(["id"])["id"][0]
    with pytest.raises(KeyError, match="1 ids not in pool"):
        write_selection(sharded, [first, "no-such-id"], tmp_path / "x.jsonl", "messages")
    with pytest.raises(ValueError, match="repeat"):
        write_selection(sharded, [first, first], tmp_path / "x.jsonl", "messages")
    assert not (tmp_path / "x.jsonl").exists()


def test_streamed_subset_of_no_rows(tmp_path, sharded):
    assert write_selection(sharded, [], tmp_path / "e.jsonl", "messages") == 0
    assert (tmp_path / "e.jsonl").read_bytes() == b""
