"""The training loop's state and its steps: what a checkpoint saves and a resume restores.

    loop = TrainLoop.start(cfg, out, run_key, resolved, device, total)   # model, optimizer...
    loop.resume(checkpoints(out)[-1])                                     # or start fresh
    stopped = loop.run(examples, tok, stop_after, progress)              # optimizer steps
    loop.save_final(tok)                                                  # OUT/adapter (+ merged)

A checkpoint (`OUT/checkpoint-<step>/`) is the adapter plus `state.json` + `state.safetensors`
(`pipeline/io/safestate.py`: no pickle): optimizer, scheduler, grad scaler, python/numpy/torch
RNG states, epoch and batch position, the log so far, Q-Tuning's reports. The data order is a
pure function of the seed and the epoch (`batches.plan_batches`), so a resumed run reaches the
weights of an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from thresher.pipeline.artifacts import atomic_path
from thresher.pipeline.io.safestate import load_state, save_state
from thresher.pipeline.models.engine import _body_and_head, packing_supported
from thresher.pipeline.training.batches import Example, batch_loss, plan_batches
from thresher.pipeline.training.qtuning import prune_batch, score_tokens

log = logging.getLogger(__name__)

STATE = "state.json"   # + state.safetensors (pipeline/io/safestate.py)


def set_seed(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> dict:
    import torch

    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    import torch

    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def rewrite_jsonl(path: Path, records: list[dict]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))


@dataclass
class TrainLoop:
    """One run's model, optimizer and position; `run` takes optimizer steps until done."""

    cfg: Any                     # TrainConfig
    out: Path
    run_key: str
    identity: str                # the base model's
    device: str
    total: int                   # optimizer steps of the whole run
    model: Any
    opt: Any
    sched: Any
    scaler: Any
    amp_dtype: Any
    step: int = 0
    epoch: int = 0
    pos: int = 0                 # batches of the current epoch already taken
    history: list = field(default_factory=list)
    qt_reports: list = field(default_factory=list)

    @classmethod
    def start(cls, cfg, out: Path, run_key: str, resolved, device: str, total: int,
              amp: tuple) -> TrainLoop:
        """A fresh LoRA adapter on the base model, AdamW and a cosine schedule with warmup."""
        import torch
        from peft import LoraConfig, get_peft_model
        from thresher.pipeline.models.resolve import load_causal_lm
        from transformers import get_cosine_schedule_with_warmup

        set_seed(cfg.seed)
        model = load_causal_lm(resolved, device, dtype=torch.float32)
        model = get_peft_model(model, LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.target_modules), task_type="CAUSAL_LM"))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = get_cosine_schedule_with_warmup(opt, round(cfg.warmup_ratio * total), total)
        scaler = torch.amp.GradScaler(device.split(":")[0], enabled=amp[1])
        return cls(cfg, out, run_key, resolved.identity, device, total, model, opt, sched,
                   scaler, amp[0])

    def resume(self, ckpt: Path) -> None:
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        state = load_state(ckpt, Path(STATE).stem)
        if state["run_key"] != self.run_key:
            raise ValueError(f"{self.out} holds checkpoints of a different run (other data, "
                             "model or settings); use another --out or resume=False")
        set_peft_model_state_dict(self.model, load_peft_weights(str(ckpt), device=self.device))
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.step, self.epoch, self.pos = state["step"], state["epoch"], state["pos"]
        self.history, self.qt_reports = state["history"], state["qtuning"]
        log.info("resuming from %s (step %d of %d)", ckpt.name, self.step, self.total)

    def save_checkpoint(self) -> None:
        with atomic_path(self.out / f"checkpoint-{self.step}") as tmp:
            self.model.save_pretrained(tmp)
            save_state(tmp, Path(STATE).stem, {
                "run_key": self.run_key, "step": self.step, "epoch": self.epoch,
                "pos": self.pos, "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": rng_state(), "history": self.history, "qtuning": self.qt_reports,
                "config": asdict(self.cfg), "model": self.identity})
            (tmp / "checkpoint.json").write_text(json.dumps(
                {"step": self.step, "model": self.cfg.model, "model_identity": self.identity}) + "\n")

    def run(self, examples: list[Example], tok, stop_after: int | None, progress: bool) -> bool:
        """Optimizer steps until the run's total (or `stop_after`); True when stopped early."""
        from tqdm import tqdm

        rewrite_jsonl(self.out / "train_log.jsonl", self.history)
        if self.cfg.qtuning:
            rewrite_jsonl(self.out / "qtuning.jsonl", self.qt_reports)
        parts = _body_and_head(self.model)
        pack = self.device.startswith("cpu") and parts is not None and packing_supported(parts[0])
        lengths = [len(e.input_ids) for e in examples]
        self.model.train()
        bar = tqdm(total=self.total, initial=self.step, desc="train", unit="step",
                   disable=not progress)
        stopped = False
        while self.step < self.total and not stopped:
            batches = plan_batches(lengths, self.cfg.batch_size, self.cfg.seed, self.epoch)
            while self.pos < len(batches) and self.step < self.total:
                group = batches[self.pos:self.pos + self.cfg.grad_accum]
                rec = self._optimizer_step([[examples[i] for i in idx] for idx in group], tok,
                                           parts, pack, len(batches))
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.4f}")
                if self.step in self.cfg.save_steps or (self.cfg.every and self.step % self.cfg.every == 0):
                    self.save_checkpoint()
                stopped = stop_after is not None and stop_after <= self.step < self.total
                if stopped or self.pos == 0:
                    break
        bar.close()
        return stopped

    def _optimizer_step(self, group: list[list[Example]], tok, parts, pack: bool,
                        n_batches: int) -> dict:
        """Forward and backward over the micro-batches of one step, then the optimizer step;
        returns (and logs) the step's record."""
        import torch

        loss_sum, tokens = 0.0, 0
        for batch in group:
            if self.cfg.qtuning:
                batch = self._qtuning(batch, tok)
                if not any(e.loss_mask.any() for e in batch):
                    continue
            with torch.autocast(self.device.split(":")[0], dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                loss, n_tok = batch_loss(self.model, parts, pack, batch, tok.pad_token_id,
                                         self.device)
            self.scaler.scale(loss / len(group)).backward()
            loss_sum += loss.item()
            tokens += n_tok
        self.scaler.unscale_(self.opt)
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        lr = self.sched.get_last_lr()[0]
        self.sched.step()
        self.pos += len(group)
        self.step += 1
        rec = {"step": self.step, "epoch": round(self.epoch + self.pos / n_batches, 4),
               "loss": loss_sum / len(group), "lr": lr, "grad_norm": float(grad_norm),
               "tokens": tokens}
        if self.pos >= n_batches:  # epoch done; the next one gets a fresh order
            self.epoch, self.pos = self.epoch + 1, 0
        self.history.append(rec)
        with open(self.out / "train_log.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        return rec

    def _qtuning(self, batch: list[Example], tok) -> list[Example]:
        """Score the micro-batch with a no-grad eval-mode pass (the forward engine), keep Q2/Q4
        and prune Q2 tokens; returns the kept examples with their new loss masks."""
        qcfg = self.cfg.qtuning
        nll, ent, loss_mask, att = score_tokens(self.model, tok, batch, qcfg.entropy_over)
        res = prune_batch(nll, ent, loss_mask, att, qcfg)
        rec = {"step": self.step + 1, "micro": len(self.qt_reports), **res.report}
        self.qt_reports.append(rec)
        with open(self.out / "qtuning.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        log.info("qtuning step %d: kept %d/%d samples, %d/%d tokens", rec["step"],
                 rec["kept_samples"], rec["samples"], rec["kept_tokens"], rec["label_tokens"])
        return [Example(e.id, e.input_ids, res.loss_mask[i, :len(e.input_ids)].copy())
                for i, e in enumerate(batch) if res.keep[i]]

    def save_final(self, tok) -> None:
        """OUT/adapter (the peft adapter + tokenizer), and OUT/merged with `merge`."""
        with atomic_path(self.out / "adapter") as tmp:
            self.model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        if self.cfg.merge:
            merged = self.model.merge_and_unload()
            with atomic_path(self.out / "merged") as tmp:
                merged.save_pretrained(tmp, safe_serialization=True)
                tok.save_pretrained(tmp)
