"""Forward-pass throughput: the fused engine against one-sample-at-a-time scoring and the CPU's
bf16 GEMM roofline, measured in the same run.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/forward_throughput.py [--rows 64] [--rounds 3]
        [--budget 1024] [--threads N] [--dtype auto|fp32|bf16] [--padded] [--serial]
        [--fp32-reference]

Same model (the real SmolLM2-135M-Instruct) and the same rows (a fixed, seeded mix of math,
code, general, safety and plain-text rows from ../shared/data/pool, falling back to the
bundled sample). Each round runs, back to back:
  (g) large bf16 GEMMs (1024^3 and 2048^3, `torch.mm`, all threads, warmed up; the median
      time of repeated calls at the faster of the two sizes), the roofline: the best this CPU
      does in bf16;
  (b) the engine (`pipeline.engine.run_forward`) with every signal on (packed rows on a CPU);
  (c) the engine with the loss alone;
  (a) the reference: the way the RDS+ and LESS code does it, one sample at a time, no batching,
      `model(ids, output_hidden_states=True)`, full-vocabulary log-softmax over every position,
      the same signals (loss, entropy, EL2N, RDS+ vector) read from it, in the engine's dtype;
  (p) with --padded, the engine with padded length-sorted batches (the pre-packing engine);
  (s) with --serial, the engine with one batch at a time on all threads (`workers=1`, the
      engine before `_in_workers`);
  (a') with --fp32-reference, the reference in float32 (transformers' CPU default).
Every round runs all rows through every variant back to back (the order rotating from round to
round, a short GEMM timing first), so a burst of load elsewhere hits all variants alike; ratios
are taken within each round and the median over rounds is printed. `--chunks N` interleaves
finer (each variant runs N chunks of the rows per round), at a cost to the engine a real pool
does not pay: a chunk of ~4 packed sequences leaves one of the two workers idle at its end. Roofline fraction = model FLOPs / engine time / GEMM FLOP/s, with
model FLOPs counted the standard way (2 x every linear layer's weights per token, the LM head on
every position as a plain forward does, plus causal attention 4 x d x (t + 1) at position t).
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
from thresher.pipeline.models import engine
from thresher.pipeline.models.chat import encode
from thresher.pipeline.models.resolve import DEFAULT_LM, load_causal_lm, load_tokenizer, resolve

FILES = ["gsm8k_train.jsonl", "code_alpaca_2k.jsonl", "llamafactory_alpaca_en_demo.jsonl",
         "hh_rlhf_harmless_base_test_chosen.jsonl", "mbpp_train_val_prompt.jsonl",
         "llamafactory_c4_demo.jsonl"]
ALL = {"loss", "entropy", "el2n", "token_loss", "token_entropy", "rds"}


def load_rows(n: int, seed: int = 0) -> list[dict]:
    return sample_rows(n, FILES, seed)


def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def reference(model, encs) -> None:
    """One sample at a time, as the RDS+ / LESS scripts do (batch size 1, no padding)."""
    dev = next(model.parameters()).device
    with torch.inference_mode():
        for e in encs:
            ids = torch.from_numpy(e.input_ids)[None].to(dev)
            out = model(input_ids=ids, output_hidden_states=True)
            logp = torch.log_softmax(out.logits[0, :-1].float(), -1)
            y = ids[0, 1:]
            m = torch.from_numpy(e.loss_mask[1:]).to(dev)
            p = logp.exp()
            _loss = -logp.gather(1, y[:, None])[m].mean()
            _ent = -(p * logp).sum(-1)[m].mean()
            onehot = torch.nn.functional.one_hot(y, p.shape[-1]).float()
            _el2n = torch.linalg.vector_norm(p - onehot, dim=-1)[m].mean()
            h = out.hidden_states[-1][0].float()
            w = torch.arange(1, h.shape[0] + 1, dtype=torch.float32, device=dev)
            _rds = torch.nn.functional.normalize((w / w.sum()) @ h, dim=-1)
    sync(dev)


def model_flops(cfg, lengths) -> float:
    """FLOPs of a plain forward over rows of these lengths (see the module docstring)."""
    d, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    hd = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    q, kv, ff = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd, cfg.intermediate_size
    per_token = 2 * (L * (d * q + 2 * d * kv + q * d + 3 * d * ff) + d * V)
    attn = sum(L * 4 * q * n * (n + 1) / 2 for n in lengths)
    return per_token * sum(lengths) + attn


def gemm_flops_per_s(seconds: float = 2.0, device: str = "cpu") -> float:
    """bf16 matmul FLOP/s: the median over repeated calls for about `seconds`, at the faster of
    two sizes (1024^3 and 2048^3 on a CPU, 8192^3 on a GPU)."""
    sizes = (8192,) if device.startswith("cuda") else (1024, 2048)
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
        b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
        for _ in range(2):
            a @ b
        sync(device)
        times, t_end = [], time.perf_counter() + seconds / len(sizes)
        while time.perf_counter() < t_end or len(times) < 3:
            t = time.perf_counter()
            a @ b
            sync(device)
            times.append(time.perf_counter() - t)
        best = max(best, 2 * n ** 3 / float(np.median(times)))
    return best


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--dtype", default="auto", help="engine dtype (auto: engine.engine_dtype)")
    ap.add_argument("--budget", type=int, default=None,
                    help="engine token budget per batch (default: the engine's for the device)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are printed")
    ap.add_argument("--chunks", type=int, default=1, help="row chunks interleaved within a round")
    ap.add_argument("--padded", action="store_true", help="also run the engine on padded batches")
    ap.add_argument("--serial", action="store_true",
                    help="also run the engine one batch at a time on all threads (workers=1)")
    ap.add_argument("--fp32-reference", action="store_true", help="also run the fp32 reference")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    args.budget = args.budget or engine.default_batch_tokens(args.device)
    m = resolve(DEFAULT_LM)
    tok = load_tokenizer(m)
    device = args.device
    dtype = engine.engine_dtype(device, args.dtype)
    model = load_causal_lm(m, device, dtype)
    rows = load_rows(args.rows)
    encs = [encode(tok, r, args.max_tokens) for r in rows]
    lengths = [len(e.input_ids) for e in encs]
    n_tok, flops = sum(lengths), model_flops(model.config, lengths)
    dname = str(dtype).removeprefix("torch.")
    gpu = f", GPU {torch.cuda.get_device_name()}" if device.startswith("cuda") else ""
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
          f"engine dtype {dname}, token budget {args.budget}, load average {load_average()}")
    print(f"rows: {len(rows)}, tokens: {n_tok} (min {min(lengths)}, median "
          f"{int(np.median(lengths))}, max {max(lengths)}), loss tokens: "
          f"{sum(int(e.loss_mask.sum()) for e in encs)}, model FLOPs {flops / n_tok / 1e9:.3f} "
          "GFLOP/token")

    def run_engine(idx, signals, pack=None, workers=None):
        engine.run_forward(model, tok, [rows[i] for i in idx], signals, batch_tokens=args.budget,
                           encoded=[encs[i] for i in idx], pack=pack, workers=workers)
        sync(device)

    runs = {"all": lambda idx: run_engine(idx, ALL), "loss": lambda idx: run_engine(idx, {"loss"}),
            "ref": lambda idx: reference(model, [encs[i] for i in idx])}
    if args.padded:
        runs["padded"] = lambda idx: run_engine(idx, ALL, pack=False)
    if args.serial:
        runs["serial"] = lambda idx: run_engine(idx, ALL, workers=1)
    if args.fp32_reference:
        fp32 = load_causal_lm(m, device, torch.float32)
        runs["ref32"] = lambda idx: reference(fp32, [encs[i] for i in idx])
    run_engine(range(min(4, len(rows))), {"loss"})  # warm-up
    chunks = np.array_split(np.random.default_rng(0).permutation(len(rows)), args.chunks)
    rounds = []
    for r in range(args.rounds):
        # every chunk of rows (all of them by default) runs through every variant back to back,
        # in an order that rotates by round and chunk, so load elsewhere hits all variants alike
        t = dict.fromkeys(["gemm", *runs], 0.0)
        for c, idx in enumerate(chunks):
            t["gemm"] += gemm_flops_per_s(0.5, device=device) / len(chunks)
            names = list(runs)
            turn = (r + c) % len(names)
            for k in names[turn:] + names[:turn]:
                t0 = time.perf_counter()
                runs[k](idx)
                t[k] += time.perf_counter() - t0
        rounds.append(t)
        print(f"round {r + 1} (load average {load_average()}): gemm {t['gemm'] / 1e9:.0f} GFLOP/s, " + ", ".join(
            f"{k} {n_tok / t[k]:.0f} tok/s" for k in runs), flush=True)
    med = {k: float(np.median([t[k] for t in rounds])) for k in rounds[0]}
    ratio = {k: float(np.median([t[k] / t["all"] for t in rounds])) for k in runs if k != "all"}
    roof = float(np.median([flops / t["all"] / t["gemm"] for t in rounds]))
    names = {"all": "(b) engine, all signals", "loss": "(c) engine, loss only",
             "ref": f"(a) reference 1-at-a-time, {dname}", "padded": "(p) engine, padded batches",
             "ref32": "(a') reference 1-at-a-time, float32",
             "serial": "(s) engine, one batch at a time"}
    print(f"{'(g) bf16 GEMM':<40} {med['gemm'] / 1e9:8.0f} GFLOP/s (median)")
    for k in runs:
        print(f"{names[k]:<40} {n_tok / med[k]:8.0f} tok/s  ({med[k]:.2f} s, median)")
    print(f"engine (all signals) vs reference in {dname}: x{ratio['ref']:.2f} (target >= 2)")
    print(f"engine roofline fraction: {roof:.2f} of the bf16 GEMM (target >= 0.70; "
          f"{flops / n_tok / 1e9:.3f} GFLOP/token)")
    print(f"all signals / loss only time: {1 / ratio['loss']:.2f}x")
    for k in ("padded", "serial", "ref32"):
        if k in ratio:
            print(f"engine (all signals) vs {names[k]}: x{ratio[k]:.2f}")
    print(json.dumps({"rows": len(rows), "tokens": n_tok, "dtype": dname, "budget": args.budget,
                      "threads": torch.get_num_threads(), "rounds": args.rounds,
                      "gflop_per_token": round(flops / n_tok / 1e9, 4),
                      "gemm_gflop_s": round(med["gemm"] / 1e9),
                      "tok_s": {k: round(n_tok / med[k]) for k in runs},
                      "ratio_vs": {k: round(v, 3) for k, v in ratio.items()},
                      "roofline_fraction": round(roof, 3)}))


if __name__ == "__main__":
    main()
