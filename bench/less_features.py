"""LESS gradient features: packed bf16 per-sample gradients against the float32 vmap path they
replaced, side by side on SmolLM2 at one warm-up checkpoint, with the bf16 roofline fraction.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/less_features.py --out bench/out/less-features \
        [--rows 48] [--rounds 2] [--max-tokens 256] [--pool-rows 200] [--targets 20] [--epochs 2]
    ... --stages     # instead: the whole `less` plan (warm-up, pool and target features), its
                     # stage costs as `thresher select --method less` pays them (cached reruns)
    ... --overlap    # instead: both paths' features of every pool and target row at every
                     # checkpoint, and how many of the rows LESS keeps (top 10 / 20 / 40) agree

Build (once, under --out): --pool-rows rows drawn (seed 0) from every file of the shared pool
(`--data`, default ../shared/data), shards of 50; the target is the first --targets GSM8K test
rows; the `less` method's warm-up proxy (`--epochs` checkpoints, cached under OUT/work) gives
the checkpoint measured (the last).

Compare (the default): the first --rows pool rows' features (Adam-preconditioned, projected to
--d dimensions, unit length), computed in every round by
  (v) the former path: vmap per-sample gradients in float32, length batches of 512 padded tokens
      (the former `grad_tokens` default), projection in bf16 gathered 64 rows at a time;
  (p) the packed path: rows packed into sequences of 512 tokens (`less`'s default on a CPU), bf16 autocast, two packs side
      by side on one thread each, projection gathered 256 rows at a time (the `less` defaults).
On a GPU (`--device cuda`, `bench/gpu.sh`) the packed path runs packs of 8,192 tokens, one at
a time. A bf16 GEMM timing opens each round; the order of (v) and (p) alternates by round. Printed:
rows/s per checkpoint of each, the ratio p/v (median over rounds), the per-row cosine between
the two paths' features, the projection's share of each, and the roofline fraction of (p):
FLOPs / seconds / the round's bf16 GEMM FLOP/s, with
  gradient FLOPs   = 2 x (2 x body Linear weights x tokens + 2 x hidden x vocab x loss positions)
                     + 3 x causal attention (forward once, backward twice)
                     + 2 x LoRA parameters x tokens (each row's LoRA gradients from the captures)
  projection FLOPs = 2 x LoRA parameters x d per row
(the backward pass takes activation gradients only: one GEMM per forward GEMM). Peak RSS is read
after each path's first run (packed first in round 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import resource
import time
from pathlib import Path

import numpy as np
from shared_data import SHARED


def build(out: Path, data: Path, n_rows: int, n_targets: int, seed: int = 0) -> tuple[Path, Path]:
    from thresher.pipeline.io.ingest import ingest

    out.mkdir(parents=True, exist_ok=True)
    if not (out / "pool" / "pool.json").exists():
        rng = random.Random(seed)
        rows = []
        for path in sorted((data / "pool").glob("*.jsonl")):
            rows += [json.loads(ln) for ln in path.read_text().split("\n") if ln.strip()]
        pick = rng.sample(rows, n_rows)
        (out / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pick))
        tgt = [json.loads(ln) for ln in (data / "eval" / "gsm8k_test.jsonl").read_text().split("\n")
               if ln.strip()]
        (out / "gsm8k_target.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tgt[:n_targets]))
        ingest([out / "rows.jsonl"], out / "pool", rows_per_shard=50)
    return out / "pool", out / "gsm8k_target.jsonl"


def less_needs(pool, target: Path, a):
    from thresher.pipeline.method import Request
    from thresher.scoring.less import LessMethod, LessParams

    p = LessParams(max_tokens=a.max_tokens, epochs=a.epochs, d=a.d)
    return LessMethod().needs(p, Request(pool=pool, targets=(target,)))


def stages(a) -> dict:
    """The whole `less` plan through the local executor: each stage's seconds."""
    import torch
    from thresher.pipeline.artifacts import ArtifactStore
    from thresher.pipeline.executors import LocalExecutor
    from thresher.pipeline.io.pool import Pool
    from thresher.pipeline.plan import make_plan

    pool_dir, target = build(a.out, a.data, a.pool_rows, a.targets)
    pool = Pool(pool_dir)
    plan = make_plan(less_needs(pool, target, a).values(), "cpu")
    t0 = time.perf_counter()
    outputs, stats = plan.run(pool, ArtifactStore(a.out / "work"), LocalExecutor())
    report = {"rows": pool.n_rows, "targets": a.targets, "max_tokens": a.max_tokens,
              "epochs": a.epochs, "d": a.d, "wall_seconds": round(time.perf_counter() - t0, 1),
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
              "threads": torch.get_num_threads()}
    for st in stats:
        key = st.stage + ("" if st.config.get("source") is None else "_target")
        report[key] = {"seconds": round(st.seconds, 1), "cached": st.cached,
                       "rows_computed": st.rows_computed}
    for name, fs in outputs.items():
        if name.kind == "grad_features":
            info = fs.info
            report["features_" + info["mode"]] = {
                "rows_x_ckpts": info["rows_computed"], "seconds": info["feature_seconds"],
                "seconds_per_row_per_ckpt": round(info["feature_seconds"] / max(1, info["rows_computed"]), 3),
                "project_seconds": info["project_seconds"], "no_loss_rows": info["no_loss_rows"]}
    return report


def flops(cfg, encs, n_lora: int, d_proj: int) -> tuple[float, float]:
    """(gradient FLOPs, projection FLOPs) of the packed path over these rows (module docstring)."""
    d, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    hd = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    q, kv, ff = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd, cfg.intermediate_size
    body = L * (d * q + 2 * d * kv + q * d + 3 * d * ff)
    tokens = sum(len(e.input_ids) for e in encs)
    loss = sum(int(e.loss_mask[1:].sum()) for e in encs)
    attn = sum(L * 4 * q * n * (n + 1) / 2 for n in (len(e.input_ids) for e in encs))
    grad = 2 * (2 * body * tokens + 2 * d * V * loss) + 3 * attn + 2 * n_lora * tokens
    return grad, 2.0 * n_lora * d_proj * len(encs)


def compare(a) -> dict:
    import torch
    from forward_throughput import gemm_flops_per_s, load_average, sync
    from thresher.pipeline.artifacts import ArtifactStore
    from thresher.pipeline.executors import LocalExecutor
    from thresher.pipeline.io.pool import Pool
    from thresher.pipeline.models.chat import encode
    from thresher.pipeline.models.grads import n_params
    from thresher.pipeline.plan import make_plan
    from thresher.pipeline.stages.grad_features import GradFeatures, shard_features
    from thresher.scoring.less import grad_batch_tokens

    pool_dir, target = build(a.out, a.data, a.pool_rows, a.targets)
    pool = Pool(pool_dir)
    proxy = less_needs(pool, target, a)["pool"].proxy
    outputs, _ = make_plan([proxy], a.device).run(pool, ArtifactStore(a.out / "work"), LocalExecutor())
    ckpt = Path(outputs[proxy].checkpoints[-1])
    stage = GradFeatures(proxy=proxy, d=a.d, max_tokens=a.max_tokens, dtype="bf16", grad_dtype="bf16")
    packed = dataclasses.replace(stage.open_worker(a.device, ("checkpoint", str(ckpt))), project_rows=256, how="packed",
                                 batch_tokens=grad_batch_tokens(a.device),
                                 grad_dtype="bf16")
    vmap = dataclasses.replace(packed, batch_tokens=512, project_rows=64, how="vmap", grad_dtype="fp32")
    rows = list(pool.iter_rows(["id", "kind", "messages", "text"]))[:a.rows]
    encs = [encode(packed.tok, r, a.max_tokens) for r in rows]
    grad_f, proj_f = flops(packed.model.config, encs, n_params(packed.params), a.d)
    jobs = {"packed": packed, "vmap": vmap}
    times, feats, rss, rounds = {k: [] for k in jobs}, {}, {}, []
    for r in range(a.rounds):
        gemm = gemm_flops_per_s(1.0, a.device)
        row = {"round": r + 1, "load": load_average(), "gemm_gflop_s": round(gemm / 1e9)}
        for name in (("packed", "vmap") if r % 2 == 0 else ("vmap", "packed")):
            job = jobs[name]
            job.project_seconds = 0.0
            t0 = time.perf_counter()
            feats[name], _, _ = shard_features(job, rows)
            sync(a.device)
            sec = time.perf_counter() - t0
            rss.setdefault(name, round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
            times[name].append(sec)
            row[name] = {"seconds": round(sec, 1), "rows_per_s": round(len(rows) / sec, 3),
                         "project_share": round(job.project_seconds / sec, 3)}
        row["ratio"] = round(row["packed"]["rows_per_s"] / row["vmap"]["rows_per_s"], 2)
        row["roofline"] = round((grad_f + proj_f) / row["packed"]["seconds"] / gemm, 3)
        row["roofline_gradients"] = round(grad_f / (row["packed"]["seconds"] * (
            1 - row["packed"]["project_share"])) / gemm, 3)
        rounds.append(row)
        print(json.dumps(row), flush=True)
    ok = np.array([e.loss_mask[1:].any() for e in encs])
    f_p, f_v = (np.asarray(feats[k], dtype=np.float64)[ok] for k in ("packed", "vmap"))
    cos = (f_p * f_v).sum(1) / (np.linalg.norm(f_p, axis=1) * np.linalg.norm(f_v, axis=1))
    med = lambda k: float(np.median([x[k] for x in rounds]))
    return {"rows": len(rows), "tokens": int(sum(len(e.input_ids) for e in encs)),
            "loss_tokens": int(sum(int(e.loss_mask[1:].sum()) for e in encs)),
            "checkpoint": ckpt.name, "max_tokens": a.max_tokens, "d": a.d, "n_lora": n_params(packed.params),
            "gflop_per_row": {"gradients": round(grad_f / len(rows) / 1e9, 1),
                              "projection": round(proj_f / len(rows) / 1e9, 1)},
            "seconds_per_row_per_ckpt": {k: round(float(np.median(v)) / len(rows), 3) for k, v in times.items()},
            "ratio_packed_over_vmap": med("ratio"), "roofline_fraction": med("roofline"),
            "roofline_fraction_gradients": med("roofline_gradients"),
            "cosine_min": round(float(cos.min()), 5), "cosine_median": round(float(np.median(cos)), 5),
            "peak_rss_mb_after_first_run": rss, "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if a.device.startswith("cuda") else
            (platform.processor() or platform.machine()), "rounds": rounds}


def overlap(a) -> dict:
    """Both paths' LESS features for every pool row and target row at every warm-up checkpoint,
    then the rows LESS keeps at several budgets: how many the two paths share."""
    from thresher.pipeline.artifacts import ArtifactStore
    from thresher.pipeline.executors import LocalExecutor
    from thresher.pipeline.io.pool import Pool, load_rows
    from thresher.pipeline.models.less_maths import checkpoint_etas
    from thresher.pipeline.plan import make_plan
    from thresher.pipeline.stages.grad_features import GradFeatures, shard_features
    from thresher.scoring.less import grad_batch_tokens, less_scores

    pool_dir, target = build(a.out, a.data, a.pool_rows, a.targets)
    pool = Pool(pool_dir)
    proxy = less_needs(pool, target, a)["pool"].proxy
    outputs, _ = make_plan([proxy], a.device).run(pool, ArtifactStore(a.out / "work"), LocalExecutor())
    ckpts = [Path(c) for c in outputs[proxy].checkpoints]
    cols = ["id", "kind", "messages", "text"]
    rows = list(pool.iter_rows(cols))
    targets = load_rows(target)[0]
    feats = {"packed": ([], []), "vmap": ([], [])}
    no_loss = None
    for ckpt in ckpts:
        stage = GradFeatures(proxy=proxy, d=a.d, max_tokens=a.max_tokens, dtype="bf16", grad_dtype="bf16")
        base = stage.open_worker(a.device, ("checkpoint", str(ckpt)))
        for name, kw in (("packed", {"batch_tokens": grad_batch_tokens(a.device), "how": "packed",
                                     "grad_dtype": "bf16"}),
                         ("vmap", {"batch_tokens": 512, "how": "vmap", "grad_dtype": "fp32",
                                   "project_rows": 64})):
            job = dataclasses.replace(base, **kw)
            f_pool, no_loss, _ = shard_features(job, rows)
            f_tgt, t_no_loss, _ = shard_features(dataclasses.replace(job, moments=None), targets)
            feats[name][0].append(np.asarray(f_pool))
            feats[name][1].append(np.asarray(f_tgt)[~t_no_loss])
        del base
    etas = checkpoint_etas(ckpts)
    ok = ~no_loss
    score = {k: less_scores(p, t, etas) for k, (p, t) in feats.items()}
    out = {"pool_rows": len(rows), "scored_rows": int(ok.sum()), "target_rows": len(feats["vmap"][1][0]),
           "checkpoints": len(ckpts)}
    for k in (10, 20, 40):
        top = {name: set(np.flatnonzero(ok)[np.argsort(-s[ok], kind="stable")[:k]]) for name, s in score.items()}
        out[f"top{k}_shared"] = len(top["packed"] & top["vmap"])
    cos = [float(np.min((np.asarray(p, np.float64)[ok] * np.asarray(v, np.float64)[ok]).sum(1)))
           for p, v in zip(feats["packed"][0], feats["vmap"][0])]
    out["feature_cosine_min_per_checkpoint"] = [round(c, 5) for c in cos]
    out["score_correlation"] = round(float(np.corrcoef(score["packed"][ok], score["vmap"][ok])[0, 1]), 5)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/out/less-features"))
    ap.add_argument("--data", type=Path, default=SHARED)
    ap.add_argument("--rows", type=int, default=48, help="rows compared (the first of the pool)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--pool-rows", type=int, default=200)
    ap.add_argument("--targets", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--d", type=int, default=8192)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (bench/gpu.sh)")
    ap.add_argument("--stages", action="store_true", help="run the whole less plan instead")
    ap.add_argument("--overlap", action="store_true",
                    help="instead: both paths over the whole pool and the targets, and the rows LESS keeps")
    a = ap.parse_args()
    if not (a.data / "pool").is_dir():
        ap.error(f"{a.data}/pool not found: the shared data is needed (--data DIR)")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    report = stages(a) if a.stages else overlap(a) if a.overlap else compare(a)
    report["load_avg_end"] = os.getloadavg()
    print(json.dumps(report))
    if not (a.stages or a.overlap):
        per = report["seconds_per_row_per_ckpt"]
        print(f"seconds per row per checkpoint: packed {per['packed']}, vmap {per['vmap']} "
              f"({report['rows']} rows, {report['tokens']} tokens, {report['device']})")
        print(f"packed / vmap: x{report['ratio_packed_over_vmap']} rows/s per checkpoint "
              f"(target >= 3); roofline fraction {report['roofline_fraction']} of the bf16 GEMM "
              f"({report['roofline_fraction_gradients']} for the gradient pass alone); features "
              f"cosine min {report['cosine_min']}")


if __name__ == "__main__":
    main()
