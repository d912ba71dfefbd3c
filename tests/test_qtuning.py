"""Q-Tuning (methods-b §2) on hand-built per-sample and per-token arrays.

Every expected value below is worked out by hand from the specification, not by rerunning the
code: numpy's default (linear) quantile on ranks 1..8 is 1 + q * 7.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from thresher.pipeline.training.qtuning import (
    QTuningConfig,
    prune_batch,
    read_masks,
    sample_scores,
    smoothed_token_scores,
    summarize,
)
from thresher.selectors.quadrants import eu_keep

PPL8 = np.arange(1.0, 9.0)                               # samples 0..7 have PPL 1..8
ENT8 = np.array([8.0, 3.0, 2.0, 4.0, 5.0, 6.0, 1.0, 7.0])


def test_bisection_first_alpha_hits_the_ratio():
    # alpha = 0.245: PPL > q(0.755) = 6.285 -> samples 6, 7; Ent <= q(0.245) = 2.715 -> ent 1, 2
    # Q2 = {6} (PPL 7, Ent 1); Q4: PPL <= 2.715 -> samples 0, 1 and Ent > 6.285 -> {0}.
    plane = eu_keep(PPL8, ENT8, 0.25)
    assert plane["alpha"] == pytest.approx(0.245)
    assert plane["labels"].tolist() == ["Q4", "-", "-", "-", "-", "-", "Q2", "Q1"]
    assert not plane["fill"].any()


def test_bisection_moves_alpha_up_when_too_few_qualify_then_fills():
    # r = 0.5: every alpha in (0, 0.49) still gives Q2 {6} and Q4 {0} (2/8 < 0.5), so lo rises
    # each time and the search ends after 10 steps near 0.49; then K = 4 - 2 = 2 rows are filled.
    plane = eu_keep(PPL8, ENT8, 0.5)
    lo, hi = 0.0, 0.49
    for _ in range(10):
        a = (lo + hi) / 2
        lo = a
    assert plane["alpha"] == pytest.approx(a)
    assert np.flatnonzero(plane["kept"]).tolist() == [0, 6]
    assert int(plane["fill"].sum()) == 2
    # and moves it down when too many qualify: r = 0.01 -> 2/8 is too many at the first alpha
    assert eu_keep(PPL8, ENT8, 0.01)["alpha"] < 0.245


def test_fill_up_by_normalised_gap_and_q2_or_q4_side():
    ppl = np.array([1.0, 2.0, 3.0, 4.0, 5.0])   # minmax: 0, .25, .5, .75, 1
    ent = np.array([0.0, 4.0, 1.0, 3.0, 2.0])   # minmax: 0, 1, .25, .75, .5
    # alpha = 0.01 leaves Q2 and Q4 empty (sample 0 is Q3); ppl_n - ent_n = 0, -.75, .25, 0, .5
    # -> K = round(5 * .6) = 3 fills by |gap|: samples 1 (Q4-like), 4 and 2 (Q2-like)
    plane = eu_keep(ppl, ent, 0.6, alpha=0.01)
    assert not plane["kept"].any()
    assert np.flatnonzero(plane["fill"]).tolist() == [1, 2, 4]
    assert np.flatnonzero(plane["q2_like"]).tolist() == [2, 4]
    # and through prune_batch: filled Q2-like rows are token-pruned, the Q4-like one is not
    nll = np.zeros((5, 4))
    nll[:, 1:] = np.log(ppl)[:, None]
    entropy = np.zeros((5, 4))
    entropy[:, 1:] = ent[:, None]
    mask = np.zeros((5, 4), dtype=bool)
    mask[:, 1:] = True
    res = prune_batch(nll, entropy, mask, np.ones((5, 4), bool), QTuningConfig(sample_ratio=0.6))
    # the batch's own bisection reaches alpha = .3675, where sample 1 is Q4 (PPL <= 2.47, Ent >
    # 2.53), so 2 rows are filled: 4 and 2, both Q2-like; the kept set is the same
    assert np.flatnonzero(res.keep).tolist() == [1, 2, 4]
    assert (res.report["q4"], res.report["filled"]) == (1, 2)
    assert res.loss_mask[1].sum() == 3 and res.loss_mask[2].sum() == 2 and res.loss_mask[4].sum() == 2


def test_smoothed_scores_use_valid_neighbours_only():
    nll = np.log(np.array([99.0, 1.0, 2.0, 4.0, 8.0, 99.0]))
    valid = np.array([False, True, True, True, True, False])
    s = smoothed_token_scores(nll, valid, lam=0.5)
    # s_i = .5 PPL_i + .5 (PPL_{i-1} + PPL_{i+1}); the 99s are not label tokens
    assert s[1:5] == pytest.approx([1.5, 3.5, 7.0, 6.0])
    assert np.isneginf(s[0]) and np.isneginf(s[5])
    assert smoothed_token_scores(nll, valid, lam=0.0)[1:5] == pytest.approx([1, 2, 4, 8])


def _batch():
    """8 samples x 6 positions; label tokens at 1..4, position 0 / 5 carry junk that must be
    ignored. Sample PPL ranks follow PPL8 (sample 6: tokens 10, 20, 40, 80 -> PPL 28.3; sample 7:
    30), per-position entropy is ENT8 for the sample."""
    B, T = 8, 6
    nll = np.full((B, T), 50.0)
    ent = np.full((B, T), 50.0)
    for i in range(B):
        nll[i, 1:5] = np.log({6: [10, 20, 40, 80], 7: [30] * 4}.get(i, [i + 1] * 4))
        ent[i, 1:5] = ENT8[i]
    mask = np.zeros((B, T), dtype=bool)
    mask[:, 1:5] = True
    return nll, ent, mask, np.ones((B, T), dtype=bool)


def test_prune_batch_per_sample_budget_keeps_exactly_the_spec_tokens():
    nll, ent, mask, att = _batch()
    res = prune_batch(nll, ent, mask, att, QTuningConfig(sample_ratio=0.25, token_ratio=0.5))
    assert np.flatnonzero(res.keep).tolist() == [0, 6]
    assert res.quadrant.tolist() == [4, 0, 0, 0, 0, 0, 2, 1]
    # Q4 sample 0 untouched
    assert res.loss_mask[0].tolist() == mask[0].tolist()
    # Q2 sample 6: s = 15, 35, 70, 60 -> keep round(4 * .5) = 2 lowest: positions 1, 2
    assert np.flatnonzero(res.loss_mask[6]).tolist() == [1, 2]
    assert not res.loss_mask[[1, 2, 3, 4, 5, 7]].any()
    r = res.report
    assert (r["samples"], r["kept_samples"], r["q2"], r["q4"], r["filled"]) == (8, 2, 1, 1, 0)
    assert (r["label_tokens"], r["kept_tokens"], r["q2_tokens"], r["q2_kept_tokens"]) == (32, 6, 4, 2)
    assert r["sample_frac"] == 0.25 and r["q2_token_frac"] == 0.5
    # token ratio .75: keep 3, drop only position 3 (s=70), not position 4 whose own PPL is highest
    res75 = prune_batch(nll, ent, mask, att, QTuningConfig(sample_ratio=0.25, token_ratio=0.75))
    assert np.flatnonzero(res75.loss_mask[6]).tolist() == [1, 2, 4]


def test_prune_batch_global_budget_of_released_code():
    nll, ent, mask, att = _batch()
    res = prune_batch(nll, ent, mask, att,
                      QTuningConfig(sample_ratio=0.25, token_ratio=0.5, prune_scope="batch"))
    # T_total = 8 * 5 = 40, keep = round(40 * .25 * .5) = 5, removed = 6 * 5 = 30,
    # drop_need = 5 >= the 4 Q2 candidates: the Q2 sample loses every token, Q4 keeps all 4
    assert np.flatnonzero(res.keep).tolist() == [0, 6]
    assert not res.loss_mask[6].any()
    assert res.loss_mask[0].tolist() == mask[0].tolist()
    assert res.report["kept_tokens"] == 4


def test_entropy_over_all_positions_changes_the_plane():
    nll, ent, mask, att = _batch()
    att[:, 5] = False   # position 5 is padding
    _, e_resp = sample_scores(nll, ent, mask, att, "response")
    _, e_all = sample_scores(nll, ent, mask, att, "all")
    assert e_resp.tolist() == ENT8.tolist()
    # positions 1..4 (ENT8) averaged over 1..4 only: position 0 has no prediction, 5 is pad
    assert e_all.tolist() == ENT8.tolist()
    att[:, 5] = True
    _, e_all = sample_scores(nll, ent, mask, att, "all")
    assert e_all == pytest.approx((4 * ENT8 + 50) / 5)


def test_summarize_fractions():
    reports = [
        {"samples": 8, "kept_samples": 2, "label_tokens": 40, "kept_tokens": 10, "q2_tokens": 8,
         "q2_kept_tokens": 4, "filled": 1},
        {"samples": 8, "kept_samples": 4, "label_tokens": 60, "kept_tokens": 20, "q2_tokens": 12,
         "q2_kept_tokens": 6, "filled": 0},
    ]
    s = summarize(reports)
    assert s["sample_frac"] == 6 / 16
    assert s["token_frac"] == 30 / 100
    assert s["q2_token_frac"] == 10 / 20
    assert s["filled"] == 1 and s["batches"] == 2


def test_bad_config_and_empty_samples_are_errors():
    with pytest.raises(ValueError, match="sample_ratio"):
        QTuningConfig(sample_ratio=0)
    with pytest.raises(ValueError, match="prune_scope"):
        QTuningConfig(prune_scope="global")
    nll, ent, mask, att = _batch()
    mask[3] = False
    with pytest.raises(ValueError, match="no loss tokens"):
        prune_batch(nll, ent, mask, att, QTuningConfig())


def test_offline_masks_on_tiny_model(tmp_path, tiny_lm_dir, sample_pool):
    from thresher.pipeline.training.qtuning import write_masks

    rows = sample_pool.rows(sample_pool.frame(["id"])["id"].to_list()[:16])
    out = tmp_path / "masks.jsonl"
    info = write_masks(rows, out, str(tiny_lm_dir), QTuningConfig(sample_ratio=0.25,
                       token_ratio=0.5), max_tokens=64)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in recs] == [r["id"] for r in rows]
    kept = [r for r in recs if r["keep"]]
    assert info["kept_samples"] == len(kept) >= round(16 * 0.25)
    assert all(not any(r["keep_mask"]) for r in recs if not r["keep"])
    assert all(r["quadrant"] in (2, 4) for r in kept)
    assert all(len(r["keep_mask"]) == len(r["input_ids"]) for r in recs)
    masks = read_masks(out)
    assert set(masks) == {r["id"] for r in rows}
    # Q2 rows keep about half their label tokens, Q4 rows all of them
    from thresher.pipeline.models.chat import encode
    from thresher.pipeline.models.resolve import load_tokenizer, resolve

    tok = load_tokenizer(resolve(str(tiny_lm_dir)))
    by_id = {r["id"]: r for r in rows}
    for r in kept:
        full = int(encode(tok, by_id[r["id"]], 64).loss_mask.sum())
        expect = full if r["quadrant"] == 4 else max(1, round(full * 0.5))
        assert sum(r["keep_mask"]) == expect
