"""Published scorers from a local path: a FineWeb-Edu-format regressor (a Hugging Face
sequence-classification directory with one output) and DCLM's fastText format (labels
__label__hq / __label__cc), each with its published threshold. Tiny stand-ins of the same formats
are built here; the real weights cannot be fetched."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import polars as pl
import pytest
from thresher.pipeline.models.classifiers import (
    DCLM_THRESHOLD,
    FINEWEB_EDU_THRESHOLD,
    describe_model,
)
from thresher.pipeline.select import run_select


@pytest.fixture(scope="module")
def fineweb_edu_dir(tmp_path_factory, sample_pool):
    """A 1-layer random BERT with one regression output (FineWeb-Edu's format), its bias set so
    the sample's scores (as the stage computes them) straddle the published cut."""
    import torch
    from thresher.pipeline.artifacts import ArtifactStore
    from thresher.pipeline.models.resolve import DEFAULT_EMBEDDER, resolve
    from thresher.pipeline.plan import run_stage
    from thresher.pipeline.stages.classifier_scores import ClassifierScores
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    out = tmp_path_factory.mktemp("fwedu")
    tok = AutoTokenizer.from_pretrained(resolve(DEFAULT_EMBEDDER).path)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=512,
                     num_labels=1, problem_type="regression")
    model = BertForSequenceClassification(cfg)
    with torch.no_grad():
        model.classifier.weight.mul_(500.0)
        model.classifier.bias.fill_(2.5)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    store = ArtifactStore(out.parent / "calibrate")
    q = run_stage(ClassifierScores(model=str(out)), sample_pool, store).frame()["quality_score"]
    with torch.no_grad():
        model.classifier.bias.add_(2.5 - float(q.median()))
    model.save_pretrained(out)
    return out


def _train_fasttext(path, labels):
    """A fastText model with these two labels, trained in a fresh process: fastText training in
    a process that has run torch models diverged (NaN) now and then here (`classifier train`
    turns that into a one-line error)."""
    train = path.with_suffix(".txt")
    lines = []
    for i in range(60):
        lines.append(f"__label__{labels[0]} explain step by step how to solve equation {i} answer")
        lines.append(f"__label__{labels[1]} buy cheap watches online click here offer {i}")
    train.write_text("\n".join(lines) + "\n")
    code = (f"import fasttext; fasttext.train_supervised(input={str(train)!r}, epoch=5, "
            f"wordNgrams=2, thread=1, seed=1, bucket=100000, lr=0.05, verbose=0)"
            f".save_model({str(path)!r})")
    subprocess.run([sys.executable, "-c", code], check=True)
    return path


def test_fineweb_edu_format_is_recognised_and_cut_at_2_5(fineweb_edu_dir, sample_pool, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    info = describe_model(fineweb_edu_dir)
    assert (info.kind, info.task, info.published, info.threshold) == \
        ("hf", "regression", "fineweb-edu", FINEWEB_EDU_THRESHOLD)
    m = run_select(sample_pool.path, "classifier", "100%", tmp_path / "edu.jsonl",
                   workdir=tmp_path / "w", params={"model": str(fineweb_edu_dir)})
    assert m["config"]["selector"]["above"] == 2.5
    scores = pl.read_parquet(m["scores"])
    assert {"quality_score", "int_score"} <= set(scores.columns)
    q = scores["quality_score"].to_numpy()
    assert q.min() >= 0 and q.max() <= 5 and (q < 2.5).any() and (q >= 2.5).any()
    assert (scores["int_score"].to_numpy() == np.round(q)).all()
    chosen = set(pl.read_parquet(tmp_path / "edu.jsonl.selection.parquet")["id"])
    assert chosen == set(scores.filter(pl.col("quality_score") >= 2.5)["id"])
    # the scores are the model's clipped logit on the first 512 tokens (the stage runs bf16 here)
    tok = AutoTokenizer.from_pretrained(fineweb_edu_dir)
    model = AutoModelForSequenceClassification.from_pretrained(fineweb_edu_dir).eval()
    rows = sample_pool.rows(scores["id"].head(8).to_list())
    from thresher.pipeline.io.schema import row_text

    with torch.no_grad():
        want = [model(**tok(row_text(r), truncation=True, max_length=512,
                            return_tensors="pt")).logits[0, 0].item() for r in rows]
    assert np.allclose(q[:8], np.clip(want, 0, 5), atol=0.1)


def test_dclm_format_is_recognised_and_cut_at_its_threshold(sample_pool, tmp_path):
    from thresher.pipeline.models.classifiers import FastTextModel, fasttext_text

    path = _train_fasttext(tmp_path / "dclm.bin", ("hq", "cc"))
    info = describe_model(path)
    assert (info.kind, info.published, info.threshold) == ("fasttext", "dclm", DCLM_THRESHOLD)
    m = run_select(sample_pool.path, "classifier", "100%", tmp_path / "d.jsonl",
                   workdir=tmp_path / "w", params={"model": str(path)})
    assert m["config"]["selector"]["above"] == DCLM_THRESHOLD
    scores = pl.read_parquet(m["scores"])
    chosen = set(pl.read_parquet(tmp_path / "d.jsonl.selection.parquet")["id"])
    assert chosen == set(scores.filter(pl.col("quality_score") >= DCLM_THRESHOLD)["id"])
    ft = FastTextModel(path)
    row = sample_pool.rows([scores["id"][0]])[0]
    labels, probs = ft.model.predict(fasttext_text(row, "conversation"), k=-1)
    p_hq = dict(zip(labels, probs))["__label__hq"]
    # DCLM's 1 - p(cc) when cc is on top; fastText's +1e-5 clipped at 1
    assert scores["quality_score"][0] == pytest.approx(min(p_hq, 1.0), abs=1e-6)
    # the published cut can be overridden, or replaced by a top cut
    m2 = run_select(sample_pool.path, "classifier", "10%", tmp_path / "t.jsonl",
                    workdir=tmp_path / "w", params={"model": str(path), "cut": "top"})
    assert m2["counts"]["selected"] == 78 and m2["config"]["selector"]["name"] == "ScoreBand"


def test_a_fasttext_model_of_other_labels_is_refused(sample_pool, tmp_path):
    path = _train_fasttext(tmp_path / "langid.bin", ("en", "de"))
    r = subprocess.run([sys.executable, "-m", "thresher.pipeline.cli", "select",
                        str(sample_pool.path), "--method", "classifier", "--param",
                        f"model={path}", "--budget", "10", "--out", str(tmp_path / "o.jsonl"),
                        "--workdir", str(tmp_path / "w")], check=False, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "__label__de" in r.stderr and "__label__hq" in r.stderr


def test_a_multi_output_classifier_is_refused(fineweb_edu_dir, tmp_path):
    import json
    import shutil

    other = tmp_path / "three"
    shutil.copytree(fineweb_edu_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["id2label"] = {"0": "a", "1": "b", "2": "c"}
    cfg.pop("num_labels", None)
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="3 outputs"):
        describe_model(other)
