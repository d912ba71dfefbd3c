"""RDS+: the round-robin selector, the FAISS-backed lazy lists against brute force, the method."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from thresher.pipeline.budget import Budget
from thresher.pipeline.stages.topk import BlockIndex
from thresher.scoring.rds import FaissRanking, rds_lists
from thresher.selectors.round_robin import RoundRobin, StaticList

ROOT_TARGETS = Path(__file__).resolve().parent.parent / "data" / "sample" / "targets"


def cands(n):
    return pl.DataFrame({"id": [f"r{i}" for i in range(n)], "n_tokens": [10 * (i + 1) for i in range(n)]})


def ids(sel):
    return [int(i[1:]) for i in sel["id"]]


def test_round_robin_duplicate_uses_up_the_turn_like_rds_code():
    lists = [StaticList([0, 1, 2]), StaticList([1, 3, 4])]
    sel = RoundRobin(lists).select(cands(6), Budget.parse("5"), 0)
    # q0:0, q1:1, q0:1 (taken: turn lost), q1:3, q0:2, q1:4
    assert ids(sel) == [0, 1, 3, 2, 4]
    assert sel["picked_by"].to_list() == ["0", "1", "1", "0", "1"]


def test_round_robin_retry_takes_best_untaken():
    lists = [StaticList([0, 1, 2]), StaticList([1, 3, 4])]
    sel = RoundRobin(lists, retry_duplicates=True).select(cands(6), Budget.parse("5"), 0)
    assert ids(sel) == [0, 1, 2, 3, 4]


def test_round_robin_budget_no_duplicates_and_exhaustion():
    rng = np.random.default_rng(0)
    lists = [StaticList(rng.permutation(50)) for _ in range(4)]
    for budget in ("1", "7", "50", "80"):
        sel = RoundRobin(lists).select(cands(50), Budget.parse(budget), 0)
        assert sel.height == min(int(budget), 50)
        assert sel["id"].n_unique() == sel.height
    short = [StaticList([3]), StaticList([3, 4])]
    sel = RoundRobin(short).select(cands(10), Budget.parse("10"), 0)
    assert ids(sel) == [3, 4]                     # every list exhausted: stops, no error


def test_round_robin_token_budget():
    lists = [StaticList([9, 8, 7, 6, 5]), StaticList([0, 1, 2, 3, 4])]
    sel = RoundRobin(lists).select(cands(10), Budget.parse("150tok"), 0)
    assert ids(sel) == [9, 0]          # 100 + 10 tokens; row 8 (90 more) would overflow
    assert sel["n_tokens"].sum() <= 150
    sel = RoundRobin(lists).select(cands(10), Budget.parse("105tok"), 0)
    assert ids(sel) == [9]


def _take_round_robin(orders, n):
    """Each ranked list in turn offers its next row; a row already taken costs that turn."""
    chosen, ptr, seen = [], [0] * len(orders), set()
    while len(chosen) < n:
        for v in range(len(orders)):
            d = orders[v][ptr[v]]
            ptr[v] += 1
            if d not in seen:
                seen.add(d)
                chosen.append(int(d))
            if len(chosen) >= n:
                break
    return chosen


def brute_single(E_q, E_pool, n):
    """methods-a.md §3.7 select_single, verbatim in spirit: full matrix, argsort, dedup."""
    return _take_round_robin(np.argsort(-(E_q @ E_pool.T), axis=1, kind="stable"), n)


def brute_multi(tasks, E_pool, n):
    S_t = [(E_q @ E_pool.T).max(0) for E_q in tasks]
    return _take_round_robin([np.argsort(-s, kind="stable") for s in S_t], n)


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_guard_caps_each_group_and_walks_down_without_losing_the_turn():
    # list 0 prefers group a's rows 0-4, list 1 group a too, then b rows 5-9
    lists = [StaticList([0, 1, 2, 3, 5, 6]), StaticList([4, 0, 7, 8, 9])]
    groups = np.array(["a"] * 5 + ["b"] * 5)
    rr = RoundRobin(lists, groups=groups, max_share=0.5, group_by="source")
    sel = rr.select(cands(10), Budget.parse("6"), 0)
    got = ids(sel)
    assert len(got) == 6 and sum(g < 5 for g in got) == 3          # cap = ceil(0.5 * 6) = 3
    # L0 0, L1 4, L0 1 (a now full), L1 0 is taken (turn lost, as RDS+), L0 walks past 2 and 3
    # (a full) to 5 in the same turn, L1 7, L0 6
    assert got == [0, 4, 1, 5, 7, 6]
    g = rr.notes["guard"]
    assert g["cap_rows"] == 3 and g["rows_per_group"] == {"a": 3, "b": 3}
    assert g["skipped_for_cap"] >= 2 and g["filled_past_cap"] == 0
    plain = ids(RoundRobin(lists).select(cands(10), Budget.parse("6"), 0))
    assert sum(x < 5 for x in plain) == 5                        # without the guard: 5 of 6 from a


def test_guard_fills_past_the_cap_rather_than_leave_budget_unspent(caplog):
    lists = [StaticList([0, 1, 2, 3, 5])]
    groups = np.array(["a"] * 5 + ["b"] * 5)
    rr = RoundRobin(lists, groups=groups, max_share=0.25)
    got = ids(rr.select(cands(10), Budget.parse("4"), 0))
    assert len(got) == 4 and got[:2] == [0, 5]           # cap 1 of a, then b's only listed row
    assert rr.notes["guard"]["filled_past_cap"] == 2
    one = RoundRobin(lists, groups=np.array(["a"] * 10), max_share=0.25)
    with caplog.at_level("WARNING"):
        assert ids(one.select(cands(10), Budget.parse("4"), 0)) == [0, 1, 2, 3]
    assert "not_applied" in one.notes["guard"]
    assert "max_share=0.25 cannot bind: every candidate has the same group" in caplog.text
    with pytest.raises(ValueError, match="max_share"):
        RoundRobin(lists, groups=groups, max_share=0)

@pytest.fixture
def space():
    rng = np.random.default_rng(1)
    pool = unit(rng.normal(size=(400, 16)))
    tasks = [unit(rng.normal(size=(5, 16))), unit(rng.normal(size=(3, 16))), unit(rng.normal(size=(1, 16)))]
    return pool, tasks


def test_faiss_lists_grow_and_match_brute_force_max(space):
    pool, tasks = space
    index = BlockIndex(pool, np.arange(len(pool)))
    ranking = FaissRanking(index, tasks[0], k=4)          # tiny k: forces several regrowths
    rows, scores = ranking.ranked([0, 1, 2, 3, 4], 120)
    ref = (tasks[0] @ pool.T).max(0)
    assert rows.tolist() == np.argsort(-ref, kind="stable")[:120].tolist()
    np.testing.assert_allclose(scores, np.sort(ref)[::-1][:120], rtol=1e-5)
    assert ranking.k < len(pool)                          # never needed the whole pool
    one, _ = ranking.ranked([2], 30)
    assert one.tolist() == np.argsort(-(tasks[0][2] @ pool.T), kind="stable")[:30].tolist()


@pytest.mark.parametrize("n", [1, 17, 100, 400])
def test_rds_selection_equals_the_spec_pseudocode(space, n):
    pool, tasks = space
    index = BlockIndex(pool.astype(np.float16), np.arange(len(pool)))
    c = cands(len(pool))
    lists, names, what = rds_lists(index, tasks[:1], ["gsm"], n)
    assert what == "target example" and len(lists) == 5
    got = ids(RoundRobin(lists, names).select(c, Budget.parse(str(n)), 0))
    assert got == brute_single(tasks[0], unit(pool.astype(np.float16).astype(np.float32)), n)
    lists, names, what = rds_lists(index, tasks, ["a", "b", "c"], n)
    assert what == "task" and names == ["a", "b", "c"]
    got = ids(RoundRobin(lists, names).select(c, Budget.parse(str(n)), 0))
    assert got == brute_multi(tasks, unit(pool.astype(np.float16).astype(np.float32)), n)


def _small_pool_file(path, sample_pool, per_source=8):
    frame = sample_pool.frame(["id", "source", "kind", "messages", "text", "n_chars"])
    frame = frame.filter(pl.col("n_chars") < 1200)
    with open(path, "w") as f:
        for src in sorted(set(frame["source"])):
            for r in frame.filter(pl.col("source") == src).head(per_source).to_dicts():
                rec = {"id": r["id"], "source": r["source"]}
                rec.update({"messages": r["messages"]} if r["kind"] == "chat" else {"text": r["text"]})
                f.write(json.dumps(rec) + "\n")


def _head(src, dst, n):
    with open(src) as f, open(dst, "w") as g:
        g.writelines(line for _, line in zip(range(n), f))


def test_rds_method_end_to_end_on_tiny_model(tmp_path, sample_pool, tiny_lm_dir):
    from thresher.pipeline.io.ingest import ingest
    from thresher.pipeline.select import run_select

    _small_pool_file(tmp_path / "rows.jsonl", sample_pool, per_source=6)
    ingest([tmp_path / "rows.jsonl"], tmp_path / "pool", rows_per_shard=10)
    _head(ROOT_TARGETS / "gsm8k_test.jsonl", tmp_path / "gsm.jsonl", 6)
    _head(ROOT_TARGETS / "mbpp_test.jsonl", tmp_path / "mbpp.jsonl", 4)
    opts = {"model": str(tiny_lm_dir)}
    tgts = [str(tmp_path / "gsm.jsonl"), str(tmp_path / "mbpp.jsonl")]
    m = run_select(tmp_path / "pool", "rds", "9", tmp_path / "out.jsonl", workdir=tmp_path / "w", params=opts,
                   targets=tgts)
    sel = pl.read_parquet(tmp_path / "out.jsonl.selection.parquet")
    assert sel.height == 9 and sel["id"].n_unique() == 9
    assert sel["picked_by"].to_list()[:2] == ["gsm", "mbpp"]     # round-robin over tasks
    assert set(sel["picked_by"]) == {"gsm", "mbpp"}
    assert m["models"]["lm"].startswith(tiny_lm_dir.name)
    assert m["config"]["method"]["target_rows"] == {"gsm": 6, "mbpp": 4}
    again = run_select(tmp_path / "pool", "rds", "9", tmp_path / "out2.jsonl", workdir=tmp_path / "w", params=opts,
                       targets=tgts)
    assert pl.read_parquet(tmp_path / "out2.jsonl.selection.parquet")["id"].equals(sel["id"])
    # the rerun recomputed nothing: the pool's and both targets' forward stages were cached
    fwd = [s for s in again["stages"] if s["stage"] == "forward"]
    assert len(fwd) == 3 and all(s["cached"] and s["units_computed"] == 0 for s in fwd)
    assert [s["units_computed"] > 0 for s in m["stages"] if s["stage"] == "forward"] == [True] * 3
    with pytest.raises(ValueError, match="needs --target"):
        run_select(tmp_path / "pool", "rds", "9", tmp_path / "o3.jsonl", workdir=tmp_path / "w",
                   params={"model": str(tiny_lm_dir)})
    with pytest.raises(FileNotFoundError, match="--target .*nope.jsonl: no such file"):
        run_select(tmp_path / "pool", "rds", "9", tmp_path / "o3.jsonl", workdir=tmp_path / "w",
                   params={"model": str(tiny_lm_dir)}, targets=[str(tmp_path / "nope.jsonl")])


@pytest.mark.slow
def test_rds_with_smollm2_picks_rows_like_the_target(tmp_path, sample_pool, request):
    """Real SmolLM2-135M on ~30 sample rows: a GSM8K target picks mostly gsm8k, MBPP mostly mbpp."""
    import torch
    from thresher.pipeline.io.ingest import ingest
    from thresher.pipeline.select import run_select

    _small_pool_file(tmp_path / "rows.jsonl", sample_pool, per_source=6)
    ingest([tmp_path / "rows.jsonl"], tmp_path / "pool")
    saved = torch.get_num_threads()
    torch.set_num_threads(1)     # one thread: 10x faster than two on a shared 2-core CPU here
    request.addfinalizer(lambda: torch.set_num_threads(saved))
    src = dict(sample_pool.frame(["id", "source"]).iter_rows())
    for name, want in (("gsm8k_test", "gsm8k"), ("mbpp_test", "mbpp")):
        _head(ROOT_TARGETS / f"{name}.jsonl", tmp_path / f"{name}.jsonl", 6)
        run_select(tmp_path / "pool", "rds", "6", tmp_path / f"{name}.out.jsonl", workdir=tmp_path / "w",
                   params={"max_tokens": 512}, targets=[str(tmp_path / f"{name}.jsonl")])
        sel = pl.read_parquet(tmp_path / f"{name}.out.jsonl.selection.parquet")
        picked = [src[i] for i in sel["id"]]
        assert picked.count(want) >= 5, (name, picked)    # 6 of the ~30 rows are `want`


def test_rds_with_embedder_vectors_and_source_guard(tmp_path, sample_pool):
    """vectors=embed: the sentence embedder represents pool and targets (no LM loaded); the guard
    caps every source at its share and the manifest says so."""
    from thresher.pipeline.io.ingest import ingest
    from thresher.pipeline.select import run_select

    _small_pool_file(tmp_path / "rows.jsonl", sample_pool, per_source=6)
    ingest([tmp_path / "rows.jsonl"], tmp_path / "pool", rows_per_shard=10)
    _head(ROOT_TARGETS / "gsm8k_test.jsonl", tmp_path / "gsm.jsonl", 6)
    src = dict(sample_pool.frame(["id", "source"]).iter_rows())
    plain = run_select(tmp_path / "pool", "rds", "8", tmp_path / "plain.jsonl", workdir=tmp_path / "w",
                       params={"vectors": "embed"}, targets=[str(tmp_path / "gsm.jsonl")])
    assert [s["stage"] for s in plain["stages"] if s.get("units_computed")] == ["embed", "target", "embed"]
    assert plain["models"] and all("minilm" in v.lower() for v in plain["models"].values())
    picked = [src[i] for i in pl.read_parquet(tmp_path / "plain.jsonl.selection.parquet")["id"]]
    assert picked.count("gsm8k") >= 5, picked                   # the embedder finds GSM8K rows
    m = run_select(tmp_path / "pool", "rds", "8", tmp_path / "guard.jsonl", workdir=tmp_path / "w",
                   params={"vectors": "embed", "max_share": 0.25}, targets=[str(tmp_path / "gsm.jsonl")])
    picked = [src[i] for i in pl.read_parquet(tmp_path / "guard.jsonl.selection.parquet")["id"]]
    assert len(picked) == 8 and max(picked.count(s) for s in set(picked)) <= 2
    guard = m["config"]["method"]["guard"]
    assert guard["cap_rows"] == 2 and guard["by"] == "source" and sum(guard["rows_per_group"].values()) == 8


def test_cluster_guard_caps_clusters_of_a_single_source_pool(tmp_path, sample_pool, caplog):
    """One source: the source cap cannot bind (a warning says so); guard_by=cluster caps k-means
    clusters of the same vectors, reported in the manifest, and the plan holds the k-means."""
    from thresher.pipeline.io.ingest import ingest
    from thresher.pipeline.select import run_select

    _small_pool_file(tmp_path / "mixed.jsonl", sample_pool, per_source=6)
    rows = [json.loads(line) for line in (tmp_path / "mixed.jsonl").read_text().splitlines()]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({**r, "source": "one"}) + "\n" for r in rows))
    ingest([tmp_path / "rows.jsonl"], tmp_path / "pool", rows_per_shard=10)
    _head(ROOT_TARGETS / "gsm8k_test.jsonl", tmp_path / "gsm.jsonl", 6)
    args = {"workdir": tmp_path / "w", "targets": [str(tmp_path / "gsm.jsonl")]}
    with caplog.at_level("WARNING"):
        src = run_select(tmp_path / "pool", "rds", "8", tmp_path / "src.jsonl",
                         params={"vectors": "embed", "max_share": 0.25}, **args)
    assert "cannot bind: every candidate has the same source; --param guard_by=cluster" in caplog.text
    assert src["config"]["method"]["guard"]["rows_per_group"] == {"one": 8}
    m = run_select(tmp_path / "pool", "rds", "8", tmp_path / "cl.jsonl",
                   params={"vectors": "embed", "max_share": 0.25, "guard_by": "cluster",
                           "guard_k": 6}, **args)
    assert any(s["stage"] == "kmeans" for s in m["stages"])
    g = m["config"]["method"]["guard"]
    assert g["by"] == "cluster" and g["cap_rows"] == 2 and sum(g["rows_per_group"].values()) == 8
    assert all(name.startswith("cluster ") for name in g["rows_per_group"])
    # every row past a cluster's cap of 2 is one the guard says it filled past the cap
    assert sum(max(0, n - 2) for n in g["rows_per_group"].values()) == g["filled_past_cap"]
    assert len(g["rows_per_group"]) >= 4 and g["skipped_for_cap"] > 0       # it did bind
    chosen = pl.read_parquet(tmp_path / "cl.jsonl.selection.parquet")["id"].to_list()
    assert len(chosen) == len(set(chosen)) == 8


def test_without_a_cap_the_selection_make_up_is_still_reported():
    lists = [StaticList([0, 1, 2, 3, 5])]
    rr = RoundRobin(lists, groups=np.array(["a"] * 5 + ["b"] * 5), group_by="source")
    assert ids(rr.select(cands(10), Budget.parse("4"), 0)) == [0, 1, 2, 3]
    g = rr.notes["guard"]
    assert g["cap_rows"] is None and g["max_share"] == 1.0 and g["rows_per_group"] == {"a": 4}
    assert "not_applied" not in g and g["skipped_for_cap"] == 0
