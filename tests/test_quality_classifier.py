"""Quality classifiers: `thresher classifier train` (fastText, embedding heads), `--method
classifier`, the quality cuts (Threshold above=, ScoreBand per=), and every bad input as one
line with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from thresher.pipeline.budget import Budget
from thresher.pipeline.io.ingest import ingest
from thresher.pipeline.io.pool import Pool
from thresher.pipeline.select import run_select


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "thresher.pipeline.cli", *map(str, args)],
                          check=False, capture_output=True, text=True, cwd=cwd)


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def ft_dir(tmp_path_factory, sample_pool):
    """A fastText classifier: the sample's chat responses (positive) vs its C4 text (negative)."""
    out = tmp_path_factory.mktemp("ft") / "clf"
    r = cli("classifier", "train", "--out", out, "--pool", sample_pool.path, "--label", "kind=chat",
            "--part", "response", "--workdir", out.parent / "work", "--bucket", "100000")
    assert r.returncode == 0, r.stderr
    assert "held-out" in r.stdout and "AUC" in r.stdout
    return out


def test_fasttext_training_stores_metrics_and_fingerprints(ft_dir, sample_pool):
    info = json.loads((ft_dir / "classifier.json").read_text())
    assert info["kind"] == "fasttext" and info["task"] == "binary" and info["part"] == "response"
    held = info["metrics"]["held_out"]
    assert 0.0 <= held["auc"] <= 1.0 and held["rows"] == held["positive"] + held["negative"]
    assert held["auc"] > 0.8            # chat answers vs web text separate easily
    assert info["training"]["counts"] == {"positive": 725, "negative": 50}
    (inp,) = info["training"]["inputs"]
    assert inp["fingerprint"] == sample_pool.fingerprint and inp["rule"] == "kind=chat"
    assert (ft_dir / "model.bin").read_bytes()[:4] == (793712314).to_bytes(4, "little")


def test_fasttext_training_is_reproducible(ft_dir, sample_pool, tmp_path):
    out = tmp_path / "again"
    r = cli("classifier", "train", "--out", out, "--pool", sample_pool.path, "--label", "kind=chat",
            "--part", "response", "--workdir", tmp_path / "w", "--bucket", "100000")
    assert r.returncode == 0, r.stderr
    assert (out / "model.bin").read_bytes() == (ft_dir / "model.bin").read_bytes()


def test_classifier_method_scores_every_row_and_cuts_the_top(ft_dir, sample_pool, tmp_path):
    from thresher.pipeline.models.classifiers import FastTextModel, fasttext_text

    out = tmp_path / "top.jsonl"
    m = run_select(sample_pool.path, "classifier", "10%", out, workdir=tmp_path / "w",
                   params={"model": str(ft_dir)})
    assert m["counts"]["scored"] == 775 and m["counts"]["selected"] == 78
    stored = json.loads((ft_dir / "classifier.json").read_text())["metrics"]["held_out"]
    assert m["config"]["method"]["classifier"]["held_out"] == stored
    scores = pl.read_parquet(m["scores"])
    ft = FastTextModel(ft_dir / "model.bin")
    some = sample_pool.rows(scores["id"].head(20).to_list())
    want = [ft.p_positive(fasttext_text(r, "response")) for r in some]
    assert np.allclose(scores["quality_score"].head(20).to_numpy(), want, rtol=0, atol=1e-12)
    chosen = pl.read_parquet(f"{out}.selection.parquet")
    assert chosen["quality_score"].min() >= scores["quality_score"].sort(descending=True)[77]


def test_balanced_top_cut_per_source(ft_dir, sample_pool, tmp_path):
    m = run_select(sample_pool.path, "classifier", "50", tmp_path / "bal.jsonl",
                   workdir=tmp_path / "w", params={"model": str(ft_dir), "balance_by": "source"})
    assert sorted(m["by_source"].values()) == [10, 10, 10, 10, 10]
    # the same cut by any selector over the score column
    m2 = run_select(sample_pool.path, "classifier", "50", tmp_path / "bal2.jsonl",
                    workdir=tmp_path / "w", params={"model": str(ft_dir), "per": "source"},
                    selector="band")
    assert m2["by_source"] == m["by_source"]


def test_score_band_per_group_takes_each_groups_best():
    from thresher.selectors.score_band import ScoreBand

    c = pl.DataFrame({"id": [f"r{i}" for i in range(9)], "g": list("aaaaaabbc"),
                      "s": [0.1, 0.9, 0.5, 0.7, 0.3, 0.8, 0.2, 0.6, 0.4]})
    out = ScoreBand("s", per="g").select(c, Budget.parse("6"), 0)
    # c has 1 row, b 2, a takes the rest (3): its three best
    assert sorted(out.filter(pl.col("g") == "a")["s"].to_list()) == [0.7, 0.8, 0.9]
    assert out.height == 6 and set(out["g"]) == {"a", "b", "c"}
    assert out["id"][:3].to_list() == ["r1", "r7", "r8"]        # interleaved: each group's best first


def test_threshold_above_keeps_scores_at_or_over_it():
    from thresher.selectors.threshold import Threshold

    c = pl.DataFrame({"id": ["a", "b", "c", "d"], "q": [0.5, 2.5, 3.0, None]})
    out = Threshold("q", above=2.5).select(c, Budget.parse("100%"), 0)
    assert out["id"].to_list() == ["b", "c"] and out["reason"][0].startswith("q >= 2.5")
    few = Threshold("q", above=0.0).select(c, Budget.parse("1"), 0)
    assert few.height == 1 and "sampled at random" in few["reason"][0]


@pytest.fixture(scope="module")
def head_files(tmp_path_factory):
    """Positive (worked answers) and negative (spam) files, 40 rows each, as JSONL."""
    d = tmp_path_factory.mktemp("headfiles")
    good = [{"id": f"g{i}", "messages": [
        {"role": "user", "content": f"How do I add {i} and {i + 1}?"},
        {"role": "assistant", "content": f"Add the numbers: {i} + {i + 1} = {2 * i + 1}. "
                                         "First write both, then sum the units."}]}
        for i in range(40)]
    bad = [{"id": f"b{i}", "text": f"BUY NOW cheap watches {i} click here free shipping!!! "
                                   "limited offer best price"} for i in range(40)]
    return _write(d / "good.jsonl", good), _write(d / "bad.jsonl", bad)


def test_head_from_files_scores_as_the_embedder_and_head_compute(head_files, tiny_embedder, tmp_path):
    from thresher.pipeline.models.classifiers import Head
    from thresher.pipeline.stages.embed import ShardEmbedder

    good, bad = head_files
    out = tmp_path / "head"
    r = cli("classifier", "train", "--out", out, "--kind", "head", "--embedder", tiny_embedder,
            "--positive", good, "--negative", bad, "--holdout", "0.25", "--hidden", "8")
    assert r.returncode == 0, r.stderr
    info = json.loads((out / "classifier.json").read_text())
    assert info["kind"] == "head" and info["embedder"]["model"] == tiny_embedder
    assert [i["kind"] for i in info["training"]["inputs"]] == ["file", "file"]
    assert info["metrics"]["held_out"]["auc"] > 0.9
    head = Head.load(out)
    assert [w.shape for w, _ in head.weights] == [(32, 8), (8, 1)]
    # score a pool of both files with the method: the stage's score is embedder + head
    ingest([good, bad], tmp_path / "pool")
    pool = Pool(tmp_path / "pool")
    m = run_select(pool.path, "classifier", "40", tmp_path / "sel.jsonl", workdir=tmp_path / "w",
                   params={"model": str(out)})
    scores = pl.read_parquet(m["scores"])
    rows = pool.rows(scores["id"].to_list())
    emb = ShardEmbedder(tiny_embedder, "conversation", "cpu", info["embedder"]["dtype"])
    want = head.predict(emb(rows).astype(np.float32))
    assert np.allclose(scores["quality_score"].to_numpy(), want, atol=1e-3)
    assert m["by_source"] == {"good": 40}


def test_regression_head_on_a_numeric_field(tmp_path, tiny_embedder):
    rows = [{"id": f"r{i}", "score": i % 6, "text": ("lesson " * (i % 6 + 1)) + f"number {i}"}
            for i in range(60)]
    ingest([_write(tmp_path / "rows.jsonl", rows)], tmp_path / "pool")
    out = tmp_path / "reg"
    r = cli("classifier", "train", "--out", out, "--kind", "head", "--embedder", tiny_embedder,
            "--pool", tmp_path / "pool", "--label", "score", "--task", "regression",
            "--threshold", "2.5", "--holdout", "0.3")
    assert r.returncode == 0, r.stderr
    info = json.loads((out / "classifier.json").read_text())
    held = info["metrics"]["held_out"]
    assert {"mse", "spearman", "accuracy", "auc"} <= set(held) and info["clip"] == [0.0, 5.0]
    assert "Spearman" in r.stdout and info["threshold"] == 2.5
    m = run_select(tmp_path / "pool", "classifier", "100%", tmp_path / "s.jsonl",
                   workdir=tmp_path / "w", params={"model": str(out)})
    assert m["config"]["selector"] == {"name": "Threshold", "column": "quality_score",
                                       "below": 0.5, "above": 2.5}
    scores = pl.read_parquet(m["scores"])["quality_score"]
    assert scores.min() >= 0.0 and scores.max() <= 5.0


# -- bad input: one line, exit 2 ------------------------------------------------------------

def _one_line_error(r, *words):
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_one_class_is_an_error(tmp_path, head_files):
    good, _ = head_files
    ingest([good], tmp_path / "pool")
    _one_line_error(cli("classifier", "train", "--out", tmp_path / "c", "--pool", tmp_path / "pool",
                        "--label", "kind=chat"), "one class", "no negative")
    assert not (tmp_path / "c").exists()


def test_empty_file_and_missing_column_are_errors(tmp_path, head_files, sample_pool):
    good, _ = head_files
    (tmp_path / "empty.jsonl").write_text("")
    _one_line_error(cli("classifier", "train", "--out", tmp_path / "c", "--positive", good,
                        "--negative", tmp_path / "empty.jsonl"), "empty.jsonl", "empty")
    _one_line_error(cli("classifier", "train", "--out", tmp_path / "c", "--pool", sample_pool.path,
                        "--label", "stars>=3"), "no field 'stars'", "capability")
    _one_line_error(cli("classifier", "train", "--out", tmp_path / "c", "--pool", sample_pool.path,
                        "--label", "capability>=3"), "capability", "not a number")
    _one_line_error(cli("classifier", "train", "--out", tmp_path / "c", "--kind", "fasttext",
                        "--task", "regression", "--pool", sample_pool.path, "--label", "n_chars"),
                    "fasttext trains classes")


def test_output_over_an_input_or_a_foreign_directory_is_refused(sample_pool, tmp_path):
    _one_line_error(cli("classifier", "train", "--out", sample_pool.path / "shards", "--pool",
                        sample_pool.path, "--label", "kind=chat"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    _one_line_error(cli("classifier", "train", "--out", tmp_path / "mine", "--pool",
                        sample_pool.path, "--label", "kind=chat", "--workdir", tmp_path / "w"),
                    "not a classifier directory")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    n = len(list((sample_pool.path / "shards").iterdir()))
    assert n == len(sample_pool.shards)


def test_a_file_that_is_not_a_model_is_an_error(sample_pool, tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00\x01 not a model at all")
    for model in (junk, tmp_path, tmp_path / "missing"):
        r = cli("select", sample_pool.path, "--method", "classifier", "--param", f"model={model}",
                "--budget", "10", "--out", tmp_path / "o.jsonl", "--workdir", tmp_path / "w")
        _one_line_error(r, str(model))
    bad_json = tmp_path / "badclf"
    bad_json.mkdir()
    (bad_json / "classifier.json").write_text("{not json")
    r = cli("select", sample_pool.path, "--method", "classifier", "--param", f"model={bad_json}",
            "--budget", "10", "--out", tmp_path / "o.jsonl", "--workdir", tmp_path / "w")
    _one_line_error(r, "classifier.json", "unreadable")
    r = cli("select", sample_pool.path, "--method", "classifier", "--budget", "10", "--out",
            tmp_path / "o.jsonl")
    _one_line_error(r, "model=PATH")
    assert not (tmp_path / "o.jsonl").exists()


def test_unreadable_rows_are_counted_with_a_reason(ft_dir):
    from thresher.pipeline.stages.classifier_scores import ClassifierScores

    stage = ClassifierScores(model=str(ft_dir), part="first_user")
    worker = stage.open_worker("cpu")
    rows = [{"id": "a", "kind": "chat", "messages": [{"role": "system", "content": "s"},
                                                     {"role": "assistant", "content": "x"}]},
            {"id": "b", "kind": "text", "messages": None, "text": "some web text"}]
    res = stage.run_shard(worker, rows).tables["quality"].to_pylist()
    assert res[0]["quality_score"] is None and res[0]["reason"] == "no first_user text"
    assert res[1]["reason"] is None and 0 <= res[1]["quality_score"] <= 1


def test_report_shows_the_score_histogram_with_cut_and_examples_around_it(ft_dir, sample_pool,
                                                                          tmp_path):
    from thresher.pipeline.report.build import write_report

    out = tmp_path / "top.jsonl"
    run_select(sample_pool.path, "classifier", "20%", out, workdir=tmp_path / "w",
               params={"model": str(ft_dir)})
    html = write_report([out], tmp_path / "r.html", compute_embeddings=False).read_text()
    assert "hist-top.jsonl-quality_score" in html or "hist-top-quality_score" in html
    assert "Quality scores: the top, the cut and the bottom" in html
    for band in ("top", "last kept", "first dropped", "bottom"):
        assert f"<td class=''>{band}</td>" in html, band
    assert "quality_score &gt;= " not in html and "the top 155 by quality_score" in html
