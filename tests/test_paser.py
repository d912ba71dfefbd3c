"""PASER: budget allocation, efficiency order, the concept-consistency filter, and the method end to
end on tiny models (cluster table, degradation-proportional budgets, rejected rows reported)."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from conftest import SAMPLE
from thresher.pipeline.select import run_select
from thresher.pipeline.training.prune import prune_model
from thresher.scoring.paser import (
    ConceptExtractor,
    ConceptGraph,
    allocate,
    concept_filter,
    efficiency,
)


def test_allocation_is_proportional_and_hands_out_the_remainder():
    a = allocate(np.array([3.0, 2.0, 1.0]), np.array([100, 100, 100]), 10)
    assert a.sum() == 10 and list(a) == [5, 3, 2]         # 5, 3.33, 1.67 -> remainder to 1.67
    b = allocate(np.array([0.5, 0.3, 0.2]), np.array([2, 100, 100]), 20)
    assert list(b) == [2, 11, 7] and b.sum() == 20         # the full cluster's surplus goes on
    c = allocate(np.array([1.0, 0.0]), np.array([3, 10]), 5)
    assert list(c) == [3, 2]                               # zero weight fills only when needed
    assert allocate(np.array([1.0, 1.0]), np.array([2, 2]), 10).sum() == 4   # room runs out


def test_efficiency_divides_by_log_quadratic_cost():
    e = efficiency(np.array([1.0, 1.0, 0.0]), np.array([10, 100, 5]))
    np.testing.assert_allclose(e, [1 / np.log(100), 1 / np.log(10_000), 0.0])


def test_concept_graph_rejects_two_known_concepts_never_seen_together():
    g = ConceptGraph()
    assert g.consistent({"python", "list"})
    g.add({"python", "list"})
    g.add({"sql", "join"})
    assert g.consistent({"python", "list", "new"})          # the known pair co-occurred
    assert g.consistent({"python", "tuple"})                # only one known concept
    assert not g.consistent({"python", "join"})             # both known, never together


def test_concept_filter_refills_from_other_clusters_and_counts_rejections():
    concepts = {0: {"a", "b"}, 1: {"c", "d"}, 2: {"a", "c"}, 3: {"e"}, 4: {"f"}, 5: {"g"}}
    order = {0: [0, 1, 2], 1: [3, 4, 5]}
    accepted, rejected = concept_filter(order, {0: 3, 1: 1}, {0: 2.0, 1: 1.0}, concepts.get)
    assert rejected == 1                                    # row 2: a and c known, never together
    assert accepted == {0: [0, 1], 1: [3, 4]}               # cluster 0's shortfall went to cluster 1


def test_concepts_are_capped_and_lower_cased():
    ex = ConceptExtractor(max_concepts=3)
    c = ex("Write a Python function that sorts a list of integers with Merge Sort and returns it.")
    assert 0 < len(c) <= 3 and all(x == x.lower() for x in c)


@pytest.fixture(scope="module")
def labelled_pool(tmp_path_factory, sample_pool):
    from thresher.pipeline.io.ingest import ingest
    from thresher.pipeline.io.pool import Pool

    frame = sample_pool.frame(["id", "source", "kind", "messages", "meta", "n_chars"])
    frame = frame.filter((pl.col("kind") == "chat") & (pl.col("n_chars") < 700))
    tmp = tmp_path_factory.mktemp("paser")
    with open(tmp / "rows.jsonl", "w") as f:
        for src in sorted(set(frame["source"]))[:4]:
            for r in frame.filter(pl.col("source") == src).head(12).to_dicts():
                cap = json.loads(r["meta"]).get("capability", src)
                f.write(json.dumps({"id": r["id"], "source": src, "capability": cap,
                                    "messages": r["messages"]}) + "\n")
    ingest([tmp / "rows.jsonl"], tmp / "pool", rows_per_shard=20)
    return Pool(tmp / "pool")


def test_paser_end_to_end_on_tiny_models(tmp_path, labelled_pool, tiny_lm_dir):
    pruned = tmp_path / "pruned"
    prune_model(str(tiny_lm_dir), 0.5, pruned)
    out = tmp_path / "paser.jsonl"
    params = {"pruned_model": str(pruned), "k": 3, "neighbours": 5, "max_concepts": 4}
    m = run_select(labelled_pool.path, "paser", "12", out, workdir=tmp_path / "w", params=params)
    cfg = m["config"]["method"]
    assert cfg["original_model"] == cfg["model"] == str(tiny_lm_dir)  # from pruned/prune.json
    assert {s["stage"] for s in m["stages"]} >= {"embed", "capability_clusters", "jsd"}
    table = cfg["clusters"]
    assert len(table) == 3 and sum(r["size"] for r in table) == labelled_pool.n_rows
    assert sum(r["budget"] for r in table) == 12                     # nothing dropped
    assert sum(r["selected"] for r in table) == m["counts"]["selected"] == 12 - cfg["unfilled"]
    assert all(r["budget"] <= r["size"] for r in table)
    room = [r for r in table if r["budget"] < r["size"]]             # clusters not capped by size
    by_deg = sorted(room, key=lambda r: r["degradation"])
    assert [r["budget"] for r in by_deg] == sorted(r["budget"] for r in by_deg)
    assert isinstance(cfg["concept_rejected_rows"], int) and cfg["concept_rejected_rows"] >= 0
    assert -1.0 <= cfg["ami_capability"] <= 1.0
    assert any("adjusted mutual information" in line for line in cfg["report_lines"])
    sel = pl.read_parquet(f"{out}.selection.parquet")
    assert set(sel.columns) >= {"id", "reason", "cluster", "jsd", "ies"}
    for c, part in sel.group_by("cluster"):
        ies = part.sort("rank")["ies"].to_list()
        assert ies == sorted(ies, reverse=True)                      # efficiency order in cluster
    again = run_select(labelled_pool.path, "paser", "12", tmp_path / "again.jsonl",
                       workdir=tmp_path / "w", params=params)
    assert all(s["cached"] for s in again["stages"] if s["stage"] in ("embed", "jsd"))
    assert (tmp_path / "again.jsonl").read_text() == out.read_text()
    assert again["config"]["method"]["clusters"] == table


def test_paser_needs_a_pruned_model(tmp_path, labelled_pool):
    with pytest.raises(ValueError, match="--param pruned_model=DIR"):
        run_select(labelled_pool.path, "paser", "5", tmp_path / "x.jsonl", workdir=tmp_path / "w")


def test_verify_base_model_measures_recovery_of_the_pruned_model(tmp_path, tiny_lm_dir, sample_pool):
    """`thresher verify --base-model PRUNED`: base = the pruned model untrained, original = its
    unpruned source (from prune.json), the subset and random runs train the pruned model."""
    from thresher.pipeline.cli import app
    from typer.testing import CliRunner

    pruned = tmp_path / "pruned"
    prune_model(str(tiny_lm_dir), 0.5, pruned)
    subset = tmp_path / "pick.jsonl"
    run_select(sample_pool.path, "random", 4, subset, seed=1, workdir=tmp_path / "w")
    gsm8k = SAMPLE / "targets" / "gsm8k_test.jsonl"
    res = CliRunner().invoke(app, ["verify", "--subset", str(subset), "--eval", str(gsm8k),
                                   "--base-model", str(pruned), "--out", str(tmp_path / "v"),
                                   "--max-eval", "3", "--max-new-tokens", "0", "--batch-size", "2",
                                   "--max-tokens", "256", "--lr", "1e-2"])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "v" / "verify.json").read_text())
    assert list(rep["runs"]) == ["base", "original", "pick", "random"]
    assert rep["config"]["model"] == str(pruned) and rep["runs"]["original"]["model"] == str(tiny_lm_dir)
    loss = {k: r["evals"]["gsm8k_test"]["loss"] for k, r in rep["runs"].items()}
    assert loss["base"] != loss["original"] and loss["pick"] != loss["base"]
    assert "| original |" in res.output
    bad = CliRunner().invoke(app, ["verify", "--subset", str(subset), "--eval", str(gsm8k),
                                   "--base-model", str(pruned), "--model", str(tiny_lm_dir)])
    assert bad.exit_code == 2 and "--base-model and --model" in bad.output


def test_capability_clusters_command_prints_the_table_and_ami(tmp_path, labelled_pool):
    from thresher.pipeline.cli import app
    from typer.testing import CliRunner

    res = CliRunner().invoke(app, ["capability-clusters", str(labelled_pool.path), "--k", "4",
                                   "--neighbours", "5", "--workdir", str(tmp_path / "w")])
    assert res.exit_code == 0, res.output
    assert "| cluster | size | top_capability | top_source |" in res.output
    assert "4 clusters (nmf)" in res.output and "adjusted mutual information with capability" in res.output
    bad = CliRunner().invoke(app, ["capability-clusters", str(labelled_pool.path), "--algo", "dbscan",
                                   "--workdir", str(tmp_path / "w")])
    assert bad.exit_code == 2 and "unknown cluster algorithm" in bad.output
