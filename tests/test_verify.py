"""`thresher verify` on the tiny model and tiny subsets, and GSM8K answer extraction."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
from thresher.pipeline.training.evaluate import predicted_answer, reference_answer

GSM8K_TEST = "data/sample/targets/gsm8k_test.jsonl"


@pytest.mark.parametrize("text,expected", [
    ("She pays 5 * 2 = <<5*2=10>>10 dollars.\n#### 10", "10"),
    ("Total: 1,234 + 6 = 1,240\n#### 1,240", "1240"),
    ("#### -3", "-3"),
    ("It costs $2.50 each.\n#### 7.50", "7.5"),
    ("no final answer marker, 42 here", None),
])
def test_reference_answer(text, expected):
    assert reference_answer(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("so 3 + 4 = 7 apples.\n#### 7", "7"),
    ("First 12, then 30. The answer is 42.", "42"),
    ("#### 1,000 dollars, not 5", "1000"),
    ("The answer is 18.0", "18"),
    ("I do not know.", None),
])
def test_predicted_answer(text, expected):
    assert predicted_answer(text) == expected


@pytest.fixture(scope="module")
def subsets(tmp_path_factory, sample_pool):
    from thresher.pipeline.select import run_select

    d = tmp_path_factory.mktemp("subsets")
    paths = []
    for seed in (1, 2):
        p = d / f"pick{seed}.jsonl"
        run_select(sample_pool.path, "random", 4, p, seed=seed)
        paths.append(p)
    small = d / "small.jsonl"
    run_select(sample_pool.path, "random", 3, small, seed=3)
    return paths, small


def test_verify_on_tiny_model(tmp_path, tiny_lm_dir, subsets, sample_pool):
    from thresher.pipeline.training.train import TrainConfig
    from thresher.pipeline.training.verify import run_verify

    paths, _ = subsets
    cfg = TrainConfig(model=str(tiny_lm_dir), batch_size=2, max_tokens=256, lr=1e-2)
    rep = run_verify(paths, [GSM8K_TEST], tmp_path / "v", cfg=cfg, max_eval=3, max_new_tokens=4,
                     progress=False)
    saved = json.loads((tmp_path / "v" / "verify.json").read_text())
    assert list(saved["runs"]) == ["base", "pick1", "pick2", "random"]
    assert saved["pool"] == str(sample_pool.path)   # found through the subsets' manifests
    for name, run in saved["runs"].items():
        ev = run["evals"]["gsm8k_test"]
        assert math.isfinite(ev["loss"]) and ev["ppl"] == pytest.approx(math.exp(ev["loss"]))
        assert ev["rows"] == 3 and ev["n"] == 3 and 0 <= ev["exact_match"] <= 1
        if name != "base":
            assert run["rows"] == 4 and run["steps"] == 2
    # training moved the adapters: trained runs differ from the base model on held-out loss
    assert saved["runs"]["random"]["evals"]["gsm8k_test"]["loss"] != \
        saved["runs"]["base"]["evals"]["gsm8k_test"]["loss"]
    table = (tmp_path / "v" / "verify.md").read_text()
    assert table == rep["markdown"]
    assert all(f"| {n} |" in table for n in ("base", "pick1", "pick2", "random"))
    if importlib.util.find_spec("matplotlib") is None:
        assert "Plot skipped: matplotlib is not installed" in table
    else:
        assert (tmp_path / "v" / "verify.png").exists()
    # a rerun reuses the finished training runs
    mtime = (tmp_path / "v" / "runs" / "random" / "train.json").stat().st_mtime_ns
    run_verify(paths[:1], [GSM8K_TEST], tmp_path / "v", cfg=cfg, max_eval=3, max_new_tokens=0,
               progress=False)
    assert (tmp_path / "v" / "runs" / "random" / "train.json").stat().st_mtime_ns == mtime


def test_verify_refuses_unequal_budgets(tmp_path, tiny_lm_dir, subsets):
    from thresher.pipeline.training.train import TrainConfig
    from thresher.pipeline.training.verify import run_verify

    paths, small = subsets
    with pytest.raises(ValueError, match="differ in size"):
        run_verify([paths[0], small], [GSM8K_TEST], tmp_path / "v",
                   cfg=TrainConfig(model=str(tiny_lm_dir)))


def test_verify_needs_a_pool(tmp_path, tiny_lm_dir, subsets):
    from thresher.pipeline.training.train import TrainConfig
    from thresher.pipeline.training.verify import run_verify

    lone = tmp_path / "lone.jsonl"
    lone.write_text(subsets[0][0].read_text())
    with pytest.raises(FileNotFoundError, match="--pool"):
        run_verify([lone], [GSM8K_TEST], tmp_path / "v", cfg=TrainConfig(model=str(tiny_lm_dir)))
