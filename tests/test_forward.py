"""The fused forward pass: each signal against a direct computation, batching, order, caching, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import pool_of_rows
from thresher.pipeline.artifacts import ArtifactStore
from thresher.pipeline.models import batching, engine
from thresher.pipeline.models.batching import length_batches
from thresher.pipeline.models.chat import encode
from thresher.pipeline.models.engine import run_forward
from thresher.pipeline.models.resolve import load_causal_lm, load_tokenizer, resolve
from thresher.pipeline.stages import forward
from thresher.pipeline.stages.forward import forward_signals

ALL = {"loss", "entropy", "el2n", "token_loss", "token_entropy", "rds"}


@pytest.fixture(scope="module")
def tiny(tiny_lm_dir):
    m = resolve(str(tiny_lm_dir))
    return load_causal_lm(m), load_tokenizer(m)


@pytest.fixture(scope="module")
def rows(sample_pool):
    """A dozen rows of mixed kind and length: chat from every source plus plain text."""
    frame = sample_pool.frame(["id", "source", "kind", "messages", "text", "n_chars"])
    frame = frame.filter(frame["n_chars"] < 1500)
    picked = []
    for src in sorted(set(frame["source"])):
        picked += frame.filter(frame["source"] == src).head(3).to_dicts()
    return picked[:12]


def direct(model, tok, row, response_only=True):
    """Every signal of one row, computed the obvious way: full logits, dense one-hot."""
    enc = encode(tok, row, 2048, response_only)
    ids = torch.from_numpy(enc.input_ids)[None]
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    logits = out.logits[0, :-1].double()
    y = ids[0, 1:]
    m = torch.from_numpy(enc.loss_mask[1:])
    p = torch.softmax(logits, -1)
    onehot = torch.nn.functional.one_hot(y, p.shape[-1]).double()
    nll = -torch.log_softmax(logits, -1).gather(1, y[:, None])[:, 0]
    ent = -(p * torch.log_softmax(logits, -1)).sum(-1)
    el2n = torch.linalg.vector_norm(p - onehot, dim=-1)            # ||softmax - onehot||_2
    h = out.hidden_states[-1][0].double()                           # [L, d], after the final norm
    L = h.shape[0]
    w = torch.tensor([i / sum(range(1, L + 1)) for i in range(1, L + 1)], dtype=torch.float64)
    e = sum(w[i] * h[i] for i in range(L))
    return {"loss": nll[m].mean().item(), "entropy": ent[m].mean().item(),
            "el2n": el2n[m].mean().item(), "token_loss": nll[m].numpy(),
            "rds": (e / e.norm()).numpy()}


def test_every_signal_matches_the_direct_formulas(tiny, rows):
    model, tok = tiny
    got = run_forward(model, tok, rows, ALL, batch_tokens=2048)
    for i, row in enumerate(rows):
        ref = direct(model, tok, row)
        assert got["el2n"][i] == pytest.approx(ref["el2n"], rel=1e-4)
        assert got["loss"][i] == pytest.approx(ref["loss"], rel=1e-4)
        assert got["ppl"][i] == pytest.approx(np.exp(ref["loss"]), rel=1e-4)
        assert got["entropy"][i] == pytest.approx(ref["entropy"], rel=1e-4)
        np.testing.assert_allclose(got["token_loss"][i], ref["token_loss"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got["rds"][i], ref["rds"], rtol=1e-3, atol=1e-5)
        assert np.linalg.norm(got["rds"][i]) == pytest.approx(1.0, abs=1e-5)


def test_el2n_identity_on_a_hand_made_distribution():
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    y = torch.tensor([1, 3])
    stats = engine._logit_stats(logits.clone(), y, frozenset({"el2n", "entropy"}))
    p = torch.softmax(logits, -1)
    dense = torch.linalg.vector_norm(p - torch.nn.functional.one_hot(y, 4), dim=-1)
    torch.testing.assert_close(stats["el2n"], dense)
    torch.testing.assert_close(stats["entropy"], -(p * p.log()).sum(-1))
    torch.testing.assert_close(stats["loss"], -p.log().gather(1, y[:, None])[:, 0])


def test_weighted_pooling_by_hand_with_padding():
    """Two rows, one padded: weights i / sum_j j over the real tokens only."""
    class Body(torch.nn.Module):
        def forward(self, input_ids, attention_mask, use_cache=False):
            from types import SimpleNamespace
            return SimpleNamespace(last_hidden_state=hid)

    hid = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]],
                        [[2.0, 0.0], [0.0, 2.0], [9.0, 9.0]]])   # row 2's third token is padding
    am = torch.tensor([[1, 1, 1], [1, 1, 0]])
    lm = torch.zeros(2, 3, dtype=torch.bool)
    out = engine._forward_batch(None, (Body(), None), torch.zeros(2, 3, dtype=torch.long), am, lm,
                                 frozenset({"rds"}))
    e1 = (1 * np.array([1, 0]) + 2 * np.array([0, 1]) + 3 * np.array([1, 1])) / 6   # [4/6, 5/6]
    e2 = (1 * np.array([2, 0]) + 2 * np.array([0, 2])) / 3                          # [2/3, 4/3]
    np.testing.assert_allclose(out["rds"][0], e1 / np.linalg.norm(e1), rtol=1e-6)
    np.testing.assert_allclose(out["rds"][1], e2 / np.linalg.norm(e2), rtol=1e-6)


def test_batched_equals_one_at_a_time_in_row_order(tiny, rows):
    model, tok = tiny
    batched = run_forward(model, tok, rows, ALL, batch_tokens=4096)
    lengths = batched["n_tokens"]
    assert len(length_batches(lengths, 4096)) < len(rows)      # really batched, with padding
    for i, row in enumerate(rows):
        one = run_forward(model, tok, [row], ALL)
        for k in ("loss", "entropy", "el2n", "n_loss_tokens", "n_tokens"):
            assert batched[k][i] == pytest.approx(one[k][0], rel=2e-4), (k, i)
        np.testing.assert_allclose(batched["token_entropy"][i], one["token_entropy"][0], rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(batched["rds"][i], one["rds"][0], rtol=1e-3, atol=1e-4)


def test_only_requested_signals_are_returned(tiny, rows):
    model, tok = tiny
    only_rds = run_forward(model, tok, rows[:3], {"rds"})
    assert "loss" not in only_rds and only_rds["rds"].shape[0] == 3
    only_loss = run_forward(model, tok, rows[:3], {"loss"})
    assert "rds" not in only_loss and "el2n" not in only_loss and "token_loss" not in only_loss
    with pytest.raises(ValueError, match="unknown forward signals"):
        run_forward(model, tok, rows[:1], {"logits"})


def test_response_only_switch_and_plain_text(tiny, rows):
    model, tok = tiny
    resp = run_forward(model, tok, rows, {"loss"})
    full = run_forward(model, tok, rows, {"loss"}, response_only=False)
    for i, row in enumerate(rows):
        assert full["n_loss_tokens"][i] == full["n_tokens"][i] - 1
        if row["kind"] == "text":
            assert resp["n_loss_tokens"][i] == resp["n_tokens"][i] - 1
        else:
            assert 0 < resp["n_loss_tokens"][i] < full["n_loss_tokens"][i]


def test_truncation_and_a_row_without_loss_tokens(tiny):
    model, tok = tiny
    row = {"id": "x", "kind": "chat", "text": None,
           "messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    out = run_forward(model, tok, [row], {"loss", "el2n"}, max_tokens=16)
    assert out["truncated"][0] and out["n_tokens"][0] == 16
    assert out["n_loss_tokens"][0] == 0 and np.isnan(out["loss"][0]) and np.isnan(out["el2n"][0])


def test_peft_model_and_training_mode_restored(tiny, rows):
    from peft import LoraConfig, get_peft_model

    model, tok = tiny
    import copy
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.train()
    out = run_forward(peft_model, tok, rows[:4], {"loss", "rds"})
    base = run_forward(model, tok, rows[:4], {"loss", "rds"})
    assert peft_model.training
    np.testing.assert_allclose(out["loss"], base["loss"], rtol=1e-5)   # LoRA B starts at zero


def test_packed_rows_give_the_padded_per_row_signals(tiny, rows):
    """Block-diagonal causal attention over packed rows = each row alone (padded batches)."""
    model, tok = tiny
    packed = run_forward(model, tok, rows, ALL, batch_tokens=1024, pack=True)
    padded = run_forward(model, tok, rows, ALL, batch_tokens=1024, pack=False)
    assert len(batching.pack_rows(packed["n_tokens"], 1024)) < len(rows)   # really packed
    assert model.config._attn_implementation != engine.PACKED_ATTENTION  # restored after
    np.testing.assert_array_equal(packed["n_loss_tokens"], padded["n_loss_tokens"])
    for k in ("loss", "entropy", "el2n"):
        np.testing.assert_allclose(packed[k], padded[k], rtol=1e-5, atol=1e-6)
    for i in range(len(rows)):
        np.testing.assert_allclose(packed["token_loss"][i], padded["token_loss"][i], rtol=1e-4,
                                   atol=1e-5)
    np.testing.assert_allclose(packed["rds"], padded["rds"], rtol=1e-4, atol=1e-5)


def test_batches_side_by_side_give_the_one_at_a_time_signals(tiny, rows):
    """Two workers of one intra-op thread each (`_in_workers`) = one batch at a time on all
    threads; the caller's thread count, grad mode and autocast state come back unchanged."""
    model, tok = tiny
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        serial = run_forward(model, tok, rows, ALL, batch_tokens=256, workers=1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
            side = run_forward(model, tok, rows, ALL, batch_tokens=256, workers=2)
        assert torch.get_num_threads() == 2 and torch.is_grad_enabled()
    finally:
        torch.set_num_threads(threads)
    assert len(batching.pack_rows(serial["n_tokens"], 256)) > 2              # several batches
    np.testing.assert_array_equal(side["n_loss_tokens"], serial["n_loss_tokens"])
    for k in ("loss", "entropy", "el2n"):
        np.testing.assert_allclose(side[k], serial[k], rtol=1e-5, atol=1e-6)
    for i in range(len(rows)):
        np.testing.assert_allclose(side["token_entropy"][i], serial["token_entropy"][i],
                                   rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(side["rds"], serial["rds"], rtol=1e-4, atol=1e-5)


def test_workers_keep_the_callers_autocast_and_a_workers_error_surfaces():
    calls = []

    def fn(x):
        calls.append((torch.is_autocast_enabled("cpu"), torch.is_inference_mode_enabled()))
        if x == 3:
            raise KeyError("row 3")
        return x * 10

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert list(batching._in_workers(fn, [0, 1, 2], 2)) == [(0, 0), (1, 10), (2, 20)]
    assert calls and all(c == (True, True) for c in calls)
    with pytest.raises(KeyError, match="row 3"):
        list(batching._in_workers(fn, [1, 2, 3, 4], 2))


def test_pack_rows_cover_every_row_within_budget():
    lengths = np.array([5, 300, 40, 41, 7, 1000, 2, 39, 60, 60])
    packs = batching.pack_rows(lengths, 100)
    seen = np.concatenate(packs)
    assert sorted(seen.tolist()) == list(range(len(lengths)))
    for b in packs:
        assert len(b) == 1 or lengths[b].sum() <= 100
    assert len(packs) == 5      # [1000], [300], and the 254 short tokens in three packs


def test_length_batches_cover_every_row_within_budget():
    lengths = np.array([5, 300, 40, 41, 7, 1000, 2, 39])
    batches = length_batches(lengths, 100)
    seen = np.concatenate(batches)
    assert sorted(seen.tolist()) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or lengths[b].max() * len(b) <= 100


@pytest.fixture
def small_pool(tmp_path, rows):
    return pool_of_rows(tmp_path, rows, 2)


def test_pool_stage_is_deterministic_and_aligned(tmp_path, small_pool, tiny_lm_dir, rows):
    a = forward_signals(small_pool, ArtifactStore(tmp_path / "w1"), str(tiny_lm_dir), {"el2n", "rds"}, dtype="fp32")
    b = forward_signals(small_pool, ArtifactStore(tmp_path / "w2"), str(tiny_lm_dir), {"el2n", "rds"}, dtype="fp32")
    sa, sb = a.scores(), b.scores()
    assert sa.equals(sb)
    assert np.array_equal(np.asarray(a.rds()), np.asarray(b.rds()))
    assert sa["id"].to_list() == small_pool.frame(["id"])["id"].to_list()
    assert a.rds().dtype == np.float16 and a.rds().shape[0] == small_pool.n_rows
    flat, offs = a.token_values("token_loss")
    assert len(offs) == small_pool.n_rows + 1 and offs[-1] == len(flat) == sa["n_loss_tokens"].sum()
    i = 5
    assert flat[offs[i]:offs[i + 1]].astype(np.float64).mean() == pytest.approx(sa["loss"][i], rel=1e-5)
    # the same numbers the in-memory engine gives
    model, tok = load_causal_lm(resolve(str(tiny_lm_dir))), load_tokenizer(resolve(str(tiny_lm_dir)))
    mem = run_forward(model, tok, small_pool.frame(["id", "kind", "messages", "text"]).to_dicts(), {"el2n"})
    np.testing.assert_allclose(sa["el2n"].to_numpy(), mem["el2n"], rtol=1e-5)


def test_interrupted_stage_resumes_without_redoing_shards(tmp_path, small_pool, tiny_lm_dir, monkeypatch):
    store = ArtifactStore(tmp_path / "work")
    real = forward.run_forward
    calls = []

    def flaky(*a, **kw):
        calls.append(len(a[2]))
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(*a, **kw)

    monkeypatch.setattr(forward, "run_forward", flaky)
    with pytest.raises(KeyboardInterrupt):
        forward_signals(small_pool, store, str(tiny_lm_dir), {"loss"})
    n_shards = len(small_pool.shards)
    assert n_shards >= 4
    calls.clear()
    monkeypatch.setattr(forward, "run_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    res = forward_signals(small_pool, store, str(tiny_lm_dir), {"loss"})
    assert len(calls) == n_shards - 2                  # two shards were finished before the kill
    assert res.dir.done and res.scores().height == small_pool.n_rows
    calls.clear()
    again = forward_signals(small_pool, store, str(tiny_lm_dir), {"loss", "entropy"})
    assert calls == [] and again.scores().equals(res.scores())   # one cache for every logit signal
    fresh = forward_signals(small_pool, ArtifactStore(tmp_path / "fresh"), str(tiny_lm_dir), {"loss"})
    assert fresh.scores().equals(res.scores())
