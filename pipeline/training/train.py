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
Q-Tuning (`pipeline/training/qtuning.py`, `qtuning=QTuningConfig(...)`) or an offline mask file may zero.

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
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from thresher.pipeline.artifacts import config_key, write_json_atomic
from thresher.pipeline.io.pool import load_rows
from thresher.pipeline.models.resolve import DEFAULT_LM
from thresher.pipeline.training.batches import make_examples
from thresher.pipeline.training.loop import STATE, TrainLoop, rewrite_jsonl
from thresher.pipeline.training.qtuning import QTuningConfig, read_masks, summarize

log = logging.getLogger(__name__)

# what a run writes into OUT (an existing folder holding these is refused unless it is a run's)
RUN_FILES = ("adapter", "merged", "train.json", "train_log.jsonl", "qtuning.jsonl",
             "quarantine.jsonl", "checkpoint-*")
OLD_STATE = "state.pt"  # pickled by thresher before safestate; never loaded


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


# ---------------------------------------------------------------- checkpoints

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
    from thresher.pipeline.models.resolve import load_tokenizer, pick_device, resolve

    cfg = cfg or TrainConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    resolved, device = resolve(cfg.model), pick_device(cfg.device)
    tok = load_tokenizer(resolved)
    masks = read_masks(Path(token_masks)) if token_masks else None
    examples, empty, masked_out = make_examples(tok, rows, cfg.max_tokens, masks)
    if empty:
        log.warning("%d rows have no loss token within %d tokens and are not trained on, e.g. %s",
                    len(empty), cfg.max_tokens, empty[:3])
    if not examples:
        raise ValueError(f"no row has a loss token within max_tokens={cfg.max_tokens}")
    steps_per_epoch = math.ceil(math.ceil(len(examples) / cfg.batch_size) / cfg.grad_accum)
    total = cfg.max_steps or steps_per_epoch * cfg.epochs
    data_key = config_key([e.id for e in examples], [int(e.loss_mask.sum()) for e in examples])
    run_key = config_key(cfg.identity(), resolved.identity, data_key)
    finished = _previous_run(out, resume, run_key)
    if finished is not None:
        return finished

    loop = TrainLoop.start(cfg, out, run_key, resolved, device, total, _amp(device, cfg.dtype))
    ckpts = checkpoints(out) if resume else []
    if ckpts:
        loop.resume(ckpts[-1])
    stopped = loop.run(examples, tok, stop_after, progress)
    summary = {
        "out": str(out), "model": cfg.model, "model_identity": resolved.identity,
        "run_key": run_key, "config": asdict(cfg), "rows": len(rows),
        "trained_rows": len(examples), "no_loss_token_rows": len(empty),
        "no_loss_token_ids": empty[:20], "masked_out_rows": masked_out, "steps": loop.step,
        "total_steps": total, "train_tokens": int(sum(int(e.loss_mask.sum()) for e in examples)),
        "first_loss": loop.history[0]["loss"] if loop.history else None,
        "final_loss": loop.history[-1]["loss"] if loop.history else None,
        "checkpoints": [p.name for p in checkpoints(out)], "device": device,
        "seconds": round(time.perf_counter() - t0, 2), "complete": not stopped,
        **(extra_info or {}),
    }
    if cfg.qtuning:
        summary["qtuning"] = summarize(loop.qt_reports)
    if stopped:
        return summary
    loop.save_final(tok)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    write_json_atomic(out / "train.json", summary)
    return summary


def _previous_run(out: Path, resume: bool, run_key: str) -> dict | None:
    """The summary of this very run when OUT already holds it finished; with `resume=False`
    OUT's earlier adapter, checkpoints and summary are cleared instead."""
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
        for p in out.glob("checkpoint-*"):
            shutil.rmtree(p)
    return None


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
            rewrite_jsonl(out / "quarantine.jsonl", bad)
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
