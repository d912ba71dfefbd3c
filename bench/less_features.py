"""LESS gradient features on a realistic slice: seconds per row per checkpoint, projection share,
peak memory. A seeded uniform sample of --rows rows from every file of ../shared/data/pool
(shards of 50 rows), --targets GSM8K test rows as the target task, SmolLM2-135M-Instruct.

    nice -n 19 /usr/bin/time -v .venv/bin/python bench/less_features.py --out out/less-bench \
        [--rows 200] [--targets 20] [--max-tokens 256] [--epochs 2] [--d 8192]

Runs the `less` method's stages (warm-up proxy, pool features with Adam, target features with
SGD) through the plan, as `thresher select --method less` does; a rerun reuses what is cached
(delete OUT/work to measure again). Prints one JSON line.

    nice -n 19 .venv/bin/python bench/less_features.py --out out/less-bench --probe 512

after a run: the features of the first 16 pool rows at the last warm-up checkpoint with that
many padded tokens per per-sample-gradient batch (`--param grad_tokens`), in a fresh process
per value: seconds and peak RSS (memory grows with the batch).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import time
from pathlib import Path

from shared_data import SHARED


def build(out: Path, n_rows: int, n_targets: int, seed: int = 0) -> tuple[Path, Path]:
    from thresher.pipeline.io.ingest import ingest

    rng = random.Random(seed)
    rows = []
    for path in sorted((SHARED / "pool").glob("*.jsonl")):
        rows += [json.loads(ln) for ln in path.read_text().split("\n") if ln.strip()]
    pick = rng.sample(rows, n_rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pick))
    tgt = [json.loads(ln) for ln in (SHARED / "eval" / "gsm8k_test.jsonl").read_text().split("\n") if ln.strip()]
    (out / "gsm8k_target.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tgt[:n_targets]))
    if not (out / "pool" / "pool.json").exists():
        ingest([out / "rows.jsonl"], out / "pool", rows_per_shard=50)
    return out / "pool", out / "gsm8k_target.jsonl"


def probe(out: Path, token_budget: int, max_tokens: int) -> dict:
    from thresher.pipeline.io.pool import Pool
    from thresher.pipeline.stages.grad_features import GradFeatures, shard_features
    from thresher.pipeline.stages.proxy import warmup_proxy

    ckpt = max((out / "work" / "proxy").glob("*/run/checkpoint-*"),
               key=lambda c: int(c.name.split("-")[1]))
    stage = GradFeatures(proxy=warmup_proxy(1), d=8192, max_tokens=max_tokens, dtype="bf16",
                         token_budget=token_budget)
    job = stage.open_worker("cpu", ("checkpoint", str(ckpt)))
    rows = list(Pool(out / "pool").iter_rows(["id", "kind", "messages", "text"]))[:16]
    t0 = time.perf_counter()
    _, _, tokens = shard_features(job, rows)
    return {"probe_token_budget": token_budget, "rows": 16, "tokens": tokens,
            "seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--targets", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--d", type=int, default=8192)
    ap.add_argument("--probe", type=int, default=None, help="token budget to probe (after a run)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.probe:
        print(json.dumps(probe(args.out, args.probe, args.max_tokens)))
        return
    import torch
    from thresher.pipeline.artifacts import ArtifactStore
    from thresher.pipeline.executors import LocalExecutor
    from thresher.pipeline.io.pool import Pool
    from thresher.pipeline.method import Request
    from thresher.pipeline.plan import make_plan
    from thresher.scoring.less import LessMethod, LessParams

    pool_dir, target = build(args.out, args.rows, args.targets)
    pool = Pool(pool_dir)
    p = LessParams(max_tokens=args.max_tokens, epochs=args.epochs, d=args.d)
    needs = LessMethod().needs(p, Request(pool=pool, targets=(target,)))
    plan = make_plan(needs.values(), "cpu")
    t0 = time.perf_counter()
    outputs, stats = plan.run(pool, ArtifactStore(args.out / "work"), LocalExecutor())
    wall = time.perf_counter() - t0
    report = {"rows": pool.n_rows, "targets": args.targets, "max_tokens": args.max_tokens,
              "epochs": args.epochs, "d": args.d, "wall_seconds": round(wall, 1),
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
              "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
              "load_avg_end": os.getloadavg()}
    for st in stats:
        key = st.stage + ("" if st.config.get("source") is None else "_target")
        report[key] = {"seconds": round(st.seconds, 1), "cached": st.cached,
                       "rows_computed": st.rows_computed}
    for name, fs in outputs.items():
        if name.kind == "grad_features":
            info = fs.info
            per = info["feature_seconds"] / max(1, info["rows_computed"])
            key = "features_" + info["mode"]
            report[key] = {"rows_x_ckpts": info["rows_computed"], "seconds": info["feature_seconds"],
                           "seconds_per_row_per_ckpt": round(per, 3),
                           "project_seconds": info["project_seconds"], "etas": info["etas"],
                           "no_loss_rows": info["no_loss_rows"]}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
