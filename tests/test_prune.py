"""Pruning: the saved model loads with transformers and equals the original with the removed
channels (or weights) zeroed; unstructured pruning hits its ratio per output row."""

from __future__ import annotations

import json

import pytest
import torch
from thresher.pipeline.models.chat import encode
from thresher.pipeline.models.resolve import load_causal_lm, load_tokenizer, resolve
from thresher.pipeline.training import prune
from transformers import AutoModelForCausalLM


@pytest.fixture(scope="module")
def chat_rows():
    return [{"id": f"r{i}", "kind": "chat", "text": None,
             "messages": [{"role": "user", "content": f"Name {i + 2} colours of the sky."},
                          {"role": "assistant", "content": "Blue, grey and orange at dusk." * (i + 1)}]}
            for i in range(4)]


def _logits(model, tok, row):
    ids = torch.from_numpy(encode(tok, row, 512).input_ids)[None]
    with torch.no_grad():
        return model(input_ids=ids).logits[0].double()


def test_structured_pruning_loads_with_transformers_and_equals_zeroed_channels(tmp_path, tiny_lm_dir,
                                                                              chat_rows):
    out = tmp_path / "p"
    info = prune.prune_model(str(tiny_lm_dir), 0.25, out, method="structured")
    assert info["intermediate_size"] == [128, 96]
    pruned = AutoModelForCausalLM.from_pretrained(out)            # plain transformers, no extra code
    assert pruned.config.intermediate_size == 96
    assert all(layer.mlp.down_proj.weight.shape == (64, 96) for layer in pruned.model.layers)
    assert info["params_after"] == sum(p.numel() for p in pruned.parameters()) < info["params_before"]
    assert json.loads((out / "prune.json").read_text())["ratio"] == 0.25

    ref = load_causal_lm(resolve(str(tiny_lm_dir)))              # the original, channels zeroed
    for mlp in prune.gated_mlps(ref):
        drop = torch.topk(prune.channel_importance(mlp), 32, largest=False).indices
        mlp.gate_proj.weight.data[drop] = 0
        mlp.up_proj.weight.data[drop] = 0
        mlp.down_proj.weight.data[:, drop] = 0
    tok = load_tokenizer(resolve(str(out)))
    for row in chat_rows:
        torch.testing.assert_close(_logits(pruned, tok, row), _logits(ref, tok, row),
                                   rtol=1e-4, atol=1e-4)


def test_channel_importance_is_the_group_l2_norm():
    mlp = torch.nn.Module()
    mlp.gate_proj, mlp.up_proj = torch.nn.Linear(3, 2, bias=False), torch.nn.Linear(3, 2, bias=False)
    mlp.down_proj = torch.nn.Linear(2, 3, bias=False)
    for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        torch.nn.init.normal_(lin.weight)
    g, u, d = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    want = torch.stack([torch.cat([g[i], u[i], d[:, i]]).norm() for i in range(2)])
    torch.testing.assert_close(prune.channel_importance(mlp), want)


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_unstructured_pruning_zeroes_the_lowest_scores_per_row(tmp_path, tiny_lm_dir, chat_rows, method):
    out = tmp_path / method
    prune.prune_model(str(tiny_lm_dir), 0.5, out, method=method,
                      calib=chat_rows if method == "wanda" else None)
    before = load_causal_lm(resolve(str(tiny_lm_dir)))
    after = AutoModelForCausalLM.from_pretrained(out)
    norms = None
    if method == "wanda":
        norms, _ = prune.input_norms(before, load_tokenizer(resolve(str(tiny_lm_dir))), chat_rows)
    lin_b, lin_a = prune.decoder_linears(before), prune.decoder_linears(after)
    for name, lb in lin_b.items():
        w, wa = lb.weight.data, lin_a[name].weight.data
        assert ((wa == 0).sum(1) >= w.shape[1] // 2).all()
        score = w.abs() * (norms[name][None, :].float() if norms else 1.0)
        kept = wa != 0
        # every kept weight scores at least as high as every zeroed one in its row
        lo_kept = torch.where(kept, score, torch.inf).min(1).values
        hi_zeroed = torch.where(~kept, score, -torch.inf).max(1).values
        assert (lo_kept >= hi_zeroed).all()
        assert torch.equal(wa[kept], w[kept])
    assert torch.equal(after.model.embed_tokens.weight, before.model.embed_tokens.weight)


def test_magnitude_and_wanda_differ_when_inputs_are_uneven(tiny_lm_dir, chat_rows):
    m = load_causal_lm(resolve(str(tiny_lm_dir)))
    norms, tokens = prune.input_norms(m, load_tokenizer(resolve(str(tiny_lm_dir))), chat_rows)
    assert tokens > 0 and all(v.shape == (lin.in_features,) for v, lin in
                              zip(norms.values(), prune.decoder_linears(m).values()))
    a, b = load_causal_lm(resolve(str(tiny_lm_dir))), load_causal_lm(resolve(str(tiny_lm_dir)))
    prune.prune_unstructured(a, 0.5)
    prune.prune_unstructured(b, 0.5, norms)
    assert not torch.equal(a.model.layers[0].mlp.down_proj.weight, b.model.layers[0].mlp.down_proj.weight)


def test_user_errors(tmp_path, tiny_lm_dir):
    with pytest.raises(ValueError, match="ratio"):
        prune.prune_model(str(tiny_lm_dir), 1.5, tmp_path / "x")
    with pytest.raises(ValueError, match="calib"):
        prune.prune_model(str(tiny_lm_dir), 0.5, tmp_path / "x", method="wanda")
    with pytest.raises(ValueError, match="unknown prune method"):
        prune.prune_model(str(tiny_lm_dir), 0.5, tmp_path / "x", method="slicegpt")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        prune.prune_model(str(tiny_lm_dir), 0.5, tmp_path / "full")


def test_prune_command(tmp_path, tiny_lm_dir):
    from thresher.pipeline.cli import app
    from typer.testing import CliRunner

    res = CliRunner().invoke(app, ["prune", str(tiny_lm_dir), "--ratio", "0.5", "--out",
                                   str(tmp_path / "p")])
    assert res.exit_code == 0, res.output
    assert "intermediate_size 128 -> 64" in res.output
    again = CliRunner().invoke(app, ["prune", str(tiny_lm_dir), "--ratio", "0.5", "--out",
                                     str(tmp_path / "p")])
    assert again.exit_code == 2 and "error:" in again.output and "not empty" in again.output
    bad = CliRunner().invoke(app, ["prune", str(tiny_lm_dir), "--ratio", "0.5", "--method", "wanda",
                                   "--out", str(tmp_path / "w")])
    assert bad.exit_code == 2 and "--calib" in bad.output
