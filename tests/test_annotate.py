"""Annotate, then filter: the AnnotationStage base (per-shard cache, streamed assembly), the filter
convention (keep, reason, per-rule counts), the KeepFlag selector and annotate-only runs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from thresher.pipeline import registry
from thresher.pipeline.artifacts import ArtifactStore
from thresher.pipeline.budget import Budget
from thresher.pipeline.filtering import Rule, apply_rules
from thresher.pipeline.io.ingest import ingest
from thresher.pipeline.io.pool import Pool
from thresher.pipeline.method import Inputs, Method, Request
from thresher.pipeline.plan import run_stage
from thresher.pipeline.select import run_select
from thresher.pipeline.stages.annotate import AnnotationStage
from thresher.selectors.keep_flag import KeepFlag
from thresher.selectors.threshold import Threshold

CALLS: list[int] = []        # rows each run_shard call saw (to see what the cache spared)


@dataclass(frozen=True)
class CharCount(AnnotationStage):
    """A toy annotation: characters and digits of a row's text (conversation for chat rows)."""

    kind: ClassVar[str] = "test-chars"

    def schema(self):
        return pa.schema([("n", pa.int64()), ("digits", pa.float32())])

    def annotate(self, worker, rows):
        CALLS.append(len(rows))
        texts = [r["text"] if r["kind"] == "text" else " ".join(m["content"] for m in r["messages"])
                 for r in rows]
        return {"n": [len(t) for t in texts],
                "digits": np.array([sum(c.isdigit() for c in t) / max(len(t), 1) for t in texts])}


@dataclass(frozen=True)
class CharParams:
    max_digits: float = field(default=0.05, metadata={"help": "drop above this digit share"})
    min_chars: int = 20


class CharFilter(Method):
    name, summary = "test-chars", "toy filter on characters"
    Params = CharParams

    def needs(self, p, req: Request):
        return {"chars": CharCount()}

    def score(self, p, inputs: Inputs):
        frame = inputs["chars"].frame()
        scores, counts = apply_rules(frame, [Rule("min_chars", pl.col("n") < p.min_chars),
                                             Rule("max_digits", pl.col("digits") > p.max_digits)])
        inputs.note("rules", counts)
        return scores

    def selector(self, p, inputs, scored):
        return KeepFlag(kept="passes the character rules")


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _pool(tmp_path, n=12, per_shard=5):
    rows = [{"id": f"t{i}", "text": ("word " * (i + 1)) + ("7" * (i % 3) * 4)} for i in range(n)]
    _write(tmp_path / "in.jsonl", rows)
    ingest([tmp_path / "in.jsonl"], tmp_path / "pool", rows_per_shard=per_shard)
    return Pool(tmp_path / "pool")


@pytest.fixture
def toy_method(monkeypatch):
    monkeypatch.setitem(registry.METHODS, "test-chars", "test_annotate:CharFilter")


def test_stage_assembles_pool_order_and_caches_per_shard(tmp_path):
    pool = _pool(tmp_path)
    store = ArtifactStore(tmp_path / "work")
    CALLS.clear()
    ann = run_stage(CharCount(), pool, store)
    assert CALLS == [5, 5, 2]                           # one call per shard
    frame = ann.frame()
    assert frame.columns == ["id", "n", "digits"]
    assert frame["id"].to_list() == pool.frame(["id"])["id"].to_list()
    text = pool.frame(["text"])["text"].to_list()
    assert frame["n"].to_list() == [len(t) for t in text]
    assert ann.frame(["digits"]).columns == ["id", "digits"]
    assert ann.scan().filter(pl.col("n") > 30).collect().height == sum(len(t) > 30 for t in text)
    assert ann.fingerprint.startswith("test-chars:")
    # the pool-level file is complete: a rerun loads it and computes nothing
    CALLS.clear()
    again = run_stage(CharCount(), pool, store)
    assert CALLS == [] and again.fingerprint == ann.fingerprint


def test_a_pool_that_gains_a_file_annotates_only_that_file(tmp_path):
    _write(tmp_path / "a.jsonl", [{"id": f"a{i}", "text": f"alpha {i}"} for i in range(4)])
    ingest([tmp_path / "a.jsonl"], tmp_path / "p1")
    store = ArtifactStore(tmp_path / "work")
    run_stage(CharCount(), Pool(tmp_path / "p1"), store)
    _write(tmp_path / "b.jsonl", [{"id": f"b{i}", "text": f"beta {i}"} for i in range(3)])
    ingest([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], tmp_path / "p2")
    CALLS.clear()
    ann = run_stage(CharCount(), Pool(tmp_path / "p2"), store)
    assert CALLS == [3]
    assert ann.frame()["id"].to_list() == [f"a{i}" for i in range(4)] + [f"b{i}" for i in range(3)]


def test_annotate_must_return_the_declared_columns(tmp_path):
    @dataclass(frozen=True)
    class Short(CharCount):
        kind: ClassVar[str] = "test-short"

        def annotate(self, worker, rows):
            return {"n": [1] * (len(rows) - 1), "digits": [0.0] * (len(rows) - 1)}

    @dataclass(frozen=True)
    class Wrong(CharCount):
        kind: ClassVar[str] = "test-wrong"

        def annotate(self, worker, rows):
            return {"n": [1] * len(rows)}

    rows = [{"id": "x", "kind": "text", "text": "a", "messages": None}] * 2
    with pytest.raises(ValueError, match="column n has 1 values for 2 rows"):
        Short().run_shard(None, rows)
    with pytest.raises(TypeError, match="schema declares"):
        Wrong().run_shard(None, rows)


def test_apply_rules_first_any_only_counts():
    frame = pl.DataFrame({"id": list("abcde"), "x": [0, 5, 5, 1, None], "y": [0, 0, 9, 9, 9]})
    out, counts = apply_rules(frame, [Rule("x_big", pl.col("x") > 3), Rule("y_big", pl.col("y") > 3)])
    assert out["keep"].to_list() == [True, False, False, False, False]
    # first failing rule in the order given; a null value does not fail its rule
    assert out["reason"].to_list() == [None, "x_big", "x_big", "y_big", "y_big"]
    assert counts == {"rows": 5, "kept": 1, "dropped": 4, "rules": {
        "x_big": {"first": 2, "any": 2, "only": 1}, "y_big": {"first": 2, "any": 3, "only": 2}}}
    with pytest.raises(ValueError, match="repeat"):
        apply_rules(frame, [Rule("a", pl.col("x") > 1), Rule("a", pl.col("y") > 1)])


def test_keep_flag_keeps_pool_order_and_samples_to_the_budget():
    cands = pl.DataFrame({"id": [f"r{i}" for i in range(10)], "keep": [i % 3 != 0 for i in range(10)],
                          "reason": [("rule_a" if i % 3 == 0 else None) for i in range(10)]})
    all_kept = KeepFlag(kept="passes").select(cands, Budget.parse("100%"), seed=0)
    assert all_kept["id"].to_list() == [f"r{i}" for i in range(10) if i % 3]
    assert set(all_kept["reason"]) == {"passes"}
    few = KeepFlag().select(cands, Budget.parse("3"), seed=1)
    assert few.height == 3 and set(few["id"]) <= set(all_kept["id"])
    assert few["reason"].str.contains("sampled at random \\(seed 1\\) to fit the budget from 6 "
                                      "rows with keep true").all()
    assert few.equals(KeepFlag().select(cands, Budget.parse("3"), seed=1))
    assert not few["id"].equals(KeepFlag().select(cands, Budget.parse("3"), seed=2)["id"])
    null_keep = cands.with_columns(keep=pl.Series([None] * 10, dtype=pl.Boolean))
    assert KeepFlag().select(null_keep, Budget.parse("100%"), 0).height == 0
    with pytest.raises(ValueError, match="expected booleans"):
        KeepFlag().select(cands.with_columns(keep=pl.lit(1)), Budget.parse("3"), 0)


def test_threshold_shares_the_budget_code():
    cands = pl.DataFrame({"id": [f"r{i}" for i in range(6)], "s": [0.1, 0.9, 0.2, 0.3, 0.95, None]})
    out = Threshold("s", below=0.5).select(cands, Budget.parse("100%"), 0)
    assert out["id"].to_list() == ["r0", "r2", "r3", "r5"]
    assert set(out["reason"]) == {"s < 0.5"}
    two = Threshold("s", below=0.5).select(cands, Budget.parse("2"), 0)
    assert two["reason"].str.ends_with("from 4 rows below 0.5").all()


def test_filter_selection_counts_every_rule_in_the_manifest(tmp_path, toy_method):
    pool = _pool(tmp_path)
    m = run_select(pool.path, "test-chars", "100%", tmp_path / "kept.jsonl",
                   params={"max_digits": 0.05, "min_chars": 20}, workdir=tmp_path / "work")
    rules = m["config"]["method"]["rules"]
    assert rules["rows"] == 12 and rules["kept"] + rules["dropped"] == 12
    assert rules["kept"] == m["counts"]["selected"]
    sel = pl.read_parquet(tmp_path / "kept.jsonl.selection.parquet")
    assert set(sel["reason"]) == {"passes the character rules"}
    decisions = pl.read_parquet(m["scores"])
    assert decisions.filter(pl.col("keep"))["id"].to_list() == sel["id"].to_list()


def test_annotate_only_writes_every_row_and_no_subset(tmp_path, toy_method):
    pool = _pool(tmp_path)
    out = tmp_path / "ann.parquet"
    m = run_select(pool.path, "test-chars", None, out, workdir=tmp_path / "work",
                   annotate_only=True)
    table = pl.read_parquet(out)
    assert table["id"].to_list() == pool.frame(["id"])["id"].to_list()
    assert {"n", "digits", "keep", "reason", "source", "kind"} <= set(table.columns)
    assert m["annotate_only"] is True
    assert m["counts"]["keep"] + m["counts"]["drop"] == 12 == m["counts"]["scored"]
    assert m["counts"]["keep"] == int(table["keep"].sum())
    assert json.loads((tmp_path / "ann.parquet.manifest.json").read_text())["counts"] == m["counts"]
    assert not (tmp_path / "ann.parquet.selection.parquet").exists()
    # a threshold change recomputes no annotation: the stage is cached
    CALLS.clear()
    m2 = run_select(pool.path, "test-chars", None, tmp_path / "ann2.parquet",
                    workdir=tmp_path / "work", params={"max_digits": 0.5}, annotate_only=True)
    assert CALLS == [] and m2["counts"]["keep"] >= m["counts"]["keep"]
    assert [s["cached"] for s in m2["stages"] if s["stage"] == "test-chars"] == [True]


def _cli(monkeypatch, capsys, args):
    import sys

    from thresher.pipeline import cli

    monkeypatch.setattr(sys, "argv", ["thresher", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        cli.main()
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_cli_annotate_only_and_its_misuse(tmp_path, toy_method, monkeypatch, capsys):
    pool = _pool(tmp_path)
    base = ["select", pool.path, "--method", "test-chars", "--workdir", tmp_path / "work"]
    code, out, err = _cli(monkeypatch, capsys, [*base, "--annotate-only", "--out", tmp_path / "a.parquet"])
    assert code == 0, err
    assert out.startswith("annotated 12 of 12 rows (") and (tmp_path / "a.parquet").exists()
    for extra, msg in [(["--budget", "5"], "drop --budget"), (["--format", "alpaca"], "drop --format"),
                       (["--selector", "random"], "drop --selector")]:
        code, _, err = _cli(monkeypatch, capsys, [*base, "--annotate-only", *extra,
                                                  "--out", tmp_path / "b.parquet"])
        assert code == 2 and err.startswith("error: ") and msg in err and err.count("\n") == 1
    # the output may not replace an input
    code, _, err = _cli(monkeypatch, capsys, [*base, "--annotate-only", "--out",
                                              pool.path / "shards" / "part-00000.parquet"])
    assert code == 2 and err.startswith("error: ")


def test_recipe_annotate_only_step(tmp_path, toy_method):
    from thresher.pipeline.recipe import RecipeError, load_recipe
    from thresher.pipeline.run import run_recipe

    pool = _pool(tmp_path)
    del pool
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nout: out\nsources: [in.jsonl]\nselections:\n"
                      "  - {name: look, method: test-chars, annotate_only: true}\n"
                      "  - {name: cut, method: test-chars, budget: 100%, params: {min_chars: 30}}\n")
    summary = run_recipe(load_recipe(recipe))
    steps = {s["step"]: s for s in summary["steps"]}
    assert steps["annotate"]["rows"] == 12 and steps["annotate"]["keep"] is not None
    table = pl.read_parquet(tmp_path / "out" / "look" / "look.parquet")
    assert table.height == 12 and "keep" in table.columns
    assert (tmp_path / "out" / "cut" / "cut.jsonl").exists()
    for text, msg in [("  - {name: x, method: test-chars}\n", "budget: required"),
                      ("  - {name: x, method: test-chars, annotate_only: true, budget: 5}\n",
                       "drop budget"),
                      (("  - {name: x, method: test-chars, annotate_only: true}\n"
                       "  - {name: y, method: test-chars, budget: 5, from: x}\n"), "annotate_only")]:
        recipe.write_text("out: out\nsources: [in.jsonl]\nselections:\n" + text)
        with pytest.raises(RecipeError, match=msg):
            load_recipe(recipe)
