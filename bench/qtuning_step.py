"""Training time of dynamic Q-Tuning (two-pass) against plain LoRA training on the same batches.

Runs `pipeline/training/train.py` on the same rows, model, batch size and number of steps three ways,
alternating, and prints seconds and ratios:
    plain      forward + backward on every sample of each batch (the baseline; this is also
               what the released Q-Tuning code costs, since it scores from the training
               forward and masks the loss of dropped samples)
    qtuning    thresher's two-pass variant: a no-grad scoring pass over the batch, then forward
               + backward on the kept samples only (r_sample 0.25, r_token 0.5)

    .venv/bin/python bench/qtuning_step.py [--rows 16] [--repeats 2] [--model smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from thresher.pipeline.io.pool import load_rows
from thresher.pipeline.training.qtuning import QTuningConfig
from thresher.pipeline.training.train import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--data", default=str(ROOT / "data/sample/pool/gsm8k_train.jsonl"))
    args = ap.parse_args()
    rows = load_rows(args.data)[0][:args.rows]
    q = QTuningConfig(sample_ratio=0.25, token_ratio=0.5)
    times: dict[str, list[float]] = {"plain": [], "qtuning": []}
    info = {}
    with tempfile.TemporaryDirectory() as d:
        for r in range(args.repeats):
            for name in ("plain", "qtuning"):
                cfg = TrainConfig(model=args.model, batch_size=8, max_tokens=512,
                                  qtuning=q if name == "qtuning" else None)
                t = time.perf_counter()
                s = train(rows, Path(d) / f"{name}{r}", cfg, resume=False, progress=False)
                times[name].append(time.perf_counter() - t)
                info[name] = {"steps": s["steps"], "trained_tokens": s.get("qtuning", {}).get(
                    "kept_tokens", s["train_tokens"])}
    best = {k: min(v) for k, v in times.items()}
    print(json.dumps({"rows": args.rows, "model": args.model, "seconds": times, "info": info}))
    print(f"plain    {best['plain']:.1f}s  ({info['plain']['trained_tokens']} loss tokens trained)")
    print(f"qtuning  {best['qtuning']:.1f}s  ({info['qtuning']['trained_tokens']} loss tokens trained)")
    print(f"qtuning / plain time: {best['qtuning'] / best['plain']:.2f}")


if __name__ == "__main__":
    main()
