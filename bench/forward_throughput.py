"""Forward-pass throughput: the fused engine against one-sample-at-a-time scoring.

    .venv/bin/python bench/forward_throughput.py [--rows 96] [--dtype auto|fp32|bf16] [--budget 4096]
                                                  [--threads N] [--rounds 2]

Same model (the real SmolLM2-135M-Instruct) and the same rows (a fixed, seeded mix of math,
code, general, safety and plain-text rows from /work/shared/data/pool, falling back to the
bundled sample) scored three ways:
  (a) reference: the way the RDS+ and LESS code does it: one sample at a time, no batching,
      `model(ids, output_hidden_states=True)`, full-vocabulary log-softmax over every position,
      the same signals (loss, entropy, EL2N, RDS+ vector) read from it;
  (b) the engine (`pipeline.engine.run_forward`) with every signal on;
  (c) the engine with the loss alone.
The reference runs in the engine's dtype (a) and in float32 (a'), transformers' CPU default.
Runs are interleaved over rounds and the best time of each kept (the machine is shared).
Prints tokens/s for each and the ratios b/a and (all signals)/(loss only) time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch
from thresher.pipeline import engine
from thresher.pipeline.chat import encode
from thresher.pipeline.models import DEFAULT_LM, load_causal_lm, load_tokenizer, resolve
from thresher.pipeline.readers import read_records
from thresher.pipeline.schema import detect_shape, to_canonical

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data" / "pool"
FILES = ["gsm8k_train.jsonl", "code_alpaca_2k.jsonl", "llamafactory_alpaca_en_demo.jsonl",
         "hh_rlhf_harmless_base_test_chosen.jsonl", "mbpp_train_val_prompt.jsonl",
         "llamafactory_c4_demo.jsonl"]
ALL = {"loss", "entropy", "el2n", "token_loss", "token_entropy", "rds"}


def load_rows(n: int, seed: int = 0) -> list[dict]:
    files = [SHARED / f for f in FILES if (SHARED / f).exists()]
    if not files:
        files = sorted((ROOT / "data" / "sample" / "pool").iterdir())
    per = -(-n // len(files))
    rng = random.Random(seed)
    rows = []
    for path in files:
        recs = [r for _, r, err in read_records(path) if err is None]
        shape = detect_shape(recs[0])
        for rec in rng.sample(recs, min(per, len(recs))):
            rows.append(to_canonical(rec, shape, path.stem))
    rng.shuffle(rows)
    return rows[:n]


def reference(model, encs) -> None:
    """One sample at a time, as the RDS+ / LESS scripts do (batch size 1, no padding)."""
    with torch.inference_mode():
        for e in encs:
            ids = torch.from_numpy(e.input_ids)[None]
            out = model(input_ids=ids, output_hidden_states=True)
            logp = torch.log_softmax(out.logits[0, :-1].float(), -1)
            y = ids[0, 1:]
            m = torch.from_numpy(e.loss_mask[1:])
            p = logp.exp()
            _loss = -logp.gather(1, y[:, None])[m].mean()
            _ent = -(p * logp).sum(-1)[m].mean()
            onehot = torch.nn.functional.one_hot(y, p.shape[-1]).float()
            _el2n = torch.linalg.vector_norm(p - onehot, dim=-1)[m].mean()
            h = out.hidden_states[-1][0].float()
            w = torch.arange(1, h.shape[0] + 1, dtype=torch.float32)
            _rds = torch.nn.functional.normalize((w / w.sum()) @ h, dim=-1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=96)
    ap.add_argument("--dtype", default="auto", help="engine dtype (auto: engine.engine_dtype)")
    ap.add_argument("--budget", type=int, default=engine.DEFAULT_TOKEN_BUDGET, help="engine token budget per batch")
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best of each is kept")
    ap.add_argument("--no-fp32-reference", action="store_true", help="skip the fp32 reference run")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    m = resolve(DEFAULT_LM)
    tok = load_tokenizer(m)
    dtype = engine.engine_dtype("cpu", args.dtype)
    model = load_causal_lm(m, "cpu", dtype)
    fp32 = model if dtype == torch.float32 or args.no_fp32_reference else load_causal_lm(m, "cpu", torch.float32)
    rows = load_rows(args.rows)
    encs = [encode(tok, r, args.max_tokens) for r in rows]
    n_tok = sum(len(e.input_ids) for e in encs)
    lengths = [len(e.input_ids) for e in encs]
    dname = str(dtype).removeprefix("torch.")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, engine dtype {dname}, token budget {args.budget}")
    print(f"rows: {len(rows)}, tokens: {n_tok} (min {min(lengths)}, median {int(np.median(lengths))}, "
          f"max {max(lengths)}), loss tokens: {sum(int(e.loss_mask.sum()) for e in encs)}")

    def run_engine(signals):
        engine.run_forward(model, tok, rows, signals, token_budget=args.budget, encoded=encs)

    runs = {"(b) engine, all signals": lambda: run_engine(ALL),
            "(c) engine, loss only": lambda: run_engine({"loss"}),
            f"(a) reference 1-at-a-time, {dname}": lambda: reference(model, encs)}
    if fp32 is not model:
        runs["(a') reference 1-at-a-time, float32"] = lambda: reference(fp32, encs)
    run_engine({"loss"})  # warm-up
    best = {k: float("inf") for k in runs}
    for _ in range(args.rounds):      # interleaved, so a burst of load elsewhere hits every run
        for k, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    for k, t in best.items():
        print(f"{k:<40} {n_tok / t:8.0f} tok/s  ({t:.2f} s)")
    keys = list(runs)
    t_all, t_loss, t_ref = best[keys[0]], best[keys[1]], best[keys[2]]
    print(f"engine (all signals) vs reference in {dname}: {t_ref / t_all:.2f}x faster (target >= 3x)")
    res = {"rows": len(rows), "tokens": n_tok, "dtype": dname, "threads": torch.get_num_threads(),
           "budget": args.budget, "tok_s": {k: round(n_tok / t) for k, t in best.items()},
           "speedup_same_dtype": round(t_ref / t_all, 2)}
    if len(keys) > 3:
        t_ref32 = best[keys[3]]
        print(f"engine (all signals) vs reference in float32: {t_ref32 / t_all:.2f}x faster")
        res["speedup_vs_fp32_reference"] = round(t_ref32 / t_all, 2)
    print(f"all signals / loss only time: {t_all / t_loss:.2f}x (target <= 1.25x)")
    res["all_over_loss"] = round(t_all / t_loss, 2)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
