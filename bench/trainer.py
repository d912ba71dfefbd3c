"""LoRA training throughput: thresher's trainer against a plain peft + transformers loop.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/trainer.py [--rows 16] [--max-tokens 256] \
        [--batch 8] [--repeats 2] [--device cpu]

Same model (SmolLM2-135M-Instruct), rows (the forward bench's seeded mix of the shared data),
LoRA settings (r 8, alpha 16, dropout 0.05, q/k/v/o), batch size, max tokens, AdamW lr 2e-4 with
the same cosine schedule, gradient clipping 1.0, one epoch, response-only loss (`chat.encode`):
  plain     the loop one writes from the peft / transformers docs: shuffled batches padded to
            their longest row, `model(input_ids, attention_mask, labels)` (labels -100 off the
            loss mask), full logits, float32 (transformers' CPU default) or bf16 autocast on GPU;
  thresher  `pipeline.train.train` with its defaults: length-grouped batches, rows packed into
            one unpadded sequence per batch (CPU), LM head on loss positions only, bf16 autocast
            where the device has native bf16;
  thresher fp32  the same with dtype=fp32: its per-step losses against the bf16 run show the
            bf16 loss curve follows float32.
Runs alternate over `--repeats`; both include loading the model. tokens/s counts every real
(non-padding) token of every row once per epoch; the ratio is the median of per-repeat ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from forward_throughput import load_rows
from thresher.pipeline.models.chat import encode
from thresher.pipeline.models.resolve import (
    DEFAULT_LM,
    load_causal_lm,
    load_tokenizer,
    pick_device,
    resolve,
)
from thresher.pipeline.training.train import TrainConfig, train


def plain_loop(rows, cfg: TrainConfig, device: str) -> list[float]:
    """A plain peft + transformers training loop; returns the per-step losses."""
    from peft import LoraConfig, get_peft_model
    from transformers import get_cosine_schedule_with_warmup

    m = resolve(cfg.model)
    tok = load_tokenizer(m)
    torch.manual_seed(cfg.seed)
    model = get_peft_model(load_causal_lm(m, device, torch.float32), LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules), task_type="CAUSAL_LM"))
    encs = [encode(tok, r, cfg.max_tokens) for r in rows]
    encs = [e for e in encs if e.loss_mask.any()]
    order = np.random.default_rng(cfg.seed).permutation(len(encs))
    batches = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    sched = get_cosine_schedule_with_warmup(opt, round(cfg.warmup_ratio * len(batches)), len(batches))
    amp = torch.bfloat16 if device.startswith("cuda") else None
    model.train()
    losses = []
    for b in batches:
        L = max(len(encs[i].input_ids) for i in b)
        ids = torch.full((len(b), L), tok.pad_token_id, dtype=torch.long)
        att = torch.zeros((len(b), L), dtype=torch.long)
        labels = torch.full((len(b), L), -100, dtype=torch.long)
        for j, i in enumerate(b):
            e, n = encs[i], len(encs[i].input_ids)
            ids[j, :n], att[j, :n] = torch.from_numpy(e.input_ids), 1
            labels[j, :n][torch.from_numpy(e.loss_mask)] = ids[j, :n][torch.from_numpy(e.loss_mask)]
        with torch.autocast(device.split(":")[0], dtype=amp or torch.float32, enabled=amp is not None):
            loss = model(input_ids=ids.to(device), attention_mask=att.to(device),
                         labels=labels.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    device = pick_device(args.device)
    rows = load_rows(args.rows)
    tok = load_tokenizer(resolve(DEFAULT_LM))
    encs = [encode(tok, r, args.max_tokens) for r in rows]
    n_tok = sum(len(e.input_ids) for e in encs if e.loss_mask.any())
    cfg = TrainConfig(model=DEFAULT_LM, batch_size=args.batch, max_tokens=args.max_tokens, seed=0)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, device {device}, torch "
          f"{torch.__version__}, threads {torch.get_num_threads()}, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY')}; {len(rows)} rows, {n_tok} tokens, batch "
          f"{args.batch}, {math.ceil(len(rows) / args.batch)} steps")
    times: dict[str, list[float]] = {"plain": [], "thresher": [], "thresher fp32": []}
    curves = {}
    with tempfile.TemporaryDirectory() as d:
        for r in range(args.repeats):
            t = time.perf_counter()
            curves["plain"] = plain_loop(rows, cfg, device)
            times["plain"].append(time.perf_counter() - t)
            for name, dtype in (("thresher", None), ("thresher fp32", "fp32")):
                c = TrainConfig(**{**cfg.__dict__, "dtype": dtype, "save_steps": ()})
                t = time.perf_counter()
                train(rows, Path(d) / f"{name}{r}", c, resume=False, progress=False)
                times[name].append(time.perf_counter() - t)
                curves[name] = [json.loads(x)["loss"] for x in
                                (Path(d) / f"{name}{r}" / "train_log.jsonl").read_text().splitlines()]
            print(f"repeat {r + 1}: " + ", ".join(f"{k} {n_tok / v[-1]:.0f} tok/s" for k, v in times.items()))
    ratio = float(np.median([p / t for p, t in zip(times["plain"], times["thresher"])]))
    ratio32 = float(np.median([p / t for p, t in zip(times["plain"], times["thresher fp32"])]))
    for k, v in times.items():
        print(f"{k:<14} {n_tok / np.median(v):7.0f} tok/s  ({np.median(v):.1f} s median)  "
              f"losses {[round(x, 3) for x in curves[k]]}")
    gap = max(abs(a - b) / b for a, b in zip(curves["thresher"], curves["thresher fp32"]))
    print(f"thresher vs plain loop: x{ratio:.2f} tokens/s (target >= 1.5); thresher fp32 vs "
          f"plain: x{ratio32:.2f}; bf16 vs fp32 step losses: max relative gap {gap:.3%}")
    print(json.dumps({"rows": len(rows), "tokens": n_tok, "device": device,
                      "seconds": {k: [round(x, 1) for x in v] for k, v in times.items()},
                      "ratio": round(ratio, 3), "ratio_fp32": round(ratio32, 3),
                      "bf16_fp32_max_rel_gap": round(gap, 5)}))


if __name__ == "__main__":
    main()
