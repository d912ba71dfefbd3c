"""Scale benchmark: every stage of a selection run at 100k and 1M rows, wall time and peak memory.

    .venv/bin/python bench/scale_data.py --rows 100000     # once per size (bench/out/scale/N)
    .venv/bin/python bench/scale_data.py --rows 1000000
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/scale.py --sizes 100000 1000000

Each stage runs in a fresh Python process (so its peak RSS is its own: imports included,
`ru_maxrss`), on the pipeline's own functions, reading what the previous stages wrote:
    ingest     pipeline.io.ingest.ingest of the generated JSONL files (streaming, 10k-row shards)
    exact      scoring.semdedup.exact_duplicates over the pool's conversation texts (streamed)
    kmeans     pipeline.cluster.kmeans on the float16 embeddings, memory-mapped (k = default_k)
    semdedup   scoring.semdedup.semantic_matches within clusters (eps 0.05), exact copies excluded
    rds        RDS+ round-robin (scoring.rds.build_index + rds_lists + selectors RoundRobin) over
               the precomputed float16 RDS+ vectors (streamed from the memmap in blocks),
               50 target rows, budget 1% of the pool
    balanced   selectors.balanced.Balanced by the rows' `origin` field, budget 10%
    random     selectors.random_sample.RandomSelector, budget 10%
    write      writers.write_selection (streamed shard by shard): the random 10% subset as
               `messages` JSONL
Prints a table per size and the 1M / 100k ratio of time and peak memory per stage.
The embeddings and RDS+ vectors are synthetic stand-ins (see bench/scale_data.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench" / "out" / "scale"
STAGES = ("ingest", "exact", "kmeans", "semdedup", "rds", "balanced", "random", "write")


def _candidates(pool):
    import polars as pl

    ids = pool.frame(["id"])["id"]
    return pl.DataFrame({"id": ids, "row": range(len(ids))})


def stage_ingest(d: Path, work: Path) -> dict:
    from thresher.pipeline.io.ingest import ingest

    rep = ingest(sorted((d / "src").glob("*.jsonl")), work / "pool", rows_per_shard=10_000)
    return {"rows": rep.kept, "quarantined": rep.read - rep.kept}


def stage_exact(d: Path, work: Path) -> dict:
    import numpy as np
    from thresher.pipeline.io.pool import Pool
    from thresher.pipeline.io.schema import row_text
    from thresher.scoring.semdedup import exact_duplicates

    pool = Pool(work / "pool")
    exact = exact_duplicates(row_text(r, "conversation")
                             for r in pool.iter_rows(["kind", "messages", "text"]))
    np.save(work / "exact.npy", exact)
    return {"exact_duplicates": int((exact >= 0).sum())}


def stage_kmeans(d: Path, work: Path) -> dict:
    import numpy as np
    from thresher.pipeline.stages.cluster import default_k, kmeans

    x = np.load(d / "embeddings.npy", mmap_mode="r")
    k = default_k(x.shape[0])
    _, labels, cos_dist, l2 = kmeans(x, k, niter=20, seed=1234)
    np.save(work / "labels.npy", labels)
    np.save(work / "cos_dist.npy", cos_dist)
    return {"k": k, "inertia": float((l2.astype(np.float64) ** 2).sum())}


def stage_semdedup(d: Path, work: Path) -> dict:
    import numpy as np
    from thresher.pipeline.io.pool import Pool
    from thresher.scoring.semdedup import id_ranks, semantic_matches

    emb = np.load(d / "embeddings.npy", mmap_mode="r")
    ranks = id_ranks(Pool(work / "pool").frame(["id"])["id"])
    include = np.load(work / "exact.npy") < 0
    max_sim, _ = semantic_matches(emb, np.load(work / "labels.npy"), np.load(work / "cos_dist.npy"),
                                  ranks, "hard", 0, 1024, include)
    return {"near_duplicates": int((include & (max_sim >= 0.95)).sum())}


def stage_rds(d: Path, work: Path) -> dict:
    import numpy as np
    from thresher.pipeline.budget import Budget
    from thresher.pipeline.io.pool import Pool
    from thresher.scoring.rds import build_index, rds_lists
    from thresher.selectors.round_robin import RoundRobin

    vecs = np.load(d / "rds.npy", mmap_mode="r")
    targets = np.load(d / "targets_rds.npy").astype(np.float32)
    cand = _candidates(Pool(work / "pool"))
    budget = Budget.parse(max(1, cand.height // 100))
    index = build_index(vecs, np.arange(cand.height))
    lists, names, what = rds_lists(index, [targets], ["targets"], budget.rows(cand))
    chosen = RoundRobin(lists, names, what=what).select(cand, budget, 0)
    return {"selected": chosen.height}


def _select(work: Path, which: str):
    from thresher.pipeline.budget import Budget
    from thresher.pipeline.io.pool import Pool
    from thresher.selectors.balanced import Balanced
    from thresher.selectors.random_sample import RandomSelector

    pool = Pool(work / "pool")
    cand = _candidates(pool)
    budget = Budget.parse("10%")
    if which == "balanced":
        cand = cand.with_columns(pool.meta_field("origin"))
        return Balanced("origin").select(cand, budget, 0)
    return RandomSelector().select(cand, budget, 0)


def stage_balanced(d: Path, work: Path) -> dict:
    chosen = _select(work, "balanced")
    return {"selected": chosen.height}


def stage_random(d: Path, work: Path) -> dict:
    chosen = _select(work, "random")
    chosen.select("id").write_parquet(work / "random_ids.parquet")
    return {"selected": chosen.height}


def stage_write(d: Path, work: Path) -> dict:
    import polars as pl
    from thresher.pipeline.io.pool import Pool
    from thresher.pipeline.io.writers import write_selection

    ids = pl.read_parquet(work / "random_ids.parquet")["id"].to_list()
    n = write_selection(Pool(work / "pool"), ids, work / "subset.jsonl", "messages")
    return {"written": n, "bytes": (work / "subset.jsonl").stat().st_size}


def run_stage(name: str, data: Path, work: Path) -> None:
    t = time.perf_counter()
    out = globals()[f"stage_{name}"](data, work)
    out.update(stage=name, seconds=round(time.perf_counter() - t, 2),
               peak_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    print("RESULT " + json.dumps(out), flush=True)


def run_size(n: int, stages, root: Path) -> list[dict]:
    data = root / str(n)
    if not (data / "info.json").exists():
        sys.exit(f"error: {data} not built; run bench/scale_data.py --rows {n} first")
    work = data / "work"
    if "ingest" in stages and (work / "pool").exists():
        import shutil

        shutil.rmtree(work)
    work.mkdir(exist_ok=True)
    results = []
    for name in stages:
        proc = subprocess.run([sys.executable, __file__, "--stage", name, "--data", str(data)],
                              capture_output=True, text=True, check=False)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            sys.exit(f"stage {name} at {n} rows failed:\n{proc.stderr[-3000:]}")
        res = json.loads(line[len("RESULT "):])
        results.append(res)
        extra = {k: v for k, v in res.items() if k not in ("stage", "seconds", "peak_mb")}
        res["load"] = [round(v, 2) for v in os.getloadavg()]
        print(f"{n:>9,} {name:<9} {res['seconds']:8.1f} s {res['peak_mb']:7,} MB  {extra}  "
              f"load {res['load'][0]:.2f}", flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--root", default=str(DATA), help="where bench/scale_data.py wrote the pools")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse a size's saved results (ROOT/N/results.json) instead of rerunning")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage:
        data = Path(args.data)
        return run_stage(args.stage, data, data / "work")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; each stage a fresh process; "
          f"load average (1, 5, 15 min) {os.getloadavg()}")
    res = {}
    for n in args.sizes:
        saved = Path(args.root) / str(n) / "results.json"
        if args.reuse and saved.exists():
            res[n] = json.loads(saved.read_text())
            print(f"{n:>9,} rows: reusing {saved}")
            continue
        fresh = run_size(n, args.stages, Path(args.root))
        # a run of some stages (a long size split into several runs) updates the saved ones
        old = {r["stage"]: r for r in json.loads(saved.read_text())} \
            if saved.exists() and "ingest" not in args.stages else {}
        old.update({r["stage"]: r for r in fresh})
        res[n] = [old[s] for s in STAGES if s in old]
        saved.write_text(json.dumps(res[n], indent=1) + "\n")
    if len(args.sizes) >= 2:
        a, b = args.sizes[0], args.sizes[-1]
        print(f"\nratio {b:,} / {a:,} rows:  stage      time   peak memory")
        by_a = {r["stage"]: r for r in res[a]}
        for rb in res[b]:
            ra = by_a.get(rb["stage"])
            if ra:
                print(f"{'':27}{ra['stage']:<9} x{rb['seconds'] / max(ra['seconds'], 1e-3):6.1f}"
                      f"  x{rb['peak_mb'] / ra['peak_mb']:.2f} ({rb['peak_mb']:,} MB)")
        print(f"max peak: {max(r['peak_mb'] for r in res[b]):,} MB at {b:,} rows, "
              f"{max(r['peak_mb'] for r in res[a]):,} MB at {a:,}")
    (Path(args.root) / "results.json").write_text(json.dumps({str(k): v for k, v in res.items()}, indent=1))


if __name__ == "__main__":
    main()
