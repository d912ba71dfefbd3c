"""Paired bootstrap intervals and verdicts (`pipeline/training/significance.py`) and `verify --seeds`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from thresher.pipeline.training.significance import paired_bootstrap, seed_mean, spread, verdict


def test_a_real_shift_is_called_and_noise_is_not():
    rng = np.random.default_rng(0)
    base = rng.normal(2.0, 0.5, size=200)
    better = base - 0.2 + rng.normal(0, 0.05, size=200)       # paired: same rows, lower loss
    d = paired_bootstrap(better, base, weights=rng.integers(10, 100, size=200))
    assert d["hi"] < 0 and d["lo"] < d["diff"] < d["hi"] and verdict(d, True) == "better"
    assert verdict(d, lower_is_better=False) == "worse"
    noise = base + rng.normal(0, 0.05, size=200)
    n = paired_bootstrap(noise, base)
    assert n["lo"] < 0 < n["hi"] and verdict(n, True) == "no clear difference"


def test_pairing_matters():
    """Row difficulty varies a lot, the shift is small: paired intervals see it, the spread of
    the rows alone would not."""
    rng = np.random.default_rng(1)
    base = rng.normal(2.0, 1.0, size=100)
    d = paired_bootstrap(base - 0.05, base)
    assert d["diff"] == pytest.approx(-0.05) and d["hi"] < 0


def test_weights_nans_and_shapes():
    a, b = np.array([1.0, 2.0, np.nan]), np.array([0.0, 0.0, 5.0])
    d = paired_bootstrap(a, b, weights=np.array([3, 1, 1]))
    assert d["rows"] == 2 and d["diff"] == pytest.approx((1 * 3 + 2 * 1) / 4)
    with pytest.raises(ValueError, match="shape"):
        paired_bootstrap(a, b[:2])
    assert seed_mean([[1.0, None], [3.0, 2.0]])[0] == 2.0 and np.isnan(seed_mean([[1.0, None], [3.0, 2.0]])[1])
    assert spread([1.0]) == 0.0 and spread([1.0, 3.0]) == pytest.approx(np.sqrt(2))


def test_verify_with_seeds(tmp_path, tiny_lm_dir, sample_pool):
    from thresher.pipeline.select import run_select
    from thresher.pipeline.training.train import TrainConfig
    from thresher.pipeline.training.verify import run_verify

    from tests.test_verify import GSM8K_TEST

    pick = tmp_path / "pick.jsonl"
    run_select(sample_pool.path, "random", 4, pick, seed=9)
    cfg = TrainConfig(model=str(tiny_lm_dir), batch_size=2, max_tokens=256, lr=1e-2)
    rep = run_verify([pick], [GSM8K_TEST], tmp_path / "v", cfg=cfg, max_eval=4, max_new_tokens=0,
                     progress=False, seeds=2)
    saved = json.loads((tmp_path / "v" / "verify.json").read_text())
    assert saved["seeds"] == [0, 1]
    for name in ("pick", "random"):
        run = saved["runs"][name]
        assert [s for s in run["seeds"]] == [0, 1] and len(run["per_seed"]) == 2
        ev = run["evals"]["gsm8k_test"]
        per = [p["evals"]["gsm8k_test"]["loss"] for p in run["per_seed"]]
        assert ev["loss"] == pytest.approx(np.mean(per)) and ev["loss_sd"] == pytest.approx(spread(per))
        assert (tmp_path / "v" / "runs" / name / "seed-1" / "train.json").exists()
    # the random twin is redrawn per seed
    a = json.loads((tmp_path / "v" / "runs" / "random" / "seed-0" / "train.json").read_text())
    b = json.loads((tmp_path / "v" / "runs" / "random" / "seed-1" / "train.json").read_text())
    assert a["run_key"] != b["run_key"]
    comp = saved["comparisons"]["pick"]["gsm8k_test"]["loss"]
    assert comp["lo"] <= comp["diff"] <= comp["hi"] and comp["rows"] == 4
    assert comp["verdict"] in ("better", "worse", "no clear difference")
    assert "Subset minus random" in rep["markdown"] and f"| pick | gsm8k_test | {comp['diff']:+.4f}" in rep["markdown"]
    assert " ± " in rep["markdown"]
    # a rerun reuses the trained runs and their evaluations
    cached = tmp_path / "v" / "runs" / "pick" / "seed-1" / "evals.json"
    mtime = cached.stat().st_mtime_ns
    again = run_verify([pick], [GSM8K_TEST], tmp_path / "v", cfg=cfg, max_eval=4, max_new_tokens=0,
                       progress=False, seeds=2)
    assert cached.stat().st_mtime_ns == mtime
    assert again["comparisons"] == json.loads((tmp_path / "v" / "verify.json").read_text())["comparisons"]
    with pytest.raises(ValueError, match="--seeds"):
        run_verify([pick], [GSM8K_TEST], tmp_path / "v2", cfg=cfg, seeds=0)
