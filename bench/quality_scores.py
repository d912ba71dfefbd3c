"""Does selecting by a quality score train a better model than random rows? (issue 24)

The quality benchmark of `bench/quality.py` (the same mixed pool, eval families, LoRA trainer and
statistics), for scores that need no target set: each method selects `--budget` rows once, the
subset and a random subset of the same size (a fresh one per seed) are LoRA-trained with `--seeds`
seeds, and every family's eval rows score both by held-out response loss.

    dclm-ft     fastText (DCLM's recipe) trained on this pool: instruction responses vs web text
    edu-lm      LM rating, FineWeb-Edu's educational-value rubric (SmolLM2-135M-Instruct)
    deita-lm    LM rating, DEITA's complexity x quality rubric (SmolLM2-135M-Instruct)
    edu-head    the FineWeb-Edu recipe: half the pool rated on the edu rubric, a linear
                regression head on MiniLM vectors trained on the ratings, the pool scored by it

Every method keeps its top `--budget` rows (`cut=top`). Per (family, method): loss mean and sd
over seeds, the gain over random (random minus method: positive is better), the paired bootstrap
95% interval over eval rows, "beats" as in bench/quality.py.

    python bench/quality_scores.py           # the reduced configuration recorded in RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import quality as qb  # bench/quality.py (this script's folder): pool, trainer, evaluation

METHODS = {
    "dclm-ft": ("classifier", {"cut": "top"}),
    "edu-lm": ("lm-rating", {"rubric": "edu", "cut": "top"}),
    "deita-lm": ("lm-rating", {"rubric": "deita", "cut": "top"}),
    "edu-head": ("classifier", {"cut": "top"}),
}


def train_classifiers(a, out: Path) -> dict[str, Path]:
    """The two classifiers, trained on this benchmark's pool (cached by their directories)."""
    models = {"dclm-ft": out / "classifiers" / "dclm-ft", "edu-head": out / "classifiers" / "edu-head"}
    args = {"dclm-ft": ["--kind", "fasttext", "--label", "kind=chat", "--part", "response"],
            "edu-head": ["--kind", "head", "--rate", "edu", "--rate-sample", "0.5",
                         "--rate-max-tokens", str(a.rate_tokens)]}
    for name, path in models.items():
        if not (path / "classifier.json").exists():
            import subprocess

            r = subprocess.run([sys.executable, "-m", "thresher.pipeline.cli", "classifier",
                                "train", "--out", str(path), "--pool", str(out / "pool"),
                                "--workdir", str(out / "work"), *args[name]],
                               capture_output=True, text=True, check=False)
            if r.returncode:
                raise SystemExit(f"classifier {name}: {r.stderr.strip()}")
            print(r.stdout, flush=True)
    return models


def select_all(a, out: Path, models: dict) -> dict:
    from thresher.pipeline.io.pool import Pool
    from thresher.pipeline.select import run_select

    source_of = dict(Pool(out / "pool").frame(["id", "source"]).iter_rows())
    chosen = {}
    for label in a.methods:
        method, params = METHODS[label]
        params = dict(params)
        if method == "classifier":
            params["model"] = str(models[label])
        else:
            params["max_tokens"] = a.rate_tokens
        dst = out / "selections" / f"b{a.budget}" / f"{label}.jsonl"
        man = Path(f"{dst}.manifest.json")
        if not man.exists():
            run_select(out / "pool", method, str(a.budget), dst, workdir=out / "work", params=params)
        m = json.loads(man.read_text())
        srcs = [source_of[r["id"]] for r in qb.read_jsonl(dst)]
        top = max(sorted(set(srcs)), key=srcs.count)     # ties: the first name
        chosen[label] = {"path": dst, "seconds": qb.selection_cost(m), "rows": len(srcs),
                         "top_source": top, "top_share": round(srcs.count(top) / len(srcs), 3)}
    return chosen


def run_all(a, out: Path, chosen: dict) -> dict:
    from thresher.pipeline.io.pool import Pool, load_rows
    from thresher.pipeline.training.verify import random_subset

    evals = qb.eval_sets(out, a.families)
    pool = Pool(out / "pool")
    root = out / "runs" / f"b{a.budget}-e{a.epochs}-t{a.max_tokens}"
    runs = {}
    for s in range(a.seeds):
        rand = random_subset(pool, a.budget, 1000 + s)
        runs[("random", s)] = qb.train_eval(rand, root / "random" / f"seed-{s}", s, evals, a)
        for label, c in chosen.items():
            rows, _ = load_rows(c["path"])
            runs[(label, s)] = qb.train_eval(rows, root / label / f"seed-{s}", s, evals, a)
            print(f"  trained {label} seed {s}", flush=True)
    return runs


def compare(a, chosen: dict, runs: dict) -> list[dict]:
    from thresher.pipeline.training.significance import paired_bootstrap, seed_mean, spread

    table = []
    for fam in a.families:
        for label, c in chosen.items():
            per_m = [runs[(label, s)]["evals"][fam] for s in range(a.seeds)]
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
                          "beats": bool(d["lo"] > 0 and gain > sd), "worse": bool(d["hi"] < 0),
                          "top_source": c["top_source"], "top_share": c["top_share"],
                          "select_seconds": c["seconds"]})
    return table


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=qb.SHARED)
    ap.add_argument("--out", type=Path, default=Path("bench/out/quality-scores"))
    ap.add_argument("--families", nargs="+", choices=sorted(qb.FAMILIES),
                    default=["gsm8k", "t0_heldout", "hh_rlhf", "self_instruct"])
    ap.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(METHODS))
    ap.add_argument("--per-source", type=int, default=24)
    ap.add_argument("--budget", type=int, default=32)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--targets", type=int, default=16, help="unused by these methods; the "
                    "shared pool builder splits them off each family")
    ap.add_argument("--eval", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--rate-tokens", type=int, default=768, help="LM-rating prompt length cap")
    ap.add_argument("--data-seed", type=int, default=0)
    a = ap.parse_args(argv)
    if not (a.data / "pool").is_dir():
        ap.error(f"{a.data}/pool not found: the shared data is needed (--data DIR)")
    return a


def main(argv=None) -> None:
    a = parse_args(argv)
    t0 = time.perf_counter()
    info = qb.build(a, a.out)
    models = train_classifiers(a, a.out)
    chosen = select_all(a, a.out, models)
    print({k: {"top_source": v["top_source"], "share": v["top_share"], "s": v["seconds"]}
           for k, v in chosen.items()}, flush=True)
    runs = run_all(a, a.out, chosen)
    base = qb.base_losses(qb.eval_sets(a.out, a.families), a)
    table = compare(a, chosen, runs)
    text = qb.markdown(a, info, table, base)
    (a.out / "results.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(a).items()}, "build": info, "base": base,
         "table": table, "seconds": round(time.perf_counter() - t0, 1)}, indent=1))
    (a.out / "table.md").write_text(text)
    print(text + f"\n{time.perf_counter() - t0:.0f} s; {a.out / 'table.md'}")


if __name__ == "__main__":
    main()
