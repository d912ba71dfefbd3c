"""Decontamination: pool rows sharing a word 13-gram with an evaluation row are marked with it and
dropped; the manifest counts per evaluation file; bad evaluation files fail before any work."""

from __future__ import annotations

import json

import polars as pl
import pytest
from thresher.pipeline.io.ingest import ingest
from thresher.pipeline.io.pool import Pool
from thresher.pipeline.select import run_select
from thresher.pipeline.stages.textnorm import normalise

QUESTION = ("Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and "
            "bakes muffins for her friends every day with four.")
ANSWER = "She sells the remainder at the farmers' market daily for $2 per fresh duck egg."
SHORT = "What is two plus two?"


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def evals(tmp_path):
    math = _write(tmp_path / "math_eval.jsonl", [
        {"id": "q1", "messages": [{"role": "user", "content": QUESTION},
                                  {"role": "assistant", "content": ANSWER}]},
        {"id": "q2", "messages": [{"role": "user", "content": SHORT},
                                  {"role": "assistant", "content": "4"}]}])
    text = _write(tmp_path / "text_eval.jsonl", [
        {"id": "t1", "text": "the committee voted to approve the new budget for the coming fiscal "
                             "year after a long debate on schools"}])
    return math, text


def _pool(tmp_path):
    filler = "This is an ordinary paragraph about gardening and the weather in spring. "
    rows = [{"id": "clean", "text": filler * 5},
            {"id": "leak_q", "text": filler + "\n\n" + QUESTION.upper() + "\n\n" + filler},
            {"id": "leak_both", "text": "In the news: The committee voted to approve the new "
                                        "budget for the coming fiscal year after a long debate. "
                                        + QUESTION},
            {"id": "near_miss", "text": "Janet's ducks lay 16 eggs per day. She eats three for."},
                                        # 12 of its tokens ("janet s ducks ..."): no 13-gram
            {"id": "short_only", "text": SHORT + " " + filler},
            {"id": "chat_leak", "messages": [{"role": "user", "content": "Solve: " + QUESTION},
                                             {"role": "assistant", "content": "18"}]}]
    _write(tmp_path / "pool.jsonl", rows)
    ingest([tmp_path / "pool.jsonl"], tmp_path / "pool", rows_per_shard=2)
    return Pool(tmp_path / "pool")


def test_leaks_are_marked_dropped_and_counted(tmp_path, evals):
    pool = _pool(tmp_path)
    out = tmp_path / "clean.jsonl"
    m = run_select(pool.path, "decontaminate", "100%", out, workdir=tmp_path / "w",
                   targets=[str(e) for e in evals])
    scores = pl.read_parquet(m["scores"]).to_pandas().set_index("id")
    assert list(scores.loc["leak_q", "decon_matches"]) == ["math_eval.jsonl:q1"]
    assert list(scores.loc["leak_both", "decon_matches"]) == ["math_eval.jsonl:q1",
                                                              "text_eval.jsonl:t1"]
    assert list(scores.loc["chat_leak", "decon_matches"]) == ["math_eval.jsonl:q1"]
    for clean in ("clean", "near_miss", "short_only"):
        assert scores.loc[clean, "decon_ngrams"] == 0 and scores.loc[clean, "keep"]
    n = len(normalise([QUESTION])[0].split()) - 12
    assert scores.loc["leak_q", "decon_ngrams"] == n
    assert scores.loc["leak_q", "reason"] == f"shares {n} 13-grams with evaluation rows " \
        "math_eval.jsonl:q1"
    kept = pl.read_parquet(f"{out}.selection.parquet")["id"].to_list()
    assert kept == ["clean", "near_miss", "short_only"]
    files = {f["file"].rsplit("/", 1)[-1]: f for f in m["config"]["method"]["eval_files"]}
    assert files["math_eval.jsonl"] == {**files["math_eval.jsonl"], "rows": 2, "rows_matched": 1,
                                        "rows_too_short": 1, "pool_rows_matching": 3}
    assert files["text_eval.jsonl"]["rows_matched"] == 1
    assert files["text_eval.jsonl"]["pool_rows_matching"] == 1
    assert m["config"]["method"]["removed"] == 3


def test_min_ngrams_and_annotate_only(tmp_path, evals):
    pool = _pool(tmp_path)
    m = run_select(pool.path, "decontaminate", "100%", tmp_path / "marks.parquet",
                   workdir=tmp_path / "w", targets=[str(evals[1])], annotate_only=True,
                   params={"min_ngrams": "3"})
    table = pl.read_parquet(tmp_path / "marks.parquet")
    assert table.height == pool.n_rows and {"decon_ngrams", "decon_matches", "keep"} <= \
        set(table.columns)
    row = table.filter(pl.col("id") == "leak_both")
    assert row["decon_ngrams"][0] >= 3 and not row["keep"][0]
    assert m["counts"]["drop"] == 1


@pytest.mark.parametrize("content,match", [
    (None, "--target .*missing.jsonl: no such file"),
    ('{"id": "x", "text": "fine row here"}\n{not json\n', r"bad\.jsonl: line 2: .*1 of 2 rows"),
    ('{"id": "x", "foo": 1}\n', r"bad\.jsonl.*no usable rows"),
])
def test_bad_evaluation_file_is_one_line_error_before_any_work(tmp_path, content, match):
    pool = _pool(tmp_path)
    path = tmp_path / ("missing.jsonl" if content is None else "bad.jsonl")
    if content is not None:
        path.write_text(content)
    with pytest.raises((ValueError, FileNotFoundError), match=match) as err:
        run_select(pool.path, "decontaminate", "100%", tmp_path / "o.jsonl",
                   workdir=tmp_path / "w", targets=[str(path)])
    assert "\n" not in str(err.value)
    assert not (tmp_path / "w").exists() and not (tmp_path / "o.jsonl").exists()
