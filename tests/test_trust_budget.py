"""Token budgets fill: down the ranking, every row that still fits is taken and a row too long
for what is left is skipped; the manifest says how many tokens were used of the budget."""

import json

import numpy as np
import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st
from thresher.pipeline.budget import Budget, fill


@settings(max_examples=200, deadline=None, derandomize=True)
@given(tokens=st.lists(st.integers(1, 60), max_size=40), budget=st.integers(1, 400))
def test_fill_is_the_greedy_walk_down_the_ranking(tokens, budget):
    take = fill(np.array(tokens, dtype=np.int64), budget)
    left = budget
    for t, took in zip(tokens, take):       # the definition, one row at a time
        assert took == (t <= left)
        left -= t if took else 0
    assert sum(t for t, k in zip(tokens, take) if k) <= budget
    assert all(t > left for t, k in zip(tokens, take) if not k)   # nothing skipped would fit


def test_the_issue_case_a_long_first_row_no_longer_stops_the_cut():
    ranked = pl.DataFrame({"id": [f"r{i}" for i in range(6)],
                           "n_tokens": [266, 5000, 900, 3000, 700, 200]})
    chosen = Budget.parse("5000tok").cut(ranked, ranked)
    assert chosen["id"].to_list() == ["r0", "r2", "r3", "r4"]        # 266+900+3000+700 = 4866
    assert chosen["n_tokens"].sum() == 4866


def test_a_token_budget_selection_fills_and_says_so(tmp_path):
    from thresher.pipeline.io.ingest import ingest
    from thresher.pipeline.select import run_select

    recs = [{"id": f"r{i}", "messages": [{"role": "user", "content": "word " * (3 + 40 * (i % 4))},
                                         {"role": "assistant", "content": "ok"}]}
            for i in range(40)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    ingest([tmp_path / "in.jsonl"], tmp_path / "pool")
    m = run_select(tmp_path / "pool", "random", "1000tok", tmp_path / "o.jsonl", seed=3)
    tok = m["tokens"]
    assert tok["budget"] == 1000 and tok["selected"] <= 1000
    counts = pl.read_parquet(next((tmp_path / ".thresher-work" / "tokens").glob("*/counts.parquet")))
    chosen = set(pl.read_parquet(tmp_path / "o.jsonl.selection.parquet")["id"])
    unchosen = counts.filter(~pl.col("id").is_in(list(chosen)))
    assert unchosen["n_tokens"].min() > 1000 - tok["selected"]       # nothing left would fit
