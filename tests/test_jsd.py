"""JSD between an original and a pruned model: against a direct computation, batching-invariant,
cached and resumable per shard."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import pool_of_rows
from thresher.pipeline.artifacts import ArtifactStore
from thresher.pipeline.models.chat import encode
from thresher.pipeline.models.resolve import load_causal_lm, load_tokenizer, resolve
from thresher.pipeline.stages import jsd as jsd_mod
from thresher.pipeline.stages.jsd import JsdWorker, jsd_from_logits, jsd_signals
from thresher.pipeline.training.prune import prune_model


@pytest.fixture(scope="module")
def pair(tiny_lm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned") / "p"
    prune_model(str(tiny_lm_dir), 0.5, out, method="structured")
    o, p = resolve(str(tiny_lm_dir)), resolve(str(out))
    return o, p, load_causal_lm(o), load_causal_lm(p), load_tokenizer(o)


@pytest.fixture(scope="module")
def rows():
    out = []
    for i in range(7):
        msgs = [{"role": "user", "content": "Explain step " * (i + 1) + "please."},
                {"role": "assistant", "content": f"Step {i}: " + "do this, then that. " * (2 * i + 1)}]
        if i % 3 == 2:
            msgs += [{"role": "user", "content": "And then?"}, {"role": "assistant", "content": "Done."}]
        out.append({"id": f"r{i}", "source": "s", "kind": "chat", "messages": msgs, "text": None})
    out.append({"id": "t0", "source": "s", "kind": "text", "messages": None,
                "text": "Plain text rows score every token. " * 3})
    return out


def direct(orig, pruned, tok, row):
    """JSD summed over the response tokens with full float64 distributions, the obvious way."""
    enc = encode(tok, row, 2048)
    ids = torch.from_numpy(enc.input_ids)[None]
    with torch.no_grad():
        q = torch.softmax(orig(input_ids=ids).logits[0, :-1].double(), -1)
        p = torch.softmax(pruned(input_ids=ids).logits[0, :-1].double(), -1)
    m = 0.5 * (p + q)
    per_pos = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    return per_pos[torch.from_numpy(enc.loss_mask[1:])].sum().item(), int(enc.loss_mask.sum())


def test_jsd_matches_the_direct_computation(pair, rows):
    _, _, orig, pruned, tok = pair
    out = JsdWorker(orig, pruned, tok, batch_tokens=256)(rows)
    for i, row in enumerate(rows):
        want, n = direct(orig, pruned, tok, row)
        assert out["n_loss_tokens"][i] == n > 0
        assert out["jsd_sum"][i] == pytest.approx(want, rel=1e-4, abs=1e-6)
        assert out["jsd_mean"][i] == pytest.approx(want / n, rel=1e-4, abs=1e-7)
    assert (out["jsd_sum"] > 0).all()


def test_batching_and_blocks_do_not_change_the_numbers(pair, rows, monkeypatch):
    _, _, orig, pruned, tok = pair
    big = JsdWorker(orig, pruned, tok, batch_tokens=100_000)(rows)
    monkeypatch.setattr(jsd_mod, "LOGIT_CHUNK", 3 * orig.config.vocab_size)   # 3 positions a block
    small = JsdWorker(orig, pruned, tok, batch_tokens=64)(rows)
    np.testing.assert_allclose(big["jsd_sum"], small["jsd_sum"], rtol=1e-4, atol=1e-7)


def test_identical_models_give_zero_and_jsd_is_bounded_by_log2():
    a = torch.randn(5, 50) * 30
    assert torch.allclose(jsd_from_logits(a, a), torch.zeros(5, dtype=torch.float64), atol=1e-9)
    far = jsd_from_logits(torch.tensor([[80.0, -80.0]]), torch.tensor([[-80.0, 80.0]]))
    assert far.item() == pytest.approx(np.log(2), rel=1e-5)       # underflow: no NaN
    assert not torch.isnan(far).any()


def test_different_vocabularies_are_refused(pair, tiny_lm_dir):
    _, _, orig, _, tok = pair
    other = load_causal_lm(resolve(str(tiny_lm_dir)))
    other.config.vocab_size += 1
    with pytest.raises(ValueError, match="vocabularies"):
        JsdWorker(orig, other, tok)


def test_pool_stage_is_cached_and_resumes_per_shard(tmp_path, pair, rows, monkeypatch):
    o, p, orig, pruned, tok = pair
    pool = pool_of_rows(tmp_path, rows, 3)
    store = ArtifactStore(tmp_path / "work")
    first = jsd_signals(pool, store, o.name, p.name, dtype="fp32").scores()
    assert first["id"].to_list() == [r["id"] for r in rows]
    mem = JsdWorker(orig, pruned, tok)(rows)
    np.testing.assert_allclose(first["jsd_sum"].to_numpy(), mem["jsd_sum"], rtol=1e-4)

    markers = sorted((tmp_path / "work" / "jsd").glob("*/units/*.done.json"))
    assert len(markers) == len(pool.shards) == 3
    markers[-1].unlink()                                       # as if killed before one shard
    for done in (tmp_path / "work" / "jsd").glob("*/_COMPLETE.json"):
        done.unlink()
    calls = []
    real = JsdWorker.__call__
    monkeypatch.setattr(JsdWorker, "__call__", lambda self, r: calls.append(len(r)) or real(self, r))
    again = jsd_signals(pool, store, o.name, p.name, dtype="fp32").scores()
    assert len(calls) == 1                                     # only the missing shard ran
    assert again.equals(first)
