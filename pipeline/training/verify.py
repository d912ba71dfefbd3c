"""`thresher verify`: does a subset train a better model than a random one of the same size?

    report = run_verify(["rds.jsonl", "deita.jsonl"], ["gsm8k_test.jsonl"], out="verify-out")

For every subset (one per method, all of the same size), for a seeded random subset of that size
from the same pool, and optionally for the whole pool (`full=True`), train a LoRA adapter with
the same `TrainConfig` (`pipeline/training/train.py`); then evaluate each adapter and the untrained base
model on every eval set:
    loss / ppl     held-out NLL over the response tokens (token-weighted over rows), exp(loss)
    exact_match    greedy generation scored against the reference's final answer, for eval rows
                   whose reference carries one (GSM8K's `#### N`); the prediction is the number
                   after the generation's last `####`, else its last number.
With `reference=` (the CLI's `--base-model PRUNED`: the source recorded in its prune.json) that
untrained model is evaluated too, as the `original` row: the level a recovery aims at.
Both use the first `max_eval` rows of each eval set; generation stops at `max_new_tokens`
(0 = no generation). The pool comes from `<subset>.manifest.json` (inputs.pool, an absolute
path) or `pool=`; a pool whose fingerprint is not the manifest's is refused (`find_pool`).

Writes (`pipeline/training/verify_output.py`) OUT/verify.json, OUT/verify.md (the comparison
table, also returned) and OUT/verify.png when matplotlib is installed (it is not a dependency;
the table says when the plot is skipped), and (by `pipeline/run.verify_with_report`)
OUT/report.html: the table, loss curves and the subsets' report.
Trained runs live in OUT/runs/<name>/; a rerun reuses the finished ones and their evaluations
(RUN/evals.json, keyed by the run, the eval rows and the settings).

`seeds=K` (> 1) trains every subset K times (training seeds seed..seed+K-1) and draws the random
twin afresh for each seed; runs live in OUT/runs/<name>/seed-<s>/, each run's evals are the mean
over seeds with the spread (`loss_sd`, `exact_match_sd`), and `comparisons` holds, per subset and
eval set, the paired bootstrap interval over eval rows of (subset - random)
(`pipeline/training/significance.py`); the table calls a subset better or worse than random only when
that interval excludes zero.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from thresher.pipeline.artifacts import write_json_atomic
from thresher.pipeline.io.pool import check_rows_file, load_rows
from thresher.pipeline.training.evaluate import evaluate
from thresher.pipeline.training.train import TrainConfig, load_trained, train
from thresher.pipeline.training.verify_output import check_verify_outputs, write_results

log = logging.getLogger(__name__)



# ---------------------------------------------------------------- the comparison

def recorded_pool(subset: Path) -> tuple[Path, str | None] | None:
    """(pool path, its fingerprint) as the subset's manifest records them; None without one."""
    from thresher.pipeline.io.manifests import read_manifest, recorded_path

    manifest = Path(f"{subset}.manifest.json")
    if not manifest.exists():
        return None
    m = read_manifest(manifest)
    inputs = m.get("inputs")
    pool = inputs.get("pool") if isinstance(inputs, dict) else None
    if isinstance(pool, str) and pool:
        output = m.get("output") if isinstance(m.get("output"), str) else None
        return recorded_path(pool, manifest, output), inputs.get("pool_fingerprint")
    raise ValueError(f"{manifest}: no inputs.pool; pass --pool")


def find_pool(subsets: list[Path], pool: Path | str | None):
    """The pool the random baseline is drawn from: --pool, else the one the subsets' manifests
    name; refused when a subset was selected from a pool with another fingerprint."""
    from thresher.pipeline.io.pool import Pool

    recorded = [recorded_pool(s) for s in subsets]
    if pool is None:
        missing = [s for s, r in zip(subsets, recorded) if r is None]
        if missing:
            raise FileNotFoundError(f"{missing[0]}: no manifest {missing[0].name}.manifest.json "
                                    "to find its pool; pass --pool")
        paths = sorted({str(r[0].resolve()) for r in recorded})
        if len(paths) > 1:
            raise ValueError(f"subsets come from different pools {paths}; pass --pool to pick "
                             "the one to draw the random subset from")
        pool = paths[0]
    the_pool = Pool(pool)
    for s, r in zip(subsets, recorded):
        if r is not None and r[1] and r[1] != the_pool.fingerprint:
            raise ValueError(f"{the_pool.path}: fingerprint {the_pool.fingerprint} is not that "
                             f"of the pool {s} was selected from ({r[1]}): the pool was "
                             "re-ingested or is another one; the random baseline must come "
                             "from the subset's own pool")
    return the_pool


def random_subset(pool, n: int, seed: int) -> list[dict]:
    """A seeded uniform sample of n pool rows: the same selector as `--method random`."""
    from thresher.pipeline.budget import Budget
    from thresher.selectors.random_sample import RandomSelector

    if n > pool.n_rows:
        raise ValueError(f"subset has {n} rows but the pool only {pool.n_rows}")
    cands = pool.frame(["id"])
    chosen = RandomSelector().select(cands, Budget.parse(n), seed)
    return pool.rows(chosen["id"].to_list())


def _names(subsets: list[Path]) -> list[str]:
    names, seen = [], {}
    for s in subsets:
        base = s.name.split(".")[0]
        k = seen[base] = seen.get(base, 0) + 1
        names.append(base if k == 1 else f"{base}-{k}")
    reserved = {"base", "random", "full", "original"} & set(names)
    if reserved:
        raise ValueError(f"subset file names {sorted(reserved)} clash with the reference rows; rename them")
    return names


def run_verify(subsets: list[Path | str], evals: list[Path | str], out: Path | str,
               pool: Path | str | None = None, full: bool = False, seed: int = 0,
               cfg: TrainConfig | None = None, max_eval: int = 100, max_new_tokens: int = 256,
               progress: bool = True, reference: str | None = None, seeds: int = 1) -> dict:
    t_start = time.perf_counter()
    cfg = cfg or TrainConfig(seed=seed)
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    subsets = [Path(s) for s in subsets]
    if not subsets or not evals:
        raise ValueError("verify needs at least one --subset and one --eval")
    out = Path(out)
    names = _names(subsets)
    the_pool = find_pool(subsets, pool)
    check_verify_outputs(out, subsets, [Path(e) for e in evals], the_pool)
    for e in evals:
        check_rows_file(e, "--eval")

    quarantine: dict[str, int] = {}
    train_sets = _train_sets(subsets, names, quarantine)
    n = len(next(iter(train_sets.values())))
    train_sets["random"] = random_subset(the_pool, n, seed)
    if full:
        train_sets["full"] = list(the_pool.iter_rows())
    eval_sets = _eval_sets(evals, max_eval, quarantine)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"config": asdict(cfg), "seed": seed, "pool": str(the_pool.path.resolve()),
                    "pool_fingerprint": the_pool.fingerprint,
                    "subset_rows": n, "max_eval": max_eval, "max_new_tokens": max_new_tokens,
                    "seeds": [seed + k for k in range(seeds)],
                    "subsets": {nm: str(s) for nm, s in zip(names, subsets)},
                    "quarantined": quarantine, "runs": {}}
    device = _untrained_runs(report, cfg, eval_sets, reference, max_new_tokens)
    for name, rows in train_sets.items():
        per_seed = [_trained_run(out, name, rows, s, seed, seeds, cfg, the_pool, eval_sets,
                                 max_new_tokens, device, progress) for s in report["seeds"]]
        report["runs"][name] = per_seed[0] if seeds == 1 else _over_seeds(per_seed, report["seeds"])
        write_json_atomic(out / "verify.json", report)   # partial results survive a kill
    report["comparisons"] = compare_to_random(report)
    report["seconds"] = round(time.perf_counter() - t_start, 2)
    return write_results(report, out)


def _train_sets(subsets: list[Path], names: list[str], quarantine: dict) -> dict[str, list[dict]]:
    """Each subset's rows (unreadable rows counted in `quarantine`), all of one size."""
    train_sets: dict[str, list[dict]] = {}
    for name, s in zip(names, subsets):
        rows, bad = load_rows(s)
        train_sets[name] = rows
        quarantine[str(s)] = len(bad)
        if bad:
            log.warning("%s: %d rows quarantined, e.g. %s: %s", s, len(bad), bad[0]["location"],
                        bad[0]["reason"])
    sizes = {str(s): len(train_sets[n]) for n, s in zip(names, subsets)}
    if len(set(sizes.values())) > 1:
        raise ValueError("subsets differ in size, so the comparison is not at equal budget: "
                         + ", ".join(f"{k}={v}" for k, v in sizes.items()))
    return train_sets


def _eval_sets(evals: list, max_eval: int, quarantine: dict) -> dict[str, list[dict]]:
    eval_sets: dict[str, list[dict]] = {}
    for e in evals:
        rows, bad = load_rows(e)
        name = Path(e).name.split(".")[0]
        if name in eval_sets:
            raise ValueError(f"two eval sets are named {name!r}; rename one")
        eval_sets[name] = rows[:max_eval]
        quarantine[str(e)] = len(bad)
    return eval_sets


def _untrained_runs(report: dict, cfg: TrainConfig, eval_sets: dict, reference: str | None,
                    max_new_tokens: int) -> str:
    """The base model's evals (and an untrained `reference`'s, e.g. the unpruned model a pruned
    base came from) into `report["runs"]`; returns the device."""
    from thresher.pipeline.models.resolve import (
        load_causal_lm,
        load_tokenizer,
        pick_device,
        resolve,
    )

    device = pick_device(cfg.device)
    tok = load_tokenizer(resolve(cfg.model))
    for name, model in (("base", cfg.model), ("original", reference)):
        if model is None:
            continue
        lm = load_causal_lm(resolve(model), device)
        t0 = time.perf_counter()
        report["runs"][name] = {"rows": 0, **({"model": model} if name == "original" else {}),
                                "evals": evaluate(lm, tok, eval_sets, cfg.max_tokens,
                                                  max_new_tokens),
                                "eval_seconds": round(time.perf_counter() - t0, 2)}
        del lm
    return device


def _trained_run(out: Path, name: str, rows: list[dict], s: int, seed: int, seeds: int,
                 cfg: TrainConfig, the_pool, eval_sets: dict, max_new_tokens: int, device: str,
                 progress: bool) -> dict:
    """Train on one set at seed `s` (random's rows drawn again per seed) and evaluate it."""
    run_rows = random_subset(the_pool, len(rows), s) if name == "random" and s != seed else rows
    run_dir = out / "runs" / name if seeds == 1 else out / "runs" / name / f"seed-{s}"
    summary = train(run_rows, run_dir, replace(cfg, seed=s) if seeds > 1 else cfg,
                    progress=progress)
    t0 = time.perf_counter()
    evals = _cached_evals(run_dir, summary, eval_sets, cfg.max_tokens, max_new_tokens, device)
    return {"rows": len(run_rows), "trained_rows": summary["trained_rows"],
            "steps": summary["steps"], "train_tokens": summary["train_tokens"],
            "first_loss": summary["first_loss"], "final_loss": summary["final_loss"],
            "train_seconds": summary["seconds"], "evals": evals,
            "eval_seconds": round(time.perf_counter() - t0, 2)}


def _cached_evals(run_dir: Path, summary: dict, eval_sets: dict, max_tokens: int,
                  max_new_tokens: int, device: str) -> dict:
    """A trained run's evals, reused from RUN/evals.json when the run, the eval rows and the
    settings are unchanged (a rerun adding one subset re-evaluates only the new runs)."""
    from thresher.pipeline.artifacts import config_key

    key = config_key(summary["run_key"], {n: [r["id"] for r in rows] for n, rows in eval_sets.items()},
                     eval_sets, max_tokens, max_new_tokens)
    cache = run_dir / "evals.json"
    if cache.exists():
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            return saved["evals"]
    model, tok = load_trained(run_dir, device, merge=True)
    evals = evaluate(model, tok, eval_sets, max_tokens, max_new_tokens)
    del model
    write_json_atomic(cache, {"key": key, "evals": evals})
    return evals


def _over_seeds(per_seed: list[dict], seeds: list[int]) -> dict:
    """One run's record over K seeds: the first seed's fields, evals averaged with their spread
    and per-row values averaged over seeds; every seed's record under `per_seed`."""
    from thresher.pipeline.training.significance import seed_mean, spread

    rec = {k: v for k, v in per_seed[0].items() if k != "evals"}
    rec["train_seconds"] = round(sum(r["train_seconds"] for r in per_seed), 2)
    rec["eval_seconds"] = round(sum(r["eval_seconds"] for r in per_seed), 2)
    rec["evals"] = {}
    for e, first in per_seed[0]["evals"].items():
        evs = [r["evals"][e] for r in per_seed]
        ev = {**first, "loss": float(np.mean([x["loss"] for x in evs])),
              "loss_sd": spread([x["loss"] for x in evs]),
              "row_loss": [None if not np.isfinite(v) else float(v)
                           for v in seed_mean([x["row_loss"] for x in evs])]}
        ev["ppl"] = math.exp(ev["loss"])
        if "exact_match" in first:
            ev["exact_match"] = float(np.mean([x["exact_match"] for x in evs]))
            ev["exact_match_sd"] = spread([x["exact_match"] for x in evs])
            ev["correct"] = round(float(np.mean([x["correct"] for x in evs])), 2)
            ev["row_correct"] = seed_mean([x["row_correct"] for x in evs]).tolist()
        rec["evals"][e] = ev
    rec["seeds"] = seeds
    rec["per_seed"] = [{**r, "evals": {e: {k: v for k, v in ev.items() if not k.startswith("row_")}
                                       for e, ev in r["evals"].items()}} for r in per_seed]
    return rec


def compare_to_random(report: dict) -> dict:
    """Per subset and eval set: paired bootstrap over eval rows of (subset - random), for the
    held-out loss (token-weighted; lower is better) and exact match where there is one."""
    from thresher.pipeline.training.significance import paired_bootstrap, verdict

    rand = report["runs"]["random"]["evals"]
    out: dict = {}
    for name, run in report["runs"].items():
        if name in ("base", "random", "full"):
            continue
        for e, ev in run["evals"].items():
            a = np.array([np.nan if v is None else v for v in ev["row_loss"]])
            b = np.array([np.nan if v is None else v for v in rand[e]["row_loss"]])
            d = paired_bootstrap(a, b, weights=ev["row_tokens"], seed=report["seed"])
            res = {"loss": {**d, "verdict": verdict(d, lower_is_better=True)}}
            if "row_correct" in ev and "row_correct" in rand[e]:
                m = paired_bootstrap(np.array(ev["row_correct"], float),
                                     np.array(rand[e]["row_correct"], float), seed=report["seed"])
                res["exact_match"] = {**m, "verdict": verdict(m, lower_is_better=False)}
            out.setdefault(name, {})[e] = res
    return out
