"""Per-sample gradients (vmap vs one backward per sample vs HF's own loss) and the LiSSA
inverse-Hessian-vector estimate vs an exact solve, on tiny Llamas built in code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from thresher.pipeline.models.chat import Encoded
from thresher.pipeline.models.grads import (
    flatten,
    grad_dots,
    grad_norms,
    hvp,
    iter_grads,
    lissa,
    mean_grad,
    only_grad,
    select_params,
)

VOCAB = 40


def tiny_llama(hidden=16, tie=False, lora=False, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=64, tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                 target_modules=["q_proj", "v_proj", "o_proj"]))
        with torch.no_grad():   # B starts at zero in peft; give it values so A gets gradients too
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
    return model


def examples(n=7, seed=1):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        L = int(rng.integers(5, 14))
        ids = rng.integers(0, VOCAB, size=L)
        mask = np.zeros(L, dtype=bool)
        mask[int(rng.integers(1, L - 1)):] = True       # a prompt, then the response
        out.append(Encoded(ids.astype(np.int64), mask, False))
    return out


def hf_grads(model, e: Encoded, params: dict) -> torch.Tensor:
    """The reference: HF's own loss (labels, -100 on non-loss tokens), unpadded, one backward."""
    was_training = model.training            # the caller's mode is left as it was
    model.eval()
    model.zero_grad()
    labels = torch.tensor(np.where(e.loss_mask, e.input_ids, -100))[None]
    with only_grad(model, params):
        loss = model(input_ids=torch.tensor(e.input_ids)[None], labels=labels).loss
        g = torch.autograd.grad(loss, list(params.values()))
    model.train(was_training)
    return torch.cat([t.reshape(-1) for t in g])


@pytest.mark.parametrize("how", ["packed", "vmap", "loop"])
def test_per_sample_grads_match_one_by_one_backward(how):
    model = tiny_llama(lora=True)
    params = select_params(model, "lora")
    assert all("lora_" in n for n in params) and len(params) == 2 * 3 * 2
    enc = examples()
    seen = np.zeros(len(enc), dtype=bool)
    was_training = model.training
    for idx, g in iter_grads(model, enc, params, how=how, batch_tokens=40):
        flat = flatten(g)
        for j, i in enumerate(idx):
            ref = hf_grads(model, enc[i], params)
            torch.testing.assert_close(flat[j], ref, rtol=1e-4, atol=1e-6)
            seen[i] = True
    assert seen.all()
    assert model.training == was_training                  # the model's mode restored
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
    norms = grad_norms(model, enc, params, how=how, batch_tokens=40)
    ref = [float(hf_grads(model, e, params).norm()) for e in enc]
    np.testing.assert_allclose(norms, ref, rtol=1e-4)
    assert len(set(np.round(norms, 6))) == len(enc)        # different rows, different norms


def test_vmap_and_loop_agree_and_mode_is_restored():
    model = tiny_llama(lora=True)
    model.train()
    params = select_params(model, "*layers.{last}.self_attn.o_proj.lora_B*")
    assert list(params) == ["base_model.model.model.layers.1.self_attn.o_proj.lora_B.default.weight"]
    enc = examples(5, seed=3)
    a = grad_norms(model, enc, params, how="vmap")
    b = grad_norms(model, enc, params, how="loop")
    np.testing.assert_allclose(a, b, rtol=1e-5)
    assert model.training
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
    u = torch.randn(sum(p.numel() for p in params.values()))
    dots = grad_dots(model, enc, params, u)
    ref = [float(hf_grads(model, e, params) @ u) for e in enc]
    np.testing.assert_allclose(dots, ref, rtol=1e-4, atol=1e-6)
    v = mean_grad(model, enc, params)
    torch.testing.assert_close(v, torch.stack([hf_grads(model, e, params) for e in enc]).mean(0),
                               rtol=1e-4, atol=1e-6)


def test_select_params_errors_name_the_model():
    model = tiny_llama()
    with pytest.raises(ValueError, match="no model parameter matches"):
        select_params(model, "lora")
    assert list(select_params(model, "lm_head.*")) == ["lm_head.weight"]


def per_sample_hessians(model, enc, params) -> torch.Tensor:
    """[n, P, P] exact Hessians of each sample's loss (torch.autograd.functional.hessian)."""
    from thresher.pipeline.models.grads import _loss_module, _pad
    from torch.func import functional_call

    (name, w0), = params.items()
    mod = _loss_module(model)
    ids, pos, y, w = _pad(enc, "cpu")
    out = []
    for i in range(len(enc)):
        k = int((w[i] > 0).sum())
        args = (ids[i], pos[i, :k], y[i, :k], w[i, :k])

        def f(flat, args=args):
            return functional_call(mod, {"model." + name: flat.view_as(w0)}, args)

        out.append(torch.autograd.functional.hessian(f, w0.detach().reshape(-1)))
    return torch.stack(out)


def test_hvp_matches_the_exact_hessian():
    model = tiny_llama(hidden=4)
    params = select_params(model, "lm_head.weight")
    enc = examples(4)
    Hs = per_sample_hessians(model, enc, params)
    H = Hs.mean(0)
    torch.testing.assert_close(H, H.T, rtol=1e-4, atol=1e-6)
    for seed in range(3):
        vec = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(hvp(model, enc, params, vec), H @ vec, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(hvp(model, enc[1:2], params, vec), Hs[1] @ vec, rtol=1e-4, atol=1e-6)


def test_lissa_estimate_matches_an_exact_solve():
    """The LM head's cross-entropy Hessian is PSD, so (H + damp*scale I) is invertible and the
    recursion converges: with all samples per step to the solve; with one random sample per
    step (DEALRec's setting, through the model's double-backward HVP) close to it."""
    model = tiny_llama(hidden=4)
    params = select_params(model, "lm_head.weight")
    enc = examples(6)
    H = per_sample_hessians(model, enc, params).mean(0)
    v = mean_grad(model, enc, params)
    damp, scale = 0.01, 2.0
    exact = torch.linalg.solve(H + damp * scale * torch.eye(H.shape[0]), v)
    assert float(torch.linalg.eigvalsh(H).max()) < 2 * scale

    full = lissa(lambda h, idx: H @ h, v, n=len(enc), depth=4000, damp=damp, scale=scale)
    torch.testing.assert_close(full, exact, rtol=1e-3, atol=1e-5)
    sto = lissa(lambda h, idx: hvp(model, [enc[i] for i in idx], params, h), v, n=len(enc),
                depth=300, damp=damp, scale=scale, seed=0)
    cos = float(sto @ exact / (sto.norm() * exact.norm()))
    assert cos > 0.9, cos
    assert float((sto - exact).norm() / exact.norm()) < 0.5
    short = lissa(lambda h, idx: H @ h, v, n=len(enc), depth=3, damp=damp, scale=scale)
    assert float((short - exact).norm()) > float((sto - exact).norm())   # the recursion matters


def test_lissa_divergence_is_an_error():
    H = torch.diag(torch.tensor([1.0, 100.0]))
    with pytest.raises(ValueError, match="raise --param scale"):
        lissa(lambda h, idx: H @ h, torch.ones(2), n=1, depth=500, scale=10.0)


def test_packed_bf16_is_bf16_and_close_and_grand_norms_agree():
    """bf16 autocast changes the numbers (it runs) but keeps every row's gradient within cosine
    0.99 of float32 and its norm (GraNd's score) within 2%; float32 packed norms equal vmap's."""
    model = tiny_llama(hidden=32, lora=True)
    params = select_params(model, "lora")
    enc = examples(9, seed=4)
    ref = torch.zeros(len(enc), sum(p.numel() for p in params.values()))
    got = torch.zeros_like(ref)
    for idx, g in iter_grads(model, enc, params, how="vmap"):
        ref[torch.as_tensor(idx)] = flatten(g)
    for idx, g in iter_grads(model, enc, params, how="packed", dtype="bf16", batch_tokens=30):
        got[torch.as_tensor(idx)] = flatten(g)
    cos = torch.nn.functional.cosine_similarity(got, ref)
    assert cos.min() > 0.99 and not torch.allclose(got, ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grad_norms(model, enc, params, how="packed", dtype="bf16"),
                               ref.norm(dim=1).numpy(), rtol=2e-2)
    np.testing.assert_allclose(grad_norms(model, enc, params, how="packed"),
                               grad_norms(model, enc, params, how="vmap"), rtol=1e-5)


def test_packed_covers_biases_and_an_untied_head_and_falls_back_for_tied_weights():
    from thresher.pipeline.models.grads import resolve_how

    model = tiny_llama(lora=True)
    enc = examples(5, seed=2)
    params = select_params(model, ["*lm_head*", "*layers.0.self_attn.q_proj.lora_A*"])
    assert resolve_how(model, params) == "packed"
    for idx, g in iter_grads(model, enc, params, batch_tokens=25):
        flat = flatten(g)
        for j, i in enumerate(idx):
            torch.testing.assert_close(flat[j], hf_grads(model, enc[i], params), rtol=1e-4, atol=1e-6)
    # a Linear with a bias (a fresh one standing in for a layer), both parameters chosen
    plain = tiny_llama()
    lin = plain.model.layers[1].mlp.down_proj
    plain.model.layers[1].mlp.down_proj = torch.nn.Linear(lin.in_features, lin.out_features, bias=True)
    params = select_params(plain, "model.layers.1.mlp.down_proj.*")
    assert sorted(n.rsplit(".", 1)[1] for n in params) == ["bias", "weight"]
    for idx, g in iter_grads(plain, enc, params, how="packed", batch_tokens=25):
        flat = flatten(g)
        for j, i in enumerate(idx):
            torch.testing.assert_close(flat[j], hf_grads(plain, enc[i], params), rtol=1e-4, atol=1e-6)
    tied = tiny_llama(tie=True)
    assert resolve_how(tied, select_params(tied, "model.embed_tokens.weight")) == "vmap"   # = lm_head
    assert resolve_how(tied, select_params(tied, "*norm*")) == "vmap"             # not a Linear
    with pytest.raises(ValueError, match="how must be"):
        resolve_how(tied, select_params(tied, "*norm*"), how="fast")
