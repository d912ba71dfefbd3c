"""SemDeDup on synthetic embeddings with planted near-duplicates, and end to end with MiniLM."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from thresher.pipeline.stages.cluster import kmeans
from thresher.scoring.semdedup import eps_for_fraction, exact_duplicates, id_ranks, semantic_matches


def planted(n_base=60, n_groups=12, copies=2, d=48, seed=0):
    """Unit vectors; for n_groups of them, `copies` near copies (cos > 0.995). Returns
    (emb, ids, groups) where groups[g] = [original, copy, copy...] row indices."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n_base, d))
    rows, groups = [base], []
    nxt = n_base
    for g in range(n_groups):
        noisy = base[g] + 0.03 * np.linalg.norm(base[g]) / np.sqrt(d) * rng.normal(size=(copies, d))
        rows.append(noisy)
        groups.append([g] + list(range(nxt, nxt + copies)))
        nxt += copies
    emb = np.concatenate(rows)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ids = np.array([f"r{i:04d}" for i in range(len(emb))])
    return emb.astype(np.float32), ids, groups


def dedup(emb, ids, keep="hard", k=4, eps=0.01, batch=1024, seed=0):
    _, labels, cos_dist, _ = kmeans(emb, k, niter=20, seed=1234)
    max_sim, dup_of = semantic_matches(emb, labels, cos_dist, ids, keep, seed, batch)
    removed = max_sim >= 1 - eps
    return removed, max_sim, dup_of, labels, cos_dist


def test_removes_exactly_the_planted_copies_and_keeps_one_of_each():
    emb, ids, groups = planted()
    removed, _, dup_of, labels, _ = dedup(emb, ids)
    planted_rows = {r for g in groups for r in g}
    assert set(np.flatnonzero(removed)) <= planted_rows            # nothing else removed
    for g in groups:
        assert len(set(labels[g])) == 1                             # copies share a cluster
        assert (~removed[g]).sum() == 1                             # exactly one survivor each
        assert all(dup_of[r] in g for r in g if removed[r])         # its duplicate_of is a sibling
    assert removed.sum() == sum(len(g) - 1 for g in groups)


@pytest.mark.parametrize("keep", ["hard", "easy"])
def test_hard_and_easy_keep_the_right_member(keep):
    emb, ids, groups = planted()
    removed, _, _, _, cos_dist = dedup(emb, ids, keep=keep)
    for g in groups:
        survivor = g[int(np.flatnonzero(~removed[g])[0])]
        dists = cos_dist[g]
        want = g[int(np.argmax(dists))] if keep == "hard" else g[int(np.argmin(dists))]
        assert survivor == want


def test_random_keep_is_seeded_and_keeps_one():
    emb, ids, groups = planted(n_groups=20)
    a = dedup(emb, ids, keep="random", seed=0)[0]
    b = dedup(emb, ids, keep="random", seed=0)[0]
    c = dedup(emb, ids, keep="random", seed=9)[0]
    assert (a == b).all() and not (a == c).all()
    for g in groups:
        assert (~a[g]).sum() == 1


def test_batching_and_naive_reference_agree():
    emb, ids, _ = planted(n_base=80, n_groups=10, copies=3)
    _, labels, cos_dist, _ = kmeans(emb, 3, niter=10, seed=1)
    big = semantic_matches(emb, labels, cos_dist, ids, "hard", 0, batch=1024)
    small = semantic_matches(emb, labels, cos_dist, ids, "hard", 0, batch=3)
    np.testing.assert_array_equal(big[1], small[1])
    np.testing.assert_allclose(big[0], small[0], rtol=0, atol=1e-6)   # float32 GEMM shapes differ
    # naive: full similarity matrix of each cluster in hard order, strict upper triangle
    for c in np.unique(labels):
        m = np.flatnonzero(labels == c)
        order = m[np.lexsort((ids[m], cos_dist[m]))[::-1]]
        s = np.triu(emb[order] @ emb[order].T, k=1)
        s[np.tril_indices(len(order))] = -np.inf
        ref = s.max(axis=0)[1:]
        np.testing.assert_allclose(big[0][order[1:]], ref, rtol=1e-5)
        assert np.isnan(big[0][order[0]])                         # the first has no earlier row


def test_id_ranks_break_ties_as_the_ids_do_and_excluded_rows_take_no_part():
    emb, _, _ = planted(n_base=40, n_groups=8, copies=2)
    emb = np.repeat(emb[:20], 3, axis=0)                  # every distance tied three ways
    rng = np.random.default_rng(3)
    ids = np.array([f"{w}-{i}" for i, w in enumerate(rng.choice(["b", "a", "c", "aa"], 60))])
    _, labels, cos_dist, _ = kmeans(emb, 4, niter=10, seed=1)
    include = rng.random(60) > 0.2
    for keep in ("hard", "easy"):
        by_str = semantic_matches(emb, labels, cos_dist, ids, keep, include=include)
        by_rank = semantic_matches(emb, labels, cos_dist, id_ranks(pl.Series(ids)), keep,
                                   include=include)
        np.testing.assert_array_equal(by_str[1], by_rank[1])
        assert (by_str[1][~include] == -1).all() and np.isnan(by_str[0][~include]).all()
        assert (by_str[1][include] >= 0).sum() > 0
    none = semantic_matches(emb, labels, cos_dist, ids, include=np.zeros(60, bool))
    assert (none[1] == -1).all()


def test_exact_duplicates_normalise_case_and_space():
    out = exact_duplicates(["Hello  World", "other", "hello world\n", "HELLO WORLD", "other "])
    assert out.tolist() == [-1, -1, 0, 0, 1]


def test_eps_for_fraction_hits_target():
    rng = np.random.default_rng(0)
    max_sim = rng.random(1000).astype(np.float32)
    include = np.ones(1000, bool)
    for target in (0.3, 0.5, 0.9):
        eps = eps_for_fraction(max_sim, include, target)
        kept = (~(max_sim >= 1 - eps)).mean()
        assert abs(kept - target) <= 0.002
    assert eps_for_fraction(max_sim, include, 1.0) == 0.0
    with pytest.raises(ValueError):
        eps_for_fraction(max_sim, include, 0.0)


@pytest.mark.slow
def test_cli_semdedup_real_minilm_removes_planted_copies(tmp_path, sample_pool_dir):
    """Real MiniLM on 40 sample rows + 8 exact copies (case/space changed) + 8 near copies."""
    from thresher.pipeline.cli import app
    from typer.testing import CliRunner

    def read(name):
        return [json.loads(line) for line in (sample_pool_dir / name).read_text().splitlines()]

    rows = read("gsm8k_train.jsonl")[:25] + read("mbpp.jsonl")[:15]
    extra, planted_pairs = [], []
    for i, r in enumerate(rows[:16]):
        copy = json.loads(json.dumps(r))
        copy["id"] = f"copy-{i}"
        user = copy["messages"][0]
        if i < 8:    # exact after normalisation
            user["content"] = "  " + user["content"].upper() + "  "
        else:        # near copy: one extra word
            user["content"] = user["content"] + " Thanks."
        extra.append(copy)
        planted_pairs.append((r["id"], copy["id"]))
    src = tmp_path / "pool.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows + extra))
    runner = CliRunner()
    res = runner.invoke(app, ["ingest", str(src), "--out", str(tmp_path / "pool")])
    assert res.exit_code == 0, res.output
    out = tmp_path / "dedup.jsonl"
    res = runner.invoke(app, ["select", str(tmp_path / "pool"), "--method", "semdedup",
                              "--budget", "100%", "--out", str(out), "--param", "k=3"])
    assert res.exit_code == 0, res.output
    kept = set(pl.read_parquet(str(out) + ".selection.parquet")["id"])
    for orig, copy in planted_pairs:
        assert len({orig, copy} & kept) == 1, (orig, copy)         # one of each pair
    assert kept == {r["id"] for r in rows} - {o for o, c in planted_pairs if c in kept} \
        | {c for o, c in planted_pairs if c in kept}                # no other row removed
    manifest = json.loads((tmp_path / "dedup.jsonl.manifest.json").read_text())
    decisions = pl.read_parquet(manifest["config"]["method"]["decisions"])
    assert decisions.height == 56 and manifest["config"]["method"]["exact_duplicates"] == 8
    assert set(decisions.filter(pl.col("exact_duplicate_of").is_not_null())["id"]) == \
        {f"copy-{i}" for i in range(8)}
