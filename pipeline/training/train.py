"""A small LoRA trainer (peft) for any causal LM `models.resolve` accepts, readable in one sitting.

    cfg = TrainConfig(model="smollm2-135m-instruct", epochs=1, save_steps=(2, 4))
    result = train_file("subset.jsonl", "runs/a", cfg)      # or train(rows, out, cfg)
    model, tok = load_trained("runs/a")                     # base + adapter, ready to evaluate

What it does: rows -> `chat.encode` (response-only loss mask) -> length-grouped batches
(HF-style megabatches of 50 x batch size, sorted by length, from a seeded permutation per
epoch) -> AdamW + cosine schedule with warmup, gradient accumulation, gradient clipping,
bf16/fp16 autocast on GPU and bf16 autocast on CPUs with native bf16 (else fp32; `dtype=` to
choose), rows packed into one unpadded sequence per batch on a CPU (block-diagonal causal
attention, as the forward engine), the LM head only on loss positions, per-token loss masks that
Q-Tuning (`scoring/qtuning.py`, `qtuning=QTuningConfig(...)`) or an offline mask file may zero.

Checkpoints: `OUT/checkpoint-<step>/` holds the adapter plus `state.json` + `state.safetensors`
(`pipeline/io/safestate.py`: no pickle; optimizer, scheduler, grad scaler, python/numpy/torch RNG
states, epoch and batch position, the log so far). They are
written atomically at `save_steps` and every `every` steps; a rerun with `resume=True` continues
from the newest one and reaches the same weights as an uninterrupted run. S2L trajectories and
EL2N's early-checkpoint scores load them with `load_trained(OUT / "checkpoint-<step>")`.

Outputs: `OUT/adapter/` (peft adapter + tokenizer), `OUT/merged/` with `merge=True`,
`OUT/train.json` (config, counts, losses, timings), `OUT/train_log.jsonl` (one line per
optimizer step) and, with Q-Tuning, `OUT/qtuning.jsonl` (one line per micro-batch).
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from thresher.pipeline.artifacts import atomic_path, config_key, write_json_atomic
from thresher.pipeline.io.pool import load_rows
from thresher.pipeline.io.safestate import load_state, save_state
from thresher.pipeline.models.chat import encode
from thresher.pipeline.models.engine import _body_and_head, packing_supported
from thresher.pipeline.models.resolve import DEFAULT_LM
from thresher.scoring.qtuning import QTuningConfig, prune_batch, read_masks, score_tokens, summarize

log = logging.getLogger(__name__)

STATE = "state.json"   # + state.safetensors (pipeline/io/safestate.py)
# what a run writes into OUT (an existing folder holding these is refused unless it is a run's)
RUN_FILES = ("adapter", "merged", "train.json", "train_log.jsonl", "qtuning.jsonl",
             "quarantine.jsonl", "checkpoint-*")
OLD_STATE = "state.pt"  # pickled by thresher before safestate; never loaded
MEGABATCH = 50


@dataclass
class TrainConfig:
    model: str = DEFAULT_LM
    epochs: int = 1
    max_steps: int | None = None          # overrides epochs when set
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    batch_size: int = 8                   # micro-batch; also Q-Tuning's EU-plane batch
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    max_tokens: int = 512
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    seed: int = 0
    save_steps: tuple[int, ...] = ()
    every: int = 0                        # also checkpoint every N steps (0 = off)
    device: str | None = None             # auto: cuda when present
    dtype: str | None = None              # auto: bf16 (or fp16) autocast on GPU; on CPU bf16 where
                                          # the CPU has native bf16 instructions, else fp32
    merge: bool = False                   # also save base + adapter merged
    qtuning: QTuningConfig | None = None

    def __post_init__(self):
        if isinstance(self.qtuning, dict):
            self.qtuning = QTuningConfig(**self.qtuning)
        self.save_steps = tuple(sorted(int(s) for s in self.save_steps))
        self.target_modules = tuple(self.target_modules)
        for name in ("epochs", "batch_size", "grad_accum", "max_tokens", "lora_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"train {name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"train lr must be > 0, got {self.lr}")

    def identity(self) -> dict:
        """The settings that determine the weights (not where or when checkpoints are saved)."""
        d = asdict(self)
        for k in ("save_steps", "every", "merge", "device"):
            d.pop(k)
        return d


# ---------------------------------------------------------------- input

@dataclass
class Example:
    id: str
    input_ids: np.ndarray
    loss_mask: np.ndarray


def make_examples(tok, rows: list[dict], max_tokens: int,
                  token_masks: dict | None = None) -> tuple[list[Example], list[str], int]:
    """Encoded rows; the ids left with no loss token within max_tokens (long prompts); and how
    many rows a token-mask file drops whole (Q-Tuning's dropped samples), also left out."""
    out, empty, masked_out = [], [], 0
    for r in rows:
        e = encode(tok, r, max_tokens)
        mask = e.loss_mask
        if token_masks is not None:
            if r["id"] not in token_masks:
                raise KeyError(f"token-mask file has no entry for row {r['id']!r}")
            ids, keep = token_masks[r["id"]]
            if len(ids) != len(e.input_ids) or not np.array_equal(ids, e.input_ids):
                raise ValueError(f"row {r['id']!r}: token-mask file was made with another "
                                 "tokenizer or max_tokens (input_ids differ)")
            if e.loss_mask.any() and not (mask & keep).any():
                masked_out += 1
                continue
            mask = mask & keep
        if mask.any():
            out.append(Example(r["id"], e.input_ids, mask))
        else:
            empty.append(r["id"])
    return out, empty, masked_out


def plan_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Length-grouped batches: a seeded permutation cut into megabatches of 50 batches, each
    sorted by length (longest first) and cut into batches (HF's LengthGroupedSampler), then the
    batch order shuffled. A pure function of its arguments, so the data order after a resume is
    the order of the uninterrupted run."""
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(lengths))
    mega = batch_size * MEGABATCH
    batches = []
    for s in range(0, len(perm), mega):
        chunk = sorted(perm[s:s + mega].tolist(), key=lambda i: -lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def collate(examples: list[Example], pad_id: int):
    import torch

    L = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), L), pad_id, dtype=torch.long)
    att = torch.zeros((len(examples), L), dtype=torch.long)
    mask = torch.zeros((len(examples), L), dtype=torch.bool)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.from_numpy(e.input_ids)
        att[i, :n] = 1
        mask[i, :n] = torch.from_numpy(e.loss_mask)
    return ids, att, mask


def masked_loss(model, parts, ids, att, mask):
    """Mean cross-entropy over the masked positions (position t scores token t).

    When the logits are exactly head(final hidden state) (`engine._body_and_head`), the LM head
    runs only on the positions that predict a loss token, as in the forward engine: prompt
    positions never reach the vocabulary projection (less compute, no [B, T, V] logits)."""
    import torch.nn.functional as F

    loss_mask = mask[:, 1:]
    if parts is not None:
        body, head = parts
        hidden = body(input_ids=ids, attention_mask=att, use_cache=False).last_hidden_state
        logits = head(hidden[:, :-1][loss_mask])
    else:
        logits = model(input_ids=ids, attention_mask=att, use_cache=False).logits[:, :-1][loss_mask]
    return F.cross_entropy(logits.float(), ids[:, 1:][loss_mask])


def packed_loss(parts, batch: list[Example], device):
    """`masked_loss` of a batch packed into one unpadded sequence: position ids restart at every
    row and attention stays inside each row (the forward engine's `_packed_attention`), so each
    row sees what it sees alone; no padding tokens go through the body. Returns (loss, tokens)."""
    import torch
    import torch.nn.functional as F
    from thresher.pipeline.models.engine import _PackedAttention

    body, head = parts
    lengths = np.array([len(e.input_ids) for e in batch])
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    lm = np.concatenate([e.loss_mask for e in batch])
    lm[bounds[:-1]] = False                           # a row's first token has no prediction
    ids = torch.from_numpy(np.concatenate([e.input_ids for e in batch])).to(device)
    pos = torch.from_numpy(np.concatenate([np.arange(n) for n in lengths])).to(device)
    sel = torch.from_numpy(lm[1:]).to(device)
    with _PackedAttention(body):
        hidden = body(input_ids=ids[None], position_ids=pos[None], use_cache=False,
                      thresher_bounds=bounds.tolist()).last_hidden_state[0]
    logits = head(hidden[:-1][sel])
    return F.cross_entropy(logits.float(), ids[1:][sel]), int(sel.sum())


# ---------------------------------------------------------------- state

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


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints under `out`, oldest first."""
    found = [p for p in Path(out).glob("checkpoint-*") if (p / STATE).exists()]
    old = [p for p in Path(out).glob("checkpoint-*") if (p / OLD_STATE).exists() and p not in found]
    if old:
        raise ValueError(f"{old[0]}: a checkpoint from an older thresher (pickled {OLD_STATE}, "
                         "which is never loaded); resume with --fresh or use another --out")
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _amp(device: str, requested: str | None):
    """(autocast dtype or None, use a grad scaler)."""
    import torch
    from thresher.pipeline.models.resolve import pick_dtype

    if requested in (None, "auto") and device.startswith("cpu"):
        from thresher.pipeline.models.engine import engine_dtype

        dt = engine_dtype(device)   # bf16 autocast on CPUs with native bf16 (bench/RESULTS.md)
    else:
        dt = pick_dtype(device, requested)
    if dt == torch.float32:
        return None, False
    if dt == torch.float16 and not device.startswith("cuda"):
        raise ValueError("fp16 autocast needs a GPU; use bf16 or fp32 on CPU")
    return dt, dt == torch.float16


# ---------------------------------------------------------------- training

def train(rows: list[dict], out: Path | str, cfg: TrainConfig | None = None, resume: bool = True,
          stop_after: int | None = None, token_masks: Path | str | None = None,
          progress: bool = True, extra_info: dict | None = None) -> dict:
    """Train a LoRA adapter on `rows`; returns the summary also written to OUT/train.json.

    `stop_after=k` stops right after optimizer step k without the final save, as a killed run
    would (for tests and time-boxed runs); a later call with `resume=True` continues.
    """
    import torch
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from peft.utils import load_peft_weights
    from thresher.pipeline.models.resolve import (
        load_causal_lm,
        load_tokenizer,
        pick_device,
        resolve,
    )
    from tqdm import tqdm
    from transformers import get_cosine_schedule_with_warmup

    cfg = cfg or TrainConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    resolved = resolve(cfg.model)
    device = pick_device(cfg.device)
    amp_dtype, use_scaler = _amp(device, cfg.dtype)

    tok = load_tokenizer(resolved)
    masks = read_masks(Path(token_masks)) if token_masks else None
    examples, empty, masked_out = make_examples(tok, rows, cfg.max_tokens, masks)
    if empty:
        log.warning("%d rows have no loss token within %d tokens and are not trained on, e.g. %s",
                    len(empty), cfg.max_tokens, empty[:3])
    if not examples:
        raise ValueError(f"no row has a loss token within max_tokens={cfg.max_tokens}")
    lengths = [len(e.input_ids) for e in examples]
    n_batches = math.ceil(len(examples) / cfg.batch_size)
    steps_per_epoch = math.ceil(n_batches / cfg.grad_accum)
    total = cfg.max_steps or steps_per_epoch * cfg.epochs
    data_key = config_key([e.id for e in examples], [int(e.loss_mask.sum()) for e in examples])
    run_key = config_key(cfg.identity(), resolved.identity, data_key)

    if resume and (out / "train.json").exists() and (out / "adapter").is_dir():
        done = json.loads((out / "train.json").read_text())
        if done.get("run_key") == run_key:
            log.info("%s already holds this finished run; not training again", out)
            return done
        raise ValueError(f"{out} holds a finished run with other data, model or settings; "
                         "use another --out or resume=False")
    if not resume:
        for old in ("adapter", "merged"):
            shutil.rmtree(out / old, ignore_errors=True)
        (out / "train.json").unlink(missing_ok=True)

    set_seed(cfg.seed)
    model = load_causal_lm(resolved, device, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules), task_type="CAUSAL_LM"))
    parts = _body_and_head(model)
    pack = device.startswith("cpu") and parts is not None and packing_supported(parts[0])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, round(cfg.warmup_ratio * total), total)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=use_scaler)

    step, epoch, pos, history, qt_reports = 0, 0, 0, [], []
    ckpts = checkpoints(out) if resume else []
    if not resume:
        for p in Path(out).glob("checkpoint-*"):
            shutil.rmtree(p)
    if ckpts:
        state = load_state(ckpts[-1], Path(STATE).stem)
        if state["run_key"] != run_key:
            raise ValueError(f"{out} holds checkpoints of a different run (other data, model or "
                             "settings); use another --out or resume=False")
        set_peft_model_state_dict(model, load_peft_weights(str(ckpts[-1]), device=device))
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        step, epoch, pos = state["step"], state["epoch"], state["pos"]
        history, qt_reports = state["history"], state["qtuning"]
        log.info("resuming from %s (step %d of %d)", ckpts[-1].name, step, total)
    _rewrite_jsonl(out / "train_log.jsonl", history)
    if cfg.qtuning:
        _rewrite_jsonl(out / "qtuning.jsonl", qt_reports)

    def save_checkpoint() -> None:
        with atomic_path(out / f"checkpoint-{step}") as tmp:
            model.save_pretrained(tmp)
            save_state(tmp, Path(STATE).stem, {
                "run_key": run_key, "step": step, "epoch": epoch, "pos": pos,
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict(), "rng": rng_state(), "history": history,
                "qtuning": qt_reports, "config": asdict(cfg), "model": resolved.identity})
            (tmp / "checkpoint.json").write_text(json.dumps(
                {"step": step, "model": cfg.model, "model_identity": resolved.identity}) + "\n")

    model.train()
    bar = tqdm(total=total, initial=step, desc="train", unit="step", disable=not progress)
    stopped = False
    while step < total and not stopped:
        batches = plan_batches(lengths, cfg.batch_size, cfg.seed, epoch)
        while pos < len(batches) and step < total:
            group = batches[pos:pos + cfg.grad_accum]
            loss_sum, tokens = 0.0, 0
            for idx in group:
                batch = [examples[i] for i in idx]
                if cfg.qtuning:
                    batch = _qtuning_step(model, tok, batch, cfg.qtuning, device, qt_reports,
                                          step, out)
                    if not any(e.loss_mask.any() for e in batch):
                        continue
                with torch.autocast(device.split(":")[0], dtype=amp_dtype or torch.float32,
                                    enabled=amp_dtype is not None):
                    loss, n_tok = _batch_loss(model, parts, pack, batch, tok.pad_token_id, device)
                scaler.scale(loss / len(group)).backward()
                loss_sum += loss.item()
                tokens += n_tok
            scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            lr = sched.get_last_lr()[0]
            sched.step()
            pos += len(group)
            step += 1
            rec = {"step": step, "epoch": round(epoch + pos / len(batches), 4),
                   "loss": loss_sum / len(group), "lr": lr, "grad_norm": float(grad_norm),
                   "tokens": tokens}
            if pos >= len(batches):  # epoch done; the next one gets a fresh order
                epoch, pos = epoch + 1, 0
            history.append(rec)
            with open(out / "train_log.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            if step in cfg.save_steps or (cfg.every and step % cfg.every == 0):
                save_checkpoint()
            if stop_after is not None and step >= stop_after and step < total:
                stopped = True
            if stopped or pos == 0:
                break
    bar.close()

    summary = {
        "out": str(out), "model": cfg.model, "model_identity": resolved.identity, "run_key": run_key,
        "config": asdict(cfg), "rows": len(rows), "trained_rows": len(examples),
        "no_loss_token_rows": len(empty), "no_loss_token_ids": empty[:20], "masked_out_rows": masked_out, "steps": step, "total_steps": total,
        "train_tokens": int(sum(int(e.loss_mask.sum()) for e in examples)),
        "first_loss": history[0]["loss"] if history else None,
        "final_loss": history[-1]["loss"] if history else None,
        "checkpoints": [p.name for p in checkpoints(out)], "device": device,
        "seconds": round(time.perf_counter() - t0, 2), "complete": not stopped,
        **(extra_info or {}),
    }
    if cfg.qtuning:
        summary["qtuning"] = summarize(qt_reports)
    if stopped:
        return summary
    with atomic_path(out / "adapter") as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    if cfg.merge:
        merged = model.merge_and_unload()
        with atomic_path(out / "merged") as tmp:
            merged.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    write_json_atomic(out / "train.json", summary)
    return summary


def _batch_loss(model, parts, pack: bool, batch: list[Example], pad_id: int, device):
    """(mean loss over the batch's loss tokens, their count): packed rows on a CPU (no padding,
    `packed_loss`), padded batches elsewhere (`masked_loss`)."""
    if pack:
        return packed_loss(parts, batch, device)
    ids, att, mask = (t.to(device) for t in collate(batch, pad_id))
    return masked_loss(model, parts, ids, att, mask), int(mask[:, 1:].sum())


def _qtuning_step(model, tok, batch: list[Example], qcfg, device, reports, step, out):
    """Score the micro-batch with a no-grad eval-mode pass (the forward engine), keep Q2/Q4 and
    prune Q2 tokens; returns the kept examples with their new loss masks."""
    nll, ent, loss_mask, att = score_tokens(model, tok, batch, qcfg.entropy_over)
    res = prune_batch(nll, ent, loss_mask, att, qcfg)
    rec = {"step": step + 1, "micro": len(reports), **res.report}
    reports.append(rec)
    with open(out / "qtuning.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
    log.info("qtuning step %d: kept %d/%d samples, %d/%d tokens", rec["step"],
             rec["kept_samples"], rec["samples"], rec["kept_tokens"], rec["label_tokens"])
    return [Example(e.id, e.input_ids, res.loss_mask[i, :len(e.input_ids)].copy())
            for i, e in enumerate(batch) if res.keep[i]]


def _rewrite_jsonl(path: Path, records: list[dict]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))


def train_file(subset: Path | str, out: Path | str, cfg: TrainConfig | None = None,
               **kwargs) -> dict:
    """`train` on a file (any reader format) or pool directory; quarantined rows are counted in
    the summary and listed in OUT/quarantine.jsonl. OUT passes the output guard (never an input,
    never in a pool or a cache, no file of another's replaced: pipeline/io/guard.py), and one
    run at a time writes it (a second is refused)."""
    from thresher.pipeline.io.guard import check_outputs, check_writes_into
    from thresher.pipeline.io.outputs import output_lock

    out = Path(out)
    inputs = [Path(subset)] + ([Path(kwargs["token_masks"])] if kwargs.get("token_masks") else [])
    check_outputs([out / n for n in RUN_FILES if n.endswith((".json", ".jsonl"))], inputs,
                  [out / "adapter", out / "merged"])
    check_writes_into(out, RUN_FILES, ("train.json", "train_log.jsonl"))
    rows, bad = load_rows(subset)
    out.mkdir(parents=True, exist_ok=True)
    with output_lock(out, wait=False):
        if bad:
            _rewrite_jsonl(out / "quarantine.jsonl", bad)
            log.warning("%s: %d rows quarantined (see %s)", subset, len(bad), out / "quarantine.jsonl")
        return train(rows, out, cfg, extra_info={"subset": str(subset), "quarantined": len(bad)},
                     **kwargs)


def load_trained(path: Path | str, device: str | None = None, merge: bool = False):
    """(model, tokenizer): the base model of a run with its adapter, in eval mode. `path` is a
    run directory (uses OUT/adapter) or one of its checkpoints. `merge=True` folds the adapter
    into the base weights (as fast as the base model for evaluation and generation)."""
    import torch
    from peft import PeftModel
    from thresher.pipeline.models.resolve import (
        load_causal_lm,
        load_tokenizer,
        pick_device,
        resolve,
    )

    path = Path(path)
    adapter = path / "adapter" if (path / "adapter").is_dir() else path
    meta = adapter / "checkpoint.json" if (adapter / "checkpoint.json").exists() else path / "train.json"
    if not (adapter / "adapter_config.json").exists() or not meta.exists():
        raise FileNotFoundError(f"{path}: not a finished training run or checkpoint")
    resolved = resolve(json.loads(meta.read_text())["model"])
    device = pick_device(device)
    base = load_causal_lm(resolved, device, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter)).to(device).eval()
    if merge:
        model = model.merge_and_unload().eval()
    return model, load_tokenizer(resolved)
