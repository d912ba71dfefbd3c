"""LLM ratings read DEITA's way (expected value over the rating tokens, one forward pass), the
ratings stage and method, and the FineWeb-Edu recipe end to end on tiny models: rate a sample
with the LM, train a regression head on the ratings, score the pool with it."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
from thresher.pipeline.models.rating import Rater, answer_tokens
from thresher.pipeline.models.rubrics import BUILT_IN, load_rubric
from thresher.pipeline.select import run_select


@pytest.fixture(scope="module")
def tiny(tiny_lm_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_lm_dir)


TEXT = {"id": "t", "kind": "text", "messages": None, "text": "Photosynthesis turns light into sugar."}
CHAT = {"id": "c", "kind": "chat", "text": None, "messages": [
    {"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5."},
    {"role": "user", "content": "And times 4?"}, {"role": "assistant", "content": "20."}]}


def test_rating_tokens_follow_the_answer_prefix(tiny):
    _, tok = tiny
    prefix, ids = answer_tokens(tok, "Educational score: ", tuple("012345"))
    assert prefix == "Educational score: " and len(set(ids)) == 6
    assert tok.convert_ids_to_tokens(ids) == list("012345")
    with pytest.raises(ValueError, match="not one distinct token"):
        answer_tokens(tok, "Score: ", ("10", "20"))


def _direct_expectation(model, ids, label_ids, values):
    """The full model's logits at the last position (no packing, no head slicing)."""
    import torch

    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
    p = torch.softmax(logits[label_ids], dim=-1).numpy()
    return float(p @ np.asarray(values))


def test_expected_rating_matches_a_direct_forward_pass(tiny):
    model, tok = tiny
    rater = Rater(model, tok, load_rubric("edu"), max_tokens=1024)
    out = rater([TEXT, CHAT, TEXT | {"id": "t2", "text": "short"}])
    prompt = rater.prompts[0]
    for k, row in enumerate([TEXT, CHAT]):
        from thresher.pipeline.io.schema import row_text

        ids, _ = prompt.ids(tok, {"text": row_text(row, "conversation")}, 1024)
        want = _direct_expectation(model, ids, prompt.label_ids, range(6))
        assert out["rating"][k] == pytest.approx(want, abs=1e-4)
        assert 0.0 <= out["rating"][k] <= 5.0 and out["n_tokens"][k] == len(ids)
    assert out["reason"] == [None, None, None] and not out["truncated"].any()


def test_long_fields_are_cut_and_the_prefix_kept(tiny):
    model, tok = tiny
    rater = Rater(model, tok, load_rubric("edu"), max_tokens=600)
    long = TEXT | {"text": "word " * 3000}
    out = rater([long])
    assert out["truncated"][0] and out["n_tokens"][0] <= 600
    ids, cut = rater.prompts[0].ids(tok, {"text": long["text"]}, 600)
    assert cut and ids[-len(rater.prompts[0].prefix):] == rater.prompts[0].prefix
    with pytest.raises(ValueError, match="leaves no room"):
        rater.prompts[0].ids(tok, {"text": "x"}, 50)


def test_deita_combines_turns_and_refuses_text_rows(tiny):
    model, tok = tiny
    rater = Rater(model, tok, load_rubric("deita"), max_tokens=512)
    out = rater([CHAT, TEXT])
    assert np.isnan(out["rating"][1]) and out["reason"][1].startswith("text row")
    c, q = out["complexity"][0], out["quality"][0]
    assert 1 <= c <= 6 and 1 <= q <= 6
    # per turn: complexity of the instruction alone, quality of the pair; rating = sum c_t q_t
    one = [CHAT | {"id": f"c{t}", "messages": CHAT["messages"][2 * t:2 * t + 2]} for t in (0, 1)]
    per_turn = rater(one)
    assert out["rating"][0] == pytest.approx(
        sum(per_turn["complexity"][t] * per_turn["quality"][t] for t in (0, 1)), abs=1e-4)
    assert c == pytest.approx(per_turn["complexity"].mean(), abs=1e-6)


def test_rubric_files_are_checked(tmp_path):
    good = tmp_path / "r.yaml"
    good.write_text("name: helpful\nrows: text\nthreshold: 3\nquestions:\n  - name: rating\n"
                    "    template: 'Rate this: {text}'\n    prefix: 'Score: '\n"
                    "    labels: ['1', '2', '3', '4', '5']\n    values: [1, 2, 3, 4, 5]\n")
    r = load_rubric(str(good))
    assert r.threshold == 3.0 and r.questions[0].labels == tuple("12345")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nrows: text\nquestions:\n  - name: q\n    template: 'no field'\n"
                   "    labels: ['1', '2']\n")
    with pytest.raises(ValueError, match="must use"):
        load_rubric(str(bad))
    with pytest.raises(FileNotFoundError, match="not a built-in"):
        load_rubric("nope")
    assert set(BUILT_IN) == {"edu", "deita", "deita-raw"}
    for name in ("edu", "deita"):         # labelled as approximations of the scorers they name
        assert BUILT_IN[name].approximates.startswith("an approximation of")


@pytest.fixture(scope="module")
def small_pool(tmp_path_factory, sample_pool):
    from conftest import mixed_pool

    return mixed_pool(tmp_path_factory.mktemp("rate"), sample_pool, 8, 600, 10)


def test_lm_rating_method_samples_and_counts_unrated_rows(small_pool, tiny_lm_dir, tmp_path):
    params = {"rubric": "deita", "model": str(tiny_lm_dir), "sample": "0.5", "max_tokens": "512"}
    m = run_select(small_pool.path, "lm-rating", "100%", tmp_path / "d.jsonl",
                   workdir=tmp_path / "w", params=params)
    unscored = m["config"]["method"]["unscored"]
    n_text = (small_pool.frame(["kind"])["kind"] == "text").sum()
    assert m["counts"]["scored"] + sum(unscored.values()) == small_pool.n_rows
    assert 0 < unscored["not in the rating sample"] < small_pool.n_rows
    assert unscored.get("text row: the deita rubric rates chat turns", 0) <= n_text
    assert m["config"]["method"]["rubric"]["name"] == "deita"
    ratings = pl.read_parquet(m["scores"])
    assert set(ratings.columns) == {"id", "rating", "complexity", "quality"}
    # the same sample again: the sample is a function of the ids and the seed only
    m2 = run_select(small_pool.path, "lm-rating", "100%", tmp_path / "d2.jsonl",
                    workdir=tmp_path / "w2", params=params)
    assert pl.read_parquet(m2["scores"])["id"].to_list() == ratings["id"].to_list()


def test_fineweb_edu_recipe_end_to_end(small_pool, tiny_lm_dir, tiny_embedder, tmp_path):
    """Rate the pool with the LM (edu rubric), train a regression head on the ratings, score
    the pool with the head; the head's scores agree with the ratings it learned from."""
    out = tmp_path / "edu-head"
    r = subprocess.run([sys.executable, "-m", "thresher.pipeline.cli", "classifier", "train",
                        "--out", str(out), "--kind", "head", "--pool", str(small_pool.path),
                        "--rate", "edu", "--rate-model", str(tiny_lm_dir), "--rate-max-tokens",
                        "768", "--embedder", tiny_embedder, "--holdout", "0.3",
                        "--workdir", str(tmp_path / "w")], check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    info = json.loads((out / "classifier.json").read_text())
    assert info["task"] == "regression" and info["threshold"] == 2.5   # the rubric's cut
    (inp,) = info["training"]["inputs"]
    assert inp["rule"] == "rating" and "+ratings:" in inp["fingerprint"]
    m = run_select(small_pool.path, "classifier", "50%", tmp_path / "s.jsonl",
                   workdir=tmp_path / "w", params={"model": str(out), "cut": "top"})
    scores = pl.read_parquet(m["scores"])
    lo, hi = info["clip"]
    assert scores["quality_score"].min() >= lo and scores["quality_score"].max() <= hi
    assert m["counts"]["selected"] == (small_pool.n_rows + 1) // 2
