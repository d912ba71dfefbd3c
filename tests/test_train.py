"""The LoRA trainer on the tiny random Llama: learns, checkpoints, resumes bit-for-bit."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from safetensors.numpy import load_file
from thresher.pipeline.io.pool import load_rows
from thresher.pipeline.training.batches import plan_batches
from thresher.pipeline.training.qtuning import QTuningConfig
from thresher.pipeline.training.train import TrainConfig, load_trained, train, train_file


@pytest.fixture(scope="module")
def rows(sample_pool):
    ids = sample_pool.frame(["id", "source"]).filter(source="gsm8k")["id"].to_list()[:6]
    return sample_pool.rows(ids)


def cfg(tiny_lm_dir, **kw):
    base = {"model": str(tiny_lm_dir), "batch_size": 2, "max_tokens": 128, "lr": 2e-2, "seed": 3}
    base.update(kw)
    return TrainConfig(**base)


def _eval_loss(model, tok, rows):
    from thresher.pipeline.models.engine import run_forward

    out = run_forward(model, tok, rows, {"loss"}, max_tokens=128)
    return float(np.mean(out["loss"]))


def test_training_lowers_the_loss_on_a_repeated_set(tmp_path, tiny_lm_dir, rows):
    from thresher.pipeline.models.resolve import load_causal_lm, load_tokenizer, resolve

    small = rows[:2] * 4   # a small set seen many times
    base = load_causal_lm(resolve(str(tiny_lm_dir)))
    tok = load_tokenizer(resolve(str(tiny_lm_dir)))
    before = _eval_loss(base, tok, rows[:2])
    allmods = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    res = train(small, tmp_path / "run", cfg(tiny_lm_dir, epochs=6, lr=5e-2, lora_dropout=0.0,
                                             target_modules=allmods), progress=False)
    model, tok = load_trained(tmp_path / "run")
    after = _eval_loss(model, tok, rows[:2])
    merged, _ = load_trained(tmp_path / "run", merge=True)   # what verify evaluates
    assert not hasattr(merged, "peft_config")
    assert _eval_loss(merged, tok, rows[:2]) == pytest.approx(after, abs=1e-4)
    assert res["complete"] and res["steps"] == 6 * 4
    assert after < before - 0.2
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 24 and np.mean([r["loss"] for r in log[-4:]]) < log[0]["loss"]
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").exists()
    assert json.loads((tmp_path / "run" / "train.json").read_text())["steps"] == 24


def test_checkpoints_at_chosen_steps_and_every_n(tmp_path, tiny_lm_dir, rows):
    res = train(rows, tmp_path / "run", cfg(tiny_lm_dir, epochs=2, save_steps=(1, 5), every=4),
                progress=False)
    # 6 rows / batch 2 = 3 steps per epoch, 6 steps in all
    assert res["total_steps"] == 6
    assert res["checkpoints"] == ["checkpoint-1", "checkpoint-4", "checkpoint-5"]
    for step in (1, 4, 5):
        meta = json.loads((tmp_path / "run" / f"checkpoint-{step}" / "checkpoint.json").read_text())
        assert meta["step"] == step
    model, _ = load_trained(tmp_path / "run" / "checkpoint-4")  # S2L / EL2N load them like this
    assert model.active_adapter == "default"


def test_merged_model_is_saved_and_loads_as_a_plain_model(tmp_path, tiny_lm_dir, rows):
    from thresher.pipeline.models.resolve import load_causal_lm, load_tokenizer, resolve

    train(rows[:2], tmp_path / "run", cfg(tiny_lm_dir, merge=True), progress=False)
    merged = resolve(str(tmp_path / "run" / "merged"))
    plain = load_causal_lm(merged)
    tok = load_tokenizer(merged)
    via_adapter, _ = load_trained(tmp_path / "run")
    assert _eval_loss(plain, tok, rows[:2]) == pytest.approx(_eval_loss(via_adapter, tok, rows[:2]),
                                                             abs=1e-4)


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path, tiny_lm_dir, rows):
    c = cfg(tiny_lm_dir, epochs=2, grad_accum=2, save_steps=(2,))   # 2 steps/epoch, 4 in all
    full = train(rows, tmp_path / "a", c, progress=False)
    part = train(rows, tmp_path / "b", c, stop_after=3, progress=False)   # killed after step 3
    assert not part["complete"] and not (tmp_path / "b" / "adapter").exists()
    resumed = train(rows, tmp_path / "b", c, progress=False)             # resumes from step 2
    assert resumed["complete"] and resumed["steps"] == full["steps"] == 4
    wa = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and len(wa) > 0
    for k in wa:
        np.testing.assert_allclose(wa[k], wb[k], rtol=0, atol=1e-6)
    la = [json.loads(x) for x in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lb] == [1, 2, 3, 4]   # step 3 of the killed run was not kept twice
    np.testing.assert_allclose([r["loss"] for r in la], [r["loss"] for r in lb], atol=1e-6)
    # weights moved at all (otherwise equality would prove nothing)
    first = load_file(tmp_path / "b" / "checkpoint-2" / "adapter_model.safetensors")
    assert any(not np.allclose(first[k], wb[k]) for k in wb)


def test_resume_refuses_checkpoints_of_another_run(tmp_path, tiny_lm_dir, rows):
    train(rows, tmp_path / "r", cfg(tiny_lm_dir, save_steps=(1,)), stop_after=2, progress=False)
    with pytest.raises(ValueError, match="different run"):
        train(rows, tmp_path / "r", cfg(tiny_lm_dir, lr=1e-3), progress=False)


def test_length_grouped_plan_is_a_seeded_partition():
    lengths = np.random.default_rng(0).integers(5, 500, size=320).tolist()   # 2+ megabatches
    a = plan_batches(lengths, 3, seed=1, epoch=0)
    assert sorted(i for b in a for i in b) == list(range(320))
    assert a == plan_batches(lengths, 3, seed=1, epoch=0)
    assert a != plan_batches(lengths, 3, seed=1, epoch=1)
    assert a != plan_batches(lengths, 3, seed=2, epoch=0)
    assert all(lengths[b[0]] >= lengths[b[-1]] for b in a)
    # grouped: the spread of lengths inside a batch is far below that of unsorted batches
    spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in a])
    raw = np.mean([max(lengths[i:i + 3]) - min(lengths[i:i + 3]) for i in range(0, 318, 3)])
    assert spread < raw / 5


def test_train_file_reports_quarantined_rows(tmp_path, tiny_lm_dir, rows):
    f = tmp_path / "subset.jsonl"
    good = [json.dumps({"id": r["id"], "messages": r["messages"]}) for r in rows[:2]]
    f.write_text("\n".join(good + ['{"messages": []}', "not json"]) + "\n")
    res = train_file(f, tmp_path / "run", cfg(tiny_lm_dir), progress=False)
    assert res["quarantined"] == 2 and res["trained_rows"] == 2
    bad = (tmp_path / "run" / "quarantine.jsonl").read_text().splitlines()
    assert len(bad) == 2 and "line 4" in bad[1]
    got, q = load_rows(f)
    assert len(got) == 2 and len(q) == 2


def test_qtuning_hook_reports_each_batch(tmp_path, tiny_lm_dir, sample_pool):
    ids = sample_pool.frame(["id", "source"]).filter(source="gsm8k")["id"].to_list()[:16]
    rows = sample_pool.rows(ids)
    q = QTuningConfig(sample_ratio=0.5, token_ratio=0.5)
    res = train(rows, tmp_path / "q", cfg(tiny_lm_dir, batch_size=8, qtuning=q), progress=False)
    recs = [json.loads(x) for x in (tmp_path / "q" / "qtuning.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all(r["samples"] == 8 for r in recs)
    assert all(r["kept_samples"] >= 4 for r in recs)   # K = round(8 * .5), no truncation above
    s = res["qtuning"]
    assert s["sample_frac"] == sum(r["kept_samples"] for r in recs) / 16
    # per-sample budget: each Q2 sample keeps round(n * .5) (>= 1) of its tokens
    q2_tokens = sum(r["q2_tokens"] for r in recs)
    assert s["q2_tokens"] == q2_tokens and q2_tokens > 0, "no Q2 sample: the token rule went untested"
    assert s["q2_token_frac"] == sum(r["q2_kept_tokens"] for r in recs) / q2_tokens
    assert 0.4 <= s["q2_token_frac"] <= 0.75
    # the step trained on exactly the kept tokens
    log = [json.loads(x) for x in (tmp_path / "q" / "train_log.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in log] == [r["kept_tokens"] for r in recs]


def test_token_mask_file_is_applied(tmp_path, tiny_lm_dir, rows):
    from thresher.pipeline.training.qtuning import write_masks

    masks = tmp_path / "masks.jsonl"
    info = write_masks(rows, masks, str(tiny_lm_dir), QTuningConfig(sample_ratio=0.5), max_tokens=128)
    res = train(rows, tmp_path / "m", cfg(tiny_lm_dir), token_masks=masks, progress=False)
    assert res["trained_rows"] == info["kept_samples"]
    assert res["masked_out_rows"] == len(rows) - info["kept_samples"]
    assert res["no_loss_token_rows"] == 0
    assert res["train_tokens"] == info["kept_tokens"]
    other = tmp_path / "other.jsonl"
    other.write_text(masks.read_text().replace('"input_ids": [', '"input_ids": [7, ', 1))
    with pytest.raises(ValueError, match="input_ids differ"):
        train(rows, tmp_path / "m2", cfg(tiny_lm_dir), token_masks=other, progress=False)


def test_cli_train_and_bad_input(tmp_path, tiny_lm_dir, rows):
    from thresher.pipeline.cli import app
    from typer.testing import CliRunner

    f = tmp_path / "subset.jsonl"
    f.write_text("".join(json.dumps({"id": r["id"], "messages": r["messages"]}) + "\n"
                         for r in rows[:4]))
    runner = CliRunner()
    res = runner.invoke(app, ["train", str(f), "--out", str(tmp_path / "run"), "--model",
                              str(tiny_lm_dir), "--batch-size", "2", "--max-tokens", "128",
                              "--save-steps", "1", "--qtuning", "--sample-ratio", "0.5"])
    assert res.exit_code == 0, res.output
    assert "trained 4 rows, 2 steps" in res.output
    kept = float(re.search(r"Q-Tuning: kept ([0-9.]+) of samples", res.output).group(1))
    assert kept >= 0.5   # at least K = round(2 * .5) per batch of 2; no truncation above K
    assert (tmp_path / "run" / "checkpoint-1").is_dir()
    res = runner.invoke(app, ["train", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "no such file" in res.output
    res = runner.invoke(app, ["train", str(f), "--out", str(tmp_path / "y"), "--model",
                              str(tiny_lm_dir), "--qtuning", "--token-ratio", "1.5"])
    assert res.exit_code == 2 and "token_ratio" in res.output


def test_head_only_on_loss_positions_gives_the_full_logits_loss(tiny_lm_dir, rows):
    import torch
    from peft import LoraConfig, get_peft_model
    from thresher.pipeline.models.engine import _body_and_head
    from thresher.pipeline.models.resolve import load_causal_lm, load_tokenizer, resolve
    from thresher.pipeline.training.batches import collate, make_examples, masked_loss

    tok = load_tokenizer(resolve(str(tiny_lm_dir)))
    torch.manual_seed(0)
    model = get_peft_model(load_causal_lm(resolve(str(tiny_lm_dir))), LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM"))
    torch.nn.init.normal_(model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight)
    ex, _, _ = make_examples(tok, rows[:3], 128)
    ids, att, mask = collate(ex, tok.pad_token_id)
    parts = _body_and_head(model)
    assert parts is not None
    grads = []
    for p in (parts, None):
        model.zero_grad()
        loss = masked_loss(model, p, ids, att, mask)
        loss.backward()
        grads.append((loss.item(), [q.grad.clone() for q in model.parameters() if q.requires_grad]))
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-5)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_packed_batch_gives_the_padded_loss_and_gradients(tiny_lm_dir, rows):
    """Rows packed into one sequence (block-diagonal causal attention) = the padded batch."""
    import torch
    from peft import LoraConfig, get_peft_model
    from thresher.pipeline.models.engine import PACKED_ATTENTION, _body_and_head
    from thresher.pipeline.models.resolve import load_causal_lm, load_tokenizer, resolve
    from thresher.pipeline.training.batches import collate, make_examples, masked_loss, packed_loss

    tok = load_tokenizer(resolve(str(tiny_lm_dir)))
    torch.manual_seed(0)
    model = get_peft_model(load_causal_lm(resolve(str(tiny_lm_dir))), LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM"))
    torch.nn.init.normal_(model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight)
    ex, _, _ = make_examples(tok, rows[:5], 128)
    assert len({len(e.input_ids) for e in ex}) > 1                   # padding would be needed
    parts = _body_and_head(model)
    grads = []
    for packed in (True, False):
        model.zero_grad()
        if packed:
            loss, n = packed_loss(parts, ex, "cpu")
        else:
            ids, att, mask = collate(ex, tok.pad_token_id)
            loss, n = masked_loss(model, parts, ids, att, mask), int(mask[:, 1:].sum())
        loss.backward()
        grads.append((loss.item(), n, [q.grad.clone() for q in model.parameters() if q.requires_grad]))
    assert model.config._attn_implementation != PACKED_ATTENTION
    assert grads[0][1] == grads[1][1] > 0
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-5)
    for a, b in zip(grads[0][2], grads[1][2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_bf16_autocast_follows_the_fp32_loss_curve(tmp_path, tiny_lm_dir, rows):
    low = train(rows, tmp_path / "bf16", cfg(tiny_lm_dir, dtype="bf16"),
                progress=False)
    ref = train(rows, tmp_path / "fp32", cfg(tiny_lm_dir, dtype="fp32"),
                progress=False)
    a = [json.loads(x)["loss"] for x in (tmp_path / "bf16" / "train_log.jsonl").read_text().splitlines()]
    b = [json.loads(x)["loss"] for x in (tmp_path / "fp32" / "train_log.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == low["steps"] == ref["steps"] >= 3
    np.testing.assert_allclose(a, b, rtol=0.02)
    assert a != b                                      # really ran in another precision
