import pytest
from thresher.pipeline.artifacts import ArtifactStore, atomic_path


def test_stage_key_depends_on_inputs_and_config(tmp_path):
    store = ArtifactStore(tmp_path)
    a = store.dir("embed", ["fp1"], {"model": "m", "part": "first_user"})
    assert store.dir("embed", ["fp1"], {"part": "first_user", "model": "m"}).dir == a.dir
    assert store.dir("embed", ["fp2"], {"model": "m", "part": "first_user"}).dir != a.dir
    assert store.dir("embed", ["fp1"], {"model": "m", "part": "response"}).dir != a.dir
    assert store.dir("cluster", ["fp1"], {"model": "m", "part": "first_user"}).dir != a.dir


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    stage = ArtifactStore(tmp_path).dir("s", ["x"], {})
    with pytest.raises(RuntimeError), stage.writing("part-0.npy") as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert not stage.has("part-0.npy")
    assert [p.name for p in stage.dir.iterdir()] == ["_SPEC.json"]
    with stage.writing("part-0.npy") as tmp:
        tmp.write_text("whole")
    assert stage.path("part-0.npy").read_text() == "whole"
    assert not stage.done
    stage.complete({"rows": 3})
    assert stage.done and stage.info() == {"rows": 3}


def test_atomic_path_replaces_existing(tmp_path):
    f = tmp_path / "out.txt"
    f.write_text("old")
    with atomic_path(f) as tmp:
        tmp.write_text("new")
    assert f.read_text() == "new"


def test_token_counts_stage_resumes_from_finished_shards(tmp_path, sample_pool_dir, monkeypatch):
    from thresher.pipeline.io.ingest import ingest
    from thresher.pipeline.io.pool import Pool
    from thresher.pipeline.models.resolve import DEFAULT_LM, resolve
    from thresher.pipeline.stages import tokens

    ingest([sample_pool_dir], tmp_path / "pool", rows_per_shard=300)
    pool = Pool(tmp_path / "pool")
    store = ArtifactStore(tmp_path / "work")
    model = resolve(DEFAULT_LM)
    first = tokens.token_counts(pool, store, model)
    assert first.height == 775 and first["id"].to_list() == pool.frame(["id"])["id"].to_list()
    # against a direct count with the tokenizer and chat template
    from thresher.pipeline.models.chat import encode
    from thresher.pipeline.models.resolve import load_tokenizer

    tok = load_tokenizer(model)
    rows = pool.frame(["id", "kind", "messages", "text"]).to_dicts()
    direct = [len(encode(tok, r, tokens.NO_LIMIT).input_ids) for r in rows]
    assert first["n_tokens"].to_list() == direct

    from thresher.pipeline.stage import StageRun, shard_file

    run = StageRun(tokens.TokenCounts(tokenizer=DEFAULT_LM), pool, store)
    shard_file(run, pool.shards[1], "done.json").unlink()   # as if killed while writing shard 1
    run.dir.path("_COMPLETE.json").unlink()
    import pyarrow.parquet as pq

    missing_rows = pq.read_metadata(pool.shards[1]).num_rows   # shards follow input files
    calls = []
    real = tokens.encode
    monkeypatch.setattr(tokens, "encode", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = tokens.token_counts(pool, store, model)
    assert len(calls) == missing_rows == 100  # only the missing shard was recomputed
    assert again.equals(first)
