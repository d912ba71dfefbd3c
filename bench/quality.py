"""Does target-aware selection train a better model than random rows? (issue 15)

A mixed pool is built from every source of the shared data (`--per-source` rows each, seeded),
and target families, each split into target rows (what `--target` gets) and disjoint eval rows:

    gsm8k        GSM8K test        its task has its own source in the pool (GSM8K train)
    mbpp         MBPP test         MBPP train + two Code Alpaca sets in the pool (not in the default run)
    t0_heldout   T0 held-out       datasets the pool's T0 subset does not have, same template style
    hh_rlhf      HH-RLHF harmless  a pool source held OUT of the pool: nothing in it is that source
    self_instruct self-instruct    held out of the pool too (human-written seed tasks)

Methods (labels): `rds` is RDS+ as published; `rds-cap50` and `rds-cap25` cap any one source at
50% / 25% of the budget (the diversity guard); `rds-embed[-cap50|-cap25]` use the sentence
embedder's vectors instead of the LM's hidden states; `less` is LESS (projected Adam LoRA
gradients over two warm-up checkpoints) and `less-cap50` the same with the 50% cap, the
`--target` default. Two methods that pick the same rows (a cap that did not bind) share their
training runs.

Every method in `--methods` selects `--budget` rows per family; each subset and a random subset of
the same size (a fresh one per seed; random ignores the target, so its runs are shared by all
families) are LoRA-trained with `--seeds` seeds and scored by held-out response loss on the
family's eval rows. Per (family, method): loss mean and sd over seeds, gain over random (random
minus method: positive is better), the paired bootstrap 95% interval over eval rows (losses
averaged over seeds), the share of the subset taken from its largest source, and the selection
cost (seconds of every stage computed, excluding cached re-visits). "beats" means the interval
excludes zero and the mean gain exceeds the seed-to-seed sd of the per-seed gains.

    python bench/quality.py --quick     # ~10 min on a 2-core CPU: the default vs random, 2 families, 1 seed
    python bench/quality.py             # the table in bench/RESULTS.md (4 families, 6 methods, 3 seeds,
                                        # 64 rows, 3 epochs: ~60 LoRA runs and LESS's gradient
                                        # features, ~4 h on 2 idle CPU cores; cached, so reruns are cheap)

Outputs under `--out` (default bench/out/quality[-quick]): the pool and targets (built once; a
rerun with other pool settings is refused), selections per budget and runs per training setting
(cached: a rerun trains and evaluates only what is missing), results.json and table.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = next((p / "shared" / "data" for p in (REPO.parent, REPO.parent.parent)
               if (p / "shared" / "data" / "pool").is_dir()),
              REPO.parent / "shared" / "data")   # not shipped: ../shared/data, or --data DIR
FAMILIES = {   # name -> (where the rows come from, file)
    "gsm8k": ("eval", "gsm8k_test.jsonl"),
    "mbpp": ("eval", "mbpp_test.jsonl"),
    "t0_heldout": ("eval", "t0_p3_heldout.jsonl"),
    "hh_rlhf": ("source", "hh_rlhf_harmless_base_test_chosen.jsonl"),
    "self_instruct": ("source", "self_instruct_seed_tasks.jsonl"),
}
METHODS = {   # label -> (method, params); random is always run
    "rds": ("rds", {"vectors": "hidden", "max_share": 1.0}),           # RDS+ as published
    "rds-cap50": ("rds", {"vectors": "hidden", "max_share": 0.5}),
    "rds-cap25": ("rds", {"vectors": "hidden", "max_share": 0.25}),
    "rds-embed": ("rds", {"vectors": "embed", "max_share": 1.0}),
    "rds-embed-cap50": ("rds", {"vectors": "embed", "max_share": 0.5}),     # the --target default
    "rds-embed-cap25": ("rds", {"vectors": "embed", "max_share": 0.25}),   # an earlier default
    "less": ("less", {"epochs": 2}),        # LESS gradient features, 2 warm-up checkpoints (LESS: 4)
    "less-cap50": ("less", {"epochs": 2, "max_share": 0.5}),
    "less-cap50-short4": ("less", {"epochs": 2, "max_share": 0.5, "shortlist": 4}),
    "less-cap50-short2": ("less", {"epochs": 2, "max_share": 0.5, "shortlist": 2}),
}
QUICK = {"families": ["t0_heldout", "self_instruct"], "methods": ["less-cap50"],
         "per_source": 12, "budget": 24, "seeds": 1, "targets": 16, "eval": 32, "epochs": 2}


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def slim(r: dict) -> dict:
    keep = {k: r[k] for k in ("id", "source", "capability", "messages", "text") if k in r}
    return keep


def build(a, out: Path) -> dict:
    """Pool rows, and per family target and eval rows; written once (a rerun reuses them)."""
    info_path = out / "build.json"
    key = {"data": str(a.data), "per_source": a.per_source, "families": sorted(a.families),
           "targets": a.targets, "eval": a.eval, "data_seed": a.data_seed}
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if info.get("key") != key:
            raise SystemExit(f"error: {out} holds a pool built with {info.get('key')}; this run "
                             f"asks for {key}: pass another --out")
        return info
    rng = random.Random(a.data_seed)
    held_out = {FAMILIES[f][1] for f in a.families if FAMILIES[f][0] == "source"}
    pool = []
    for path in sorted((a.data / "pool").glob("*.jsonl")):
        if path.name in held_out:
            continue
        rows = read_jsonl(path)
        pool += [slim(r) for r in rng.sample(rows, min(a.per_source, len(rows)))]
    rng.shuffle(pool)
    write_jsonl(out / "rows.jsonl", pool)
    fams = {}
    for fam in a.families:
        where, name = FAMILIES[fam]
        rows = read_jsonl(a.data / where.replace("source", "pool") / name)
        rng.shuffle(rows)
        if len(rows) < a.targets + a.eval:
            raise SystemExit(f"error: family {fam} has {len(rows)} rows, needs {a.targets + a.eval}")
        write_jsonl(out / "targets" / f"{fam}.jsonl", [slim(r) for r in rows[:a.targets]])
        write_jsonl(out / "eval" / f"{fam}.jsonl", [slim(r) for r in rows[a.targets:a.targets + a.eval]])
        fams[fam] = {"from": f"{where}/{name}", "targets": a.targets, "eval": a.eval}
    from thresher.pipeline.io.ingest import ingest

    ingest([out / "rows.jsonl"], out / "pool", rows_per_shard=256)
    info = {"key": key, "pool_rows": len(pool), "held_out_sources": sorted(held_out),
            "families": fams}
    info_path.write_text(json.dumps(info, indent=1))
    return info


def selection_cost(manifest: dict) -> float:
    """Seconds of the stages this selection computed (cached re-visits cost nothing)."""
    return round(sum(s["seconds"] for s in manifest["stages"]
                     if not s.get("cached") or s["stage"] in ("score", "select", "write")), 2)


def selections_dir(a, out: Path) -> Path:
    """Where the selections of this budget and token limit live (shared by every method)."""
    return out / "selections" / f"b{a.budget}-t{a.max_tokens}"


def select_all(a, out: Path) -> dict:
    from thresher.pipeline.io.pool import Pool
    from thresher.pipeline.select import run_select

    source_of = dict(Pool(out / "pool").frame(["id", "source"]).iter_rows())
    chosen = {}
    for label in a.methods:
        method, params = METHODS[label]
        for fam in a.families:
            dst = selections_dir(a, out) / f"{label}@{fam}.jsonl"
            man = Path(f"{dst}.manifest.json")
            if not man.exists():
                run_select(out / "pool", method, str(a.budget), dst, workdir=out / "work",
                           params={**params, "max_tokens": a.max_tokens},
                           targets=[str(out / "targets" / f"{fam}.jsonl")])
            m = json.loads(man.read_text())
            srcs = [source_of[r["id"]] for r in read_jsonl(dst)]
            top = max(set(srcs), key=srcs.count)
            chosen[(label, fam)] = {"path": dst, "seconds": selection_cost(m), "rows": len(srcs),
                                    "top_source": top, "top_share": round(srcs.count(top) / len(srcs), 3),
                                    "guard": m["config"]["method"].get("guard")}
    return chosen


def train_eval(rows: list[dict], run_dir: Path, seed: int, evals: dict[str, list[dict]], a) -> dict:
    """Train (cached by the trainer) and evaluate on each eval set (cached in run_dir)."""
    from thresher.pipeline.training.evaluate import heldout_loss
    from thresher.pipeline.training.train import TrainConfig, load_trained, train

    cfg = TrainConfig(epochs=a.epochs, max_tokens=a.max_tokens, seed=seed, batch_size=8)
    summary = train(rows, run_dir, cfg, progress=False)
    cache = run_dir / "quality_evals.json"
    saved = json.loads(cache.read_text()) if cache.exists() else {}
    todo = {e: r for e, r in evals.items()
            if saved.get(e, {}).get("ids") != [x["id"] for x in r]}
    if todo:
        model, tok = load_trained(run_dir, None, merge=True)
        for e, r in todo.items():
            saved[e] = {"ids": [x["id"] for x in r], **heldout_loss(model, tok, r, a.max_tokens)}
        del model
        cache.write_text(json.dumps(saved))
    gc.collect()       # one process trains dozens of models: give their memory back
    return {"train_seconds": summary["seconds"], "evals": saved}


def eval_sets(out: Path, families: list[str]) -> dict[str, list[dict]]:
    """Each family's eval rows in the pool's canonical form (what the trainer and engine read)."""
    from thresher.pipeline.io.pool import load_rows

    return {f: load_rows(out / "eval" / f"{f}.jsonl")[0] for f in families}


def base_losses(evals: dict[str, list[dict]], a) -> dict:
    from thresher.pipeline.models.resolve import (
        DEFAULT_LM,
        load_causal_lm,
        load_tokenizer,
        pick_device,
        resolve,
    )
    from thresher.pipeline.training.evaluate import heldout_loss

    resolved = resolve(DEFAULT_LM)
    model, tok = load_causal_lm(resolved, pick_device(None)), load_tokenizer(resolved)
    return {e: heldout_loss(model, tok, r, a.max_tokens)["loss"] for e, r in evals.items()}


def run_all(a, out: Path, chosen: dict) -> dict:
    from thresher.pipeline.io.pool import Pool, load_rows
    from thresher.pipeline.training.verify import random_subset

    evals = eval_sets(out, a.families)
    pool = Pool(out / "pool")
    runs: dict = {}
    root = out / "runs" / f"b{a.budget}-e{a.epochs}-t{a.max_tokens}"   # one dir per setting
    for s in range(a.seeds):
        rand = random_subset(pool, a.budget, 1000 + s)
        runs[("random", s)] = train_eval(rand, root / "random" / f"seed-{s}", s, evals, a)
        for (label, fam), c in chosen.items():
            rows, _ = load_rows(c["path"])
            run_dir = root / f"{label}@{fam}" / f"seed-{s}"
            reuse_twin(run_dir, rows, root, fam, s, selections_dir(a, out))
            runs[(label, fam, s)] = train_eval(rows, run_dir, s, {fam: evals[fam]}, a)
    return runs


def reuse_twin(run_dir: Path, rows: list[dict], root: Path, fam: str, seed: int,
               selections: Path) -> None:
    """Two methods that picked the same rows (a cap that did not bind) train the same model: copy
    the finished run of any earlier method of this setting with the same rows (the trainer checks
    that it is the same run)."""
    import shutil

    if (run_dir / "train.json").exists():
        return
    ids = [r["id"] for r in rows]
    for twin in sorted(root.glob(f"*@{fam}/seed-{seed}")):
        picked = selections / f"{twin.parent.name}.jsonl"
        if twin != run_dir and (twin / "train.json").exists() and picked.exists() and \
                [json.loads(line)["id"] for line in picked.read_text().splitlines()] == ids:
            shutil.copytree(twin, run_dir)
            return


def compare(a, chosen: dict, runs: dict) -> list[dict]:
    from thresher.pipeline.training.significance import paired_bootstrap, seed_mean, spread

    table = []
    for (label, fam), c in chosen.items():
        per_m = [runs[(label, fam, s)]["evals"][fam] for s in range(a.seeds)]
        per_r = [runs[("random", s)]["evals"][fam] for s in range(a.seeds)]
        gains = [r["loss"] - m["loss"] for m, r in zip(per_m, per_r)]
        d = paired_bootstrap(seed_mean([r["row_loss"] for r in per_r]),
                             seed_mean([m["row_loss"] for m in per_m]),
                             weights=np.array(per_m[0]["row_tokens"], float), seed=0)
        gain, sd = float(np.mean(gains)), spread(gains)
        table.append({"family": fam, "method": label,
                      "loss": float(np.mean([m["loss"] for m in per_m])),
                      "loss_sd": spread([m["loss"] for m in per_m]),
                      "random_loss": float(np.mean([r["loss"] for r in per_r])),
                      "random_sd": spread([r["loss"] for r in per_r]),
                      "gain": gain, "gain_sd": sd, "ci": [d["lo"], d["hi"]],
                      "beats": bool(d["lo"] > 0 and gain > sd),
                      "worse": bool(d["hi"] < 0),
                      "top_source": c["top_source"], "top_share": c["top_share"],
                      "select_seconds": c["seconds"]})
    return table


def markdown(a, info: dict, table: list[dict], base: dict) -> str:
    head = (f"pool {info['pool_rows']} rows ({a.per_source} per source; held out: "
            f"{', '.join(info['held_out_sources']) or 'none'}), budget {a.budget} rows, "
            f"{a.seeds} seed(s), {a.epochs} epoch(s), max_tokens {a.max_tokens}, "
            f"{a.targets} target / {a.eval} eval rows per family")
    columns = ("| family | method | loss (sd) | random (sd) | gain over random (sd over seeds) "
               "| 95% CI (rows) | beats random | largest source (share) | selection s |")
    lines = [head, "", columns, "|---|---|---:|---:|---:|---:|---|---|---:|"]
    for r in table:
        verdict = "**yes**" if r["beats"] else ("worse" if r["worse"] else "no")
        lines.append(f"| {r['family']} (base {base[r['family']]:.3f}) | {r['method']} | "
                     f"{r['loss']:.4f} ({r['loss_sd']:.4f}) | {r['random_loss']:.4f} ({r['random_sd']:.4f}) | "
                     f"{r['gain']:+.4f} ({r['gain_sd']:.4f}) | [{r['ci'][0]:+.4f}, {r['ci'][1]:+.4f}] | "
                     f"{verdict} | {r['top_source']} ({r['top_share']:.0%}) | {r['select_seconds']:.0f} |")
    lines += ["", "| method | families beaten | worse than random |", "|---|---:|---:|"]
    for label in a.methods:
        rows = [r for r in table if r["method"] == label]
        lines.append(f"| {label} | {sum(r['beats'] for r in rows)} of {len(rows)} | "
                     f"{sum(r['worse'] for r in rows)} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few minutes: " + json.dumps(QUICK))
    ap.add_argument("--data", type=Path, default=SHARED)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--families", nargs="+", choices=sorted(FAMILIES),
                    default=["gsm8k", "t0_heldout", "hh_rlhf", "self_instruct"])
    ap.add_argument("--methods", nargs="+", choices=sorted(METHODS),
                    default=["rds-embed-cap25", "rds-embed-cap50", "rds-embed", "rds-cap25", "less",
                             "less-cap50"])
    ap.add_argument("--per-source", type=int, default=100)
    ap.add_argument("--budget", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--targets", type=int, default=32)
    ap.add_argument("--eval", type=int, default=48)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--data-seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.quick:
        for k, v in QUICK.items():
            setattr(a, k, v)
    a.out = a.out or Path("bench/out") / ("quality-quick" if a.quick else "quality")
    if not (a.data / "pool").is_dir():
        ap.error(f"{a.data}/pool not found: the shared data is needed (--data DIR)")
    return a


def main(argv=None) -> None:
    a = parse_args(argv)
    t0 = time.perf_counter()
    info = build(a, a.out)
    chosen = select_all(a, a.out)
    runs = run_all(a, a.out, chosen)
    base = base_losses(eval_sets(a.out, a.families), a)
    table = compare(a, chosen, runs)
    text = markdown(a, info, table, base)
    (a.out / "results.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(a).items()}, "build": info, "base": base,
         "table": table, "seconds": round(time.perf_counter() - t0, 1)}, indent=1))
    (a.out / "table.md").write_text(text)
    print(text + f"\n{time.perf_counter() - t0:.0f} s; {a.out / 'table.md'}")


if __name__ == "__main__":
    main()
