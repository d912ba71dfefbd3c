"""Per-sample gradients: torch.func vmap(grad) over functional_call (`pipeline/models/grads.py`) against
one forward + backward call per sample, on the same rows and parameters.

    .venv/bin/python bench/per_sample_grads.py [--rows 16] [--params lora] [--budget 2048]
                                               [--threads N] [--rounds 2]

Model: the real SmolLM2-135M-Instruct with a fresh seeded LoRA adapter (r=8 on q/k/v/o; the
state DEALRec's effort score and GraNd-at-init differentiate), float32, eval mode. Rows: a
seeded mix of GSM8K, code and general rows from ../shared/data/pool (the bundled sample when
absent), response-only loss, max 512 tokens. Both ways run in the same process, interleaved
over rounds, best time kept (the machine is shared). Prints rows/s of each, the ratio
loop/vmap, and the largest relative difference between the two ways' gradient norms.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch
from shared_data import sample_rows
from thresher.pipeline.models.chat import encode
from thresher.pipeline.models.grads import grad_norms, n_params, select_params
from thresher.pipeline.models.resolve import DEFAULT_LM
from thresher.pipeline.stages.grad_scores import ModelRef

FILES = ["gsm8k_train.jsonl", "code_alpaca_2k.jsonl", "llamafactory_alpaca_en_demo.jsonl"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--params", default="lora")
    ap.add_argument("--budget", type=int, default=2048, help="padded tokens per vmap batch")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model, tok = ModelRef(model=DEFAULT_LM, lora_seed=0).load("cpu")
    params = select_params(model, a.params)
    enc = [encode(tok, r, 512) for r in sample_rows(a.rows, FILES)]
    tokens = int(sum(len(e.input_ids) for e in enc))
    best = {"loop": float("inf"), "vmap": float("inf")}
    norms = {}
    for r in range(a.rounds):
        for how in (("loop", "vmap") if r % 2 == 0 else ("vmap", "loop")):
            t0 = time.perf_counter()
            norms[how] = grad_norms(model, enc, params, how=how, batch_tokens=a.budget)
            best[how] = min(best[how], time.perf_counter() - t0)
    rel = float(np.max(np.abs(norms["vmap"] - norms["loop"]) / np.maximum(norms["loop"], 1e-12)))
    out = {"rows": len(enc), "tokens": tokens, "params": a.params, "n_params": n_params(params),
           "budget": a.budget, "threads": torch.get_num_threads(), "rounds": a.rounds,
           "loop_s": round(best["loop"], 2), "vmap_s": round(best["vmap"], 2),
           "loop_rows_per_s": round(len(enc) / best["loop"], 3),
           "vmap_rows_per_s": round(len(enc) / best["vmap"], 3),
           "ratio_loop_over_vmap": round(best["loop"] / best["vmap"], 2),
           "max_rel_norm_diff": rel, "cpu": platform.processor() or platform.machine(),
           "cores": os.cpu_count(), "torch": torch.__version__}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
