"""Embedding stage (alignment, float16, resume after a kill, cache) and the FAISS k-means stage,
plus the embedding-based methods end to end with a tiny random sentence-transformers model."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from thresher.pipeline.artifacts import ArtifactStore
from thresher.pipeline.io.ingest import ingest
from thresher.pipeline.io.pool import Pool
from thresher.pipeline.io.schema import row_text
from thresher.pipeline.stages import embed as embed_mod
from thresher.pipeline.stages.cluster import cluster_matrix, kmeans
from thresher.pipeline.stages.embed import ShardEmbedder, embed_pool


@pytest.fixture(scope="module")
def sharded_pool(tmp_path_factory, sample_pool_dir):
    out = tmp_path_factory.mktemp("sharded") / "pool"
    ingest([sample_pool_dir], out, rows_per_shard=100)
    return Pool(out)


def test_embeddings_aligned_float16_normalised(tmp_path, sharded_pool, tiny_embedder):
    emb = embed_pool(sharded_pool, ArtifactStore(tmp_path), tiny_embedder, part="first_user")
    x = emb.matrix()
    assert isinstance(x, np.memmap) and x.dtype == np.float16
    assert x.shape == (sharded_pool.n_rows, 32) and emb.path.name == "embeddings.npy"
    np.testing.assert_allclose(np.linalg.norm(x.astype(np.float32), axis=1), 1.0, atol=2e-3)
    # row i of the matrix is the embedding of pool row i (despite length-sorted batches)
    rows = list(sharded_pool.iter_rows(["kind", "messages", "text"]))
    pick = [0, 150, 433, len(rows) - 1]
    one = ShardEmbedder(tiny_embedder, part="first_user").encode(
        [row_text(rows[i], "first_user") for i in pick])
    np.testing.assert_allclose(x[pick].astype(np.float32), one.astype(np.float32), atol=3e-3)
    other = embed_pool(sharded_pool, ArtifactStore(tmp_path), tiny_embedder, part="response")
    chat = [i for i, r in enumerate(rows) if r["kind"] == "chat"][:5]
    assert other.path != emb.path and not np.allclose(other.matrix()[chat], x[chat])
    with pytest.raises(ValueError, match="unknown text part"):
        embed_pool(sharded_pool, ArtifactStore(tmp_path), tiny_embedder, part="title")


@pytest.mark.slow
def test_bf16_embeddings_match_float32_within_1e_2_cosine(sharded_pool):
    """The real all-MiniLM-L6-v2 in bf16 (the CPU default where the CPU has native bf16) gives
    the float32 vectors to within 1e-2 cosine, on chat and plain-text rows of the sample."""
    rows = list(sharded_pool.iter_rows(["kind", "messages", "text"]))[::40][:20]
    texts = [row_text(r, "conversation") for r in rows]
    low = ShardEmbedder("all-minilm-l6-v2", device="cpu", dtype="bf16")
    ref = ShardEmbedder("all-minilm-l6-v2", device="cpu", dtype="fp32")
    assert str(low.st[0].auto_model.dtype) == "torch.bfloat16"
    a, b = low.encode(texts).astype(np.float32), ref.encode(texts).astype(np.float32)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= 0.99 and not np.array_equal(a, b)


def test_embedding_resumes_only_missing_shards(tmp_path, sharded_pool, tiny_embedder):
    n_shards = len(sharded_pool.shards)
    assert n_shards == 9   # 100-row shards, never spanning two of the 5 input files
    calls: list[str] = []
    real = embed_mod.Embed.run_shard
    kill = [True]

    def killed_after_three(self, worker, rows):
        if kill[0] and len(calls) == 3:
            raise KeyboardInterrupt("killed")
        calls.append(rows[0]["id"])
        return real(self, worker, rows)

    store = ArtifactStore(tmp_path / "w")
    embed_mod.Embed.run_shard = killed_after_three
    try:
        with pytest.raises(KeyboardInterrupt):
            embed_pool(sharded_pool, store, tiny_embedder)
        assert len(list((tmp_path / "w" / "embed").glob("*/units/*.done.json"))) == 3
        assert not list((tmp_path / "w" / "embed").glob("*/embeddings.npy"))
        calls.clear()
        kill[0] = False
        emb = embed_pool(sharded_pool, store, tiny_embedder)
    finally:
        embed_mod.Embed.run_shard = real
    assert len(calls) == n_shards - 3          # only the missing shards were embedded
    fresh = embed_pool(sharded_pool, ArtifactStore(tmp_path / "fresh"), tiny_embedder)
    np.testing.assert_array_equal(emb.matrix(), fresh.matrix())

    class Boom:   # a finished stage never loads the model again
        def __init__(self, *a, **k):
            raise AssertionError("model loaded for a cached stage")

    orig = embed_mod.ShardEmbedder
    embed_mod.ShardEmbedder = Boom
    try:
        again = embed_pool(sharded_pool, store, tiny_embedder)
    finally:
        embed_mod.ShardEmbedder = orig
    assert again.path == emb.path


def blobs(n_per=200, k=4, d=16, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * 5
    x = np.repeat(centers, n_per, axis=0) + rng.normal(size=(k * n_per, d))
    return x.astype(np.float32), np.repeat(np.arange(k), n_per)


def test_kmeans_recovers_blobs_and_distances():
    from sklearn.metrics import adjusted_rand_score

    x, truth = blobs()
    centroids, labels, cos_dist, l2 = kmeans(x, 4, niter=20, seed=1, nredo=5)
    assert adjusted_rand_score(truth, labels) == 1.0
    c = centroids[labels]
    np.testing.assert_allclose(l2, np.linalg.norm(x - c, axis=1), rtol=1e-4)
    cos = np.sum(x * c, 1) / np.linalg.norm(x, axis=1) / np.linalg.norm(c, axis=1)
    np.testing.assert_allclose(cos_dist, 1 - cos, atol=1e-5)
    again = kmeans(x, 4, niter=20, seed=1, nredo=5)
    np.testing.assert_array_equal(labels, again[1])
    sph = kmeans(x, 4, niter=20, seed=1, spherical=True)
    np.testing.assert_allclose(np.linalg.norm(sph[0], axis=1), 1.0, atol=1e-4)
    with pytest.raises(ValueError, match="k must be"):
        kmeans(x[:3], 4)


def test_kmeans_matches_sklearn_inertia_on_a_float16_memory_map(tmp_path):
    """Sampled bf16 Lloyd + one full-data step on a float16 memmap: inertia close to
    scikit-learn's float32 k-means++ / Lloyd on every row (~1% here with a 1280-row training
    sample), exact returned distances, and every row at its nearest centroid."""
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(200, 32))
    x = centers[rng.integers(0, 200, 6000)] + 0.8 * rng.normal(size=(6000, 32))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    np.save(tmp_path / "x.npy", x)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    xf = x.astype(np.float32)
    c, labels, _, l2 = kmeans(mm, 20, niter=20, seed=0, max_points_per_centroid=64)
    ours = float((l2.astype(np.float64) ** 2).sum())
    np.testing.assert_allclose(ours, ((xf - c[labels]) ** 2).sum(), rtol=1e-4)
    ref = KMeans(20, n_init=1, max_iter=20, random_state=0).fit(xf).inertia_
    assert ours <= 1.03 * ref
    d2 = ((xf[:, None, :] - c[None]) ** 2).sum(-1)                  # every row to its nearest
    gap = d2[np.arange(len(xf)), labels] - d2.min(1)                # bf16 x.c: 2^-8 relative
    assert gap.max() <= 1e-2 and (gap > 0).mean() < 0.02


def test_cluster_stage_cached_by_matrix_and_config(tmp_path, monkeypatch):
    from thresher.pipeline.stages import cluster as cluster_mod

    x, _ = blobs()
    store = ArtifactStore(tmp_path)
    cl = cluster_matrix(store, x, 4, niter=10)
    assert cl.labels.shape == (800,) and cl.centroids.shape == (4, 16)
    assert all(p.endswith(".npy") for p in cl.paths().values())
    monkeypatch.setattr(cluster_mod, "kmeans", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("recomputed")))
    assert cluster_matrix(store, x, 4, niter=10).dir.dir == cl.dir.dir       # cache hit
    with pytest.raises(AssertionError, match="recomputed"):
        cluster_matrix(store, x + 1, 4, niter=10)                           # new matrix: new key


def select(pool, tmp_path, method, budget, seed=0, **options):
    from thresher.pipeline.select import run_select

    out = tmp_path / f"{method}-{seed}-{len(options)}.jsonl"
    run_select(pool.path, method, budget, out, seed=seed, workdir=tmp_path / "work",
               params=options)
    return pl.read_parquet(str(out) + ".selection.parquet"), json.loads(
        (out.parent / (out.name + ".manifest.json")).read_text())


def test_prototypes_hard_keeps_farthest(tmp_path, sample_pool, tiny_embedder):
    chosen, m = select(sample_pool, tmp_path, "prototypes", "50", embedder=tiny_embedder, k=5)
    cl_dir = m["artifacts"]["km"]
    dist = np.load(f"{cl_dir}/cos_dist.npy")
    assert chosen.height == 50
    assert chosen["proto_dist"].min() >= np.sort(dist)[::-1][49] - 1e-6
    easy, _ = select(sample_pool, tmp_path, "prototypes", "50", embedder=tiny_embedder, k=5,
                     keep="easy")
    assert easy["proto_dist"].max() <= np.sort(dist)[49] + 1e-6
    assert m["models"]["embedder"].startswith("st@")


def test_balanced_methods_and_determinism(tmp_path, sample_pool, tiny_embedder):
    cap = sample_pool.meta_field("capability")
    sizes = dict(cap.value_counts().iter_rows())
    chosen, _ = select(sample_pool, tmp_path, "balanced", "200", by="capability")
    got = dict(chosen["capability"].value_counts().iter_rows())
    share = 200 // len(sizes)
    assert all(got[c] >= min(n, share) for c, n in sizes.items())
    again, _ = select(sample_pool, tmp_path, "balanced", "200", by="capability")
    assert chosen["id"].to_list() == again["id"].to_list()
    by_cluster, _ = select(sample_pool, tmp_path, "balanced", "60", by="cluster", k=6,
                           embedder=tiny_embedder)
    assert by_cluster.height == 60 and by_cluster["cluster"].n_unique() == 6
    with pytest.raises(ValueError, match="no row has an original field"):
        select(sample_pool, tmp_path, "balanced", "10", by="nonexistent")


def test_diversity_and_semdedup_methods_deterministic(tmp_path, sample_pool, tiny_embedder):
    a, _ = select(sample_pool, tmp_path, "diversity", "40", embedder=tiny_embedder, threshold=0.999)
    b, _ = select(sample_pool, tmp_path, "diversity", "40", embedder=tiny_embedder, threshold=0.999)
    assert a["id"].to_list() == b["id"].to_list() and a.height == 40
    s1, m = select(sample_pool, tmp_path, "semdedup", "3", seed=3, embedder=tiny_embedder,
                   keep="random", k=4)
    s2, _ = select(sample_pool, tmp_path, "semdedup", "3", seed=3, embedder=tiny_embedder,
                   keep="random", k=4)
    assert s1["id"].to_list() == s2["id"].to_list()
    # every cluster's first row survives, so >= 4 survivors: a budget of 3 is filled by a
    # seeded sample of them, and the reason says so
    assert m["config"]["method"]["survivors"] >= 4 and s1.height == 3
    assert s1["reason"].str.contains("sampled at random").all()
    decisions = pl.read_parquet(m["config"]["method"]["decisions"])
    kept = decisions.filter(pl.col("dup_sim").is_null() | (pl.col("dup_sim") < 0.95))
    assert set(s1["id"]) <= set(kept["id"])


def test_cli_embed_and_cluster_print_paths(tmp_path, sample_pool, tiny_embedder):
    from thresher.pipeline.cli import app
    from typer.testing import CliRunner

    r = CliRunner().invoke(app, ["embed", str(sample_pool.path), "--model", tiny_embedder,
                                 "--part", "first_user", "--workdir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    path = r.output.strip().splitlines()[-1].split("-> ")[-1]
    assert np.load(path, mmap_mode="r").shape == (sample_pool.n_rows, 32)
    r = CliRunner().invoke(app, ["cluster", str(sample_pool.path), "--k", "5", "--spherical",
                                 "--model", tiny_embedder, "--workdir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    labels = next(ln.split("-> ")[1] for ln in r.output.splitlines() if ln.startswith("labels"))
    assert np.load(labels).max() == 4
    r = CliRunner().invoke(app, ["cluster", str(sample_pool.path), "--k", "100000",
                                 "--model", tiny_embedder, "--workdir", str(tmp_path)])
    assert r.exit_code == 2 and "k must be" in r.output


def test_embedding_dtype_is_part_of_the_cache_key(tmp_path, sharded_pool, tiny_embedder):
    """bf16 and fp32 vectors of the same rows are different artifacts; "auto" is resolved
    per device before the key is taken."""
    from thresher.pipeline.models.engine import engine_dtype
    from thresher.pipeline.stages.embed import Embed

    auto = Embed(model=str(tiny_embedder)).bind("cpu")
    assert auto.dtype == str(engine_dtype("cpu", None)).removeprefix("torch.")
    keys = {Embed(model=str(tiny_embedder), dtype=d).bind("cpu").key_config()["dtype"]
            for d in ("fp32", "bf16")}
    assert keys == {"float32", "bfloat16"}
    store = ArtifactStore(tmp_path)
    a = embed_pool(sharded_pool, store, tiny_embedder, part="first_user", dtype="fp32")
    b = embed_pool(sharded_pool, store, tiny_embedder, part="first_user", dtype="bf16")
    assert a.path != b.path and not np.array_equal(a.matrix(), b.matrix())
