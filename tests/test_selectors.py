"""Selectors on synthetic frames: balanced, stratified, diversity (budgets in rows and tokens)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from thresher.pipeline.budget import Budget
from thresher.selectors.balanced import Balanced, allocate_smallest_first
from thresher.selectors.diversity import DiversityFilter
from thresher.selectors.stratified import Stratified


def frame(groups: dict[str, int], seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    g = [name for name, size in groups.items() for _ in range(size)]
    return pl.DataFrame({"id": [f"r{i:05d}" for i in range(len(g))], "group": g,
                         "n_tokens": rng.integers(10, 200, len(g)),
                         "score": rng.random(len(g))})


def counts(chosen: pl.DataFrame, cands: pl.DataFrame) -> dict[str, int]:
    j = chosen.select("id").join(cands.select("id", "group"), on="id")
    return dict(j["group"].value_counts().iter_rows())


def test_allocation_smallest_first_rolls_over():
    # smallest first: 3 -> min(3, 60//3)=3; 50 -> min(50, 57//2)=28; 200 -> 29
    assert allocate_smallest_first([200, 3, 50], 60) == [29, 3, 28]
    assert allocate_smallest_first([5, 5], 100) == [5, 5]         # budget beyond the pool
    assert sum(allocate_smallest_first([7, 9, 11, 13], 23)) == 23


def test_balanced_gives_each_group_min_size_share():
    cands = frame({"a": 3, "b": 50, "c": 200, "d": 12})
    chosen = Balanced("group").select(cands, Budget.parse("80"), seed=1)
    # a: min(3, 80//4=20)=3; d: min(12, 77//3=25)=12; b: min(50, 65//2=32)=32; c: 33
    assert counts(chosen, cands) == {"a": 3, "d": 12, "b": 32, "c": 33}
    assert chosen.height == 80 and chosen["id"].n_unique() == 80
    assert chosen["reason"].str.contains("balanced by group").all()
    # interleaved: the first four picks cover all four groups, smallest group first
    first = chosen.head(4).join(cands.select("id", "group"), on="id", maintain_order="left")
    assert first["group"].to_list() == ["a", "d", "b", "c"]


def test_balanced_sets_aside_tiny_groups_as_s2l():
    """S2L (methods-a §4.3): clusters of <= 2 rows wait; the big ones go smallest first; the
    leftover budget is drawn from the pooled tiny clusters."""
    cands = frame({"t1": 1, "t2": 2, "a": 4, "b": 30})
    chosen = Balanced("group", set_aside=2).select(cands, Budget.parse("10"), seed=0)
    # big: a: min(4, 10//2)=4, b: min(30, 6)=6 -> nothing left for t1/t2
    assert counts(chosen, cands) == {"a": 4, "b": 6}
    chosen = Balanced("group", set_aside=2).select(cands, Budget.parse("36"), seed=0)
    # a 4, b 30 -> 2 left, drawn from the 3 pooled rows of t1 + t2, placed last
    got = counts(chosen, cands)
    assert got["a"] == 4 and got["b"] == 30 and got.get("t1", 0) + got.get("t2", 0) == 2
    assert chosen.tail(2)["reason"].str.contains("leftover budget").all()
    plain = Balanced("group").select(cands, Budget.parse("10"), seed=0)
    assert counts(plain, cands)["t1"] == 1                   # without set-aside t1 is served first
    with pytest.raises(ValueError, match="set_aside"):
        Balanced("group", set_aside=-1)


def test_balanced_deterministic_and_order_free():
    cands = frame({"a": 30, "b": 70})
    one = Balanced("group").select(cands, Budget.parse("40"), seed=5)
    two = Balanced("group").select(cands.sample(fraction=1.0, shuffle=True, seed=3),
                                   Budget.parse("40"), seed=5)
    other = Balanced("group").select(cands, Budget.parse("40"), seed=6)
    assert one["id"].to_list() == two["id"].to_list()
    assert set(one["id"]) != set(other["id"])


def test_balanced_null_group_is_kept_as_its_own_group():
    cands = frame({"a": 10, "b": 10}).with_columns(
        group=pl.when(pl.col("id") < "r00003").then(None).otherwise(pl.col("group")))
    chosen = Balanced("group").select(cands, Budget.parse("100%"), seed=0)
    assert chosen.height == cands.height                     # nothing silently lost
    assert chosen["reason"].str.contains(r"\(none\)").sum() == 3
    with pytest.raises(ValueError, match="no group column"):
        Balanced("nope").select(cands, Budget.parse("5"), 0)


@pytest.mark.parametrize("make", [
    lambda: Balanced("group"),
    lambda: Stratified("score", bins=5),
    lambda: DiversityFilter(np.random.default_rng(0).normal(size=(300, 16)), threshold=0.95),
])
def test_token_budget_respected(make):
    cands = frame({"a": 100, "b": 200}).with_row_index("row")
    chosen = make().select(cands, Budget.parse("3000tok"), seed=0)
    used = chosen.select("id").join(cands.select("id", "n_tokens"), on="id")["n_tokens"].sum()
    assert 0 < used <= 3000
    assert chosen.height >= 3000 // 200          # not trivially small


def test_stratified_covers_every_bin_evenly():
    cands = pl.DataFrame({"id": [f"r{i:04d}" for i in range(1000)],
                          "score": np.linspace(0, 1, 1000)})
    chosen = Stratified("score", bins=10).select(cands, Budget.parse("50"), seed=0)
    bins = (chosen.join(cands, on="id")["score"].to_numpy() * 10).clip(0, 9.999).astype(int)
    assert np.bincount(bins, minlength=10).tolist() == [5] * 10
    assert chosen["reason"].str.contains("stratum").all()


def test_stratified_small_bins_taken_whole_and_hard_prune():
    rng = np.random.default_rng(0)
    s = np.concatenate([rng.random(900) * 0.5, 0.5 + rng.random(100) * 0.5])   # skewed
    cands = pl.DataFrame({"id": [f"r{i:04d}" for i in range(1000)], "score": s})
    chosen = Stratified("score", bins=2).select(cands, Budget.parse("300"), seed=0)
    upper = chosen.join(cands, on="id").filter(pl.col("score") > 0.5 + 1e-9).height
    assert upper == 100 and chosen.height == 300            # small bin whole, rest rolls over
    pruned = Stratified("score", bins=4, hard_prune=0.1).select(cands, Budget.parse("500"), seed=0)
    cut = np.sort(s)[::-1][99]                                # the 100th highest score
    assert pruned.join(cands, on="id")["score"].max() < cut
    assert pruned["reason"].str.contains("pruned first").all()
    with pytest.raises(ValueError, match="no score"):
        Stratified("score").select(cands.with_columns(score=pl.lit(None)), Budget.parse("5"), 0)


def naive_deita(emb: np.ndarray, order: list[int], tau: float, n: int) -> list[int]:
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    out: list[int] = []
    for i in order:
        if out and (x[out] @ x[i]).max() > tau:
            continue
        out.append(i)
        if len(out) == n:
            break
    return out


def test_diversity_matches_one_by_one_greedy_and_threshold():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(20, 24))
    emb = np.repeat(centers, 15, axis=0) + 0.3 * rng.normal(size=(300, 24))   # dense blobs
    cands = pl.DataFrame({"id": [f"r{i:04d}" for i in range(300)], "row": np.arange(300),
                          "score": rng.random(300)})
    f = DiversityFilter(emb.astype(np.float16), threshold=0.8, score="score", chunk=7)
    chosen = f.select(cands, Budget.parse("60"), seed=0)
    order = cands.sort(["score", "id"], descending=[True, False])["row"].to_list()
    expected = naive_deita(emb.astype(np.float16).astype(np.float32), order, 0.8, 60)
    assert chosen["row"].to_list() == expected
    x = emb[chosen["row"].to_numpy()]
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = x @ x.T
    np.fill_diagonal(sims, -1)
    assert sims.max() <= 0.8 + 1e-3                           # no two chosen above tau
    assert chosen["reason"].str.contains("score rank").all()


def test_diversity_random_order_is_seeded():
    emb = np.random.default_rng(1).normal(size=(100, 8))
    cands = pl.DataFrame({"id": [f"r{i:03d}" for i in range(100)], "row": np.arange(100)})
    a = DiversityFilter(emb, 0.9).select(cands, Budget.parse("20"), seed=3)
    b = DiversityFilter(emb, 0.9).select(cands.reverse(), Budget.parse("20"), seed=3)
    c = DiversityFilter(emb, 0.9).select(cands, Budget.parse("20"), seed=4)
    assert a["id"].to_list() == b["id"].to_list() and a["id"].to_list() != c["id"].to_list()
