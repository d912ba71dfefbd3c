"""Run a recipe: ingest, one plan for every selection's stages, the selections, verify, report.

    summary = run_recipe(load_recipe("data/recipes/sample.yaml"))     # `thresher run RECIPE`

A run is a list of steps, and `thresher run` (this module's `run_recipe`) and the Prefect flow
(`flows/recipe_flow.py`) execute the same steps with the same functions:

    ingest_step       sources -> OUT/pool; unchanged input files are copied, not read again
    plan_of           every selection's needs resolved into ONE plan (stages deduplicated: two
                      selections over MiniLM embeddings share one embedding pass)
    stage_step        one stage of that plan (only its units not cached run, so a pool that
                      gained a file computes the new file's shards alone)
    selection_step    score, cut, write OUT/<name>/..., its manifest and dataset card
    verify_step       optional: `thresher verify` of the chosen subsets
    report_step       optional: the HTML report (pipeline/report/build.py, when installed)

Steps exchange paths and fingerprints only; each one reopens the pool and rebuilds the plan
(cheap: nothing is computed or loaded for it), so a step can run in another process.
Everything lands under the recipe's `out`: `pool/`, `.thresher-work/` (artifacts), one folder
per selection, `verify/`, `report.html` and `run.json` (every step's statistics); those paths and
the output guard over them (`check_recipe`, before the first step) are in
`pipeline/recipe_outputs.py`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thresher.pipeline import logs
from thresher.pipeline.artifacts import ArtifactStore, write_json_atomic
from thresher.pipeline.recipe import Recipe, SelectionSpec
from thresher.pipeline.recipe_outputs import (
    card_location,
    check_recipe,
    own_outputs,
    pool_dir,
    subset_path,
    workdir,
)

# ------------------------------------------------------------------ steps

def ingest_step(recipe: Recipe, progress=None) -> dict:
    from thresher.pipeline.io.ingest import ingest

    t0 = time.perf_counter()
    rep = ingest([Path(s) for s in recipe.sources], pool_dir(recipe), shape=recipe.ingest.format,
                 rows_per_shard=recipe.ingest.rows_per_shard, progress=progress, reuse=True,
                 exclude=own_outputs(recipe))
    return {"step": "ingest", "pool": str(pool_dir(recipe)), "fingerprint": rep.fingerprint,
            "skipped": len(rep.skipped),
            "files": len(rep.inputs), "files_reused": len(rep.reused),
            "files_read": len(rep.inputs) - len(rep.reused),
            "read_now": sum(i.read for i in rep.inputs if not i.reused),
            "read": rep.read, "kept": rep.kept, "quarantined": rep.quarantined,
            "duplicate_ids": rep.duplicate_ids, "removed": rep.removed,
            "seconds": round(time.perf_counter() - t0, 3)}


@dataclass
class Planned:
    """A recipe resolved against its pool: each selection prepared, and their union plan."""

    recipe: Recipe
    pool: Any
    store: ArtifactStore
    preps: dict[str, Any]    # selection name -> select.Prepared
    plan: Any                # plan.Plan over every selection's needs


def plan_of(recipe: Recipe, device: str | None = None, read_only: bool = False) -> Planned:
    from thresher.pipeline.budget import Budget
    from thresher.pipeline.io.pool import Pool
    from thresher.pipeline.plan import make_plan
    from thresher.pipeline.select import prepare

    pool = Pool(pool_dir(recipe))
    preps = {}
    for s in recipe.selections:
        budget = Budget.parse(s.budget) if s.budget is not None else None
        preps[s.name] = prepare(pool, s.method, s.params, s.selector, s.targets,
                                _seed(recipe, s), device, budget)
    roots = [st for p in preps.values() for st in p.plan.roots]
    plan = make_plan(roots, next(iter(preps.values())).request.device)
    store = ArtifactStore(workdir(recipe), read_only)
    if not read_only:
        logs.log_to(store.root)      # the CLI's log file (library warnings, INFO lines)
    return Planned(recipe, pool, store, preps, plan)


def _seed(recipe: Recipe, sel: SelectionSpec) -> int:
    return recipe.seed if sel.seed is None else sel.seed


def stage_step(planned: Planned, index: int, executor) -> dict:
    """Run stage `index` of the plan (its dependencies are earlier stages, already done)."""
    from thresher.pipeline.plan import run_stage_at

    stats = run_stage_at(planned.plan, index, planned.pool, planned.store, executor)
    return {"step": "stage", "index": index, "describe": planned.plan.stages[index].describe(),
            **stats.as_dict()}


def selection_step(planned: Planned, name: str, stage_stats: list[dict],
                   executor: str = "local") -> dict:
    """Score and cut one selection on the plan's (cached) outputs; write subset, manifest, card."""
    from thresher.pipeline.io.card import write_card
    from thresher.pipeline.select import run_select

    recipe = planned.recipe
    sel = recipe.selection(name)
    among = None
    if sel.from_ is not None:
        import polars as pl

        src = subset_path(recipe, recipe.selection(sel.from_))
        among = pl.read_parquet(src.with_name(src.name + ".selection.parquet"),
                                columns=["id"])["id"].to_list()
    out = subset_path(recipe, sel)
    out.parent.mkdir(parents=True, exist_ok=True)
    m = run_select(planned.pool.path, sel.method, sel.budget, out, fmt=sel.format,
                   seed=_seed(recipe, sel), workdir=planned.store.root, params=sel.params,
                   selector=sel.selector, targets=sel.targets, executor=executor,
                   among=among, ran=_ran_by_key(stage_stats),
                   label={"name": name, "recipe": recipe.name}, annotate_only=sel.annotate_only)
    c = m["counts"]
    if sel.annotate_only:
        return {"step": "annotate", "name": name, "method": sel.method, "output": str(out),
                "rows": c["scored"], "keep": c.get("keep"), "seconds": m["timings"]["total"]}
    folder, files = card_location(recipe, sel)
    write_card(folder, m, files)
    return {"step": "select", "name": name, "method": sel.method, "output": str(out),
            "candidates": c.get("eligible", c["candidates"]), "selected": c["selected"],
            "seconds": m["timings"]["total"]}


def _ran_by_key(stage_stats: list[dict]) -> dict[str, dict]:
    """Statistics of the stages this run computed, by stage and config (for the manifests)."""
    from thresher.pipeline.select import stage_key

    return {stage_key(s["stage"], s["config"]): s for s in stage_stats}


def verify_with_report(subsets, eval_files, out: Path, **kw) -> dict:
    """`run_verify`, then its HTML report in OUT/report.html (the map from cached embeddings
    only: verify never embeds for a picture); the report's path is `["report"]`."""
    from thresher.pipeline.report.build import write_report
    from thresher.pipeline.training.verify import run_verify

    report = run_verify(subsets, eval_files, out, **kw)
    report["report"] = str(write_report([out], out / "report.html", compute_embeddings=False))
    return report


def verify_step(recipe: Recipe) -> dict | None:
    if recipe.verify is None:
        return None
    from thresher.pipeline.io.card import write_card
    from thresher.pipeline.training.train import TrainConfig
    v = recipe.verify
    names = v.selections or [s.name for s in recipe.selections]
    subsets = [subset_path(recipe, recipe.selection(n)) for n in names]
    out = Path(recipe.out) / "verify"
    report = verify_with_report(subsets, v.eval, out, full=v.full, seed=recipe.seed,
                                cfg=TrainConfig(seed=recipe.seed, **v.train), max_eval=v.max_eval,
                                max_new_tokens=v.max_new_tokens)
    table = report["markdown"]
    for n in names:   # the cards of verified subsets gain the verify table
        sel = recipe.selection(n)
        path = subset_path(recipe, sel)
        manifest = json.loads(Path(f"{path}.manifest.json").read_text())
        folder, files = card_location(recipe, sel)
        write_card(folder, manifest, files, verify_md=table)
    return {"step": "verify", "out": str(out), "subsets": names, "seconds": report["seconds"]}


def report_step(recipe: Recipe) -> dict | None:
    if recipe.report is None:
        return None
    from thresher.pipeline.report.build import write_report

    t0 = time.perf_counter()
    runs = [subset_path(recipe, s) for s in recipe.selections]
    if recipe.verify is not None:
        runs.append(Path(recipe.out) / "verify")
    write_report(runs, Path(recipe.report.out))
    return {"step": "report", "out": recipe.report.out,
            "seconds": round(time.perf_counter() - t0, 3)}


def finish(recipe: Recipe, steps: list[dict], t_start: float, executor: str) -> dict:
    summary = {"recipe": recipe.name, "out": recipe.out, "executor": executor,
               "steps": [s for s in steps if s],
               "seconds": round(time.perf_counter() - t_start, 3)}
    write_json_atomic(Path(recipe.out) / "run.json", summary)
    return summary


# ------------------------------------------------------------------ the local runner

def run_recipe(recipe: Recipe, executor: str = "local", ray_address: str | None = None,
               device: str | None = None, echo=None) -> dict:
    """Run every step in this process (no Prefect, no server); returns run.json's content."""
    from thresher.pipeline.executors import make_executor

    echo = echo or (lambda line: None)
    t_start = time.perf_counter()
    run_with = make_executor(executor, ray_address)
    check_recipe(recipe)
    steps = [ingest_step(recipe)]
    echo(describe_step(steps[-1]))
    planned = plan_of(recipe, device)
    stage_stats = []
    for i in range(len(planned.plan.stages)):
        stage_stats.append(stage_step(planned, i, run_with))
        echo(describe_step(stage_stats[-1]))
    steps += stage_stats
    for sel in recipe.selections:
        steps.append(selection_step(planned, sel.name, stage_stats, executor))
        echo(describe_step(steps[-1]))
    for extra in (verify_step(recipe), report_step(recipe)):
        if extra:
            steps.append(extra)
            echo(describe_step(extra))
    return finish(recipe, steps, t_start, executor)


def dry_run_lines(recipe: Recipe, device: str | None = None) -> list[str]:
    """The steps a run would take and, once the pool exists, the plan with what is cached; a
    mistake a run would meet before its first step is raised here the same."""
    check_recipe(recipe)
    lines = [f"recipe {recipe.name} -> {recipe.out}",
             f"ingest {len(recipe.sources)} source(s) -> {pool_dir(recipe)}"]
    if (pool_dir(recipe) / "pool.json").exists():
        planned = plan_of(recipe, device, read_only=True)
        lines += ["plan (the pool as last ingested):"] + \
            ["  " + line for line in planned.plan.show(planned.pool, planned.store)]
    else:
        lines.append("plan: after the first ingest (no pool yet)")
    lines += [(f"annotate {s.name}: {s.method}" if s.annotate_only else
               f"select {s.name}: {s.method}, budget {s.budget}")
              + (f", among {s.from_}" if s.from_ else "") + f" -> {subset_path(recipe, s)}"
              for s in recipe.selections]
    if recipe.verify:
        lines.append(f"verify {', '.join(recipe.verify.selections or [s.name for s in recipe.selections])}")
    if recipe.report:
        lines.append(f"report -> {recipe.report.out}")
    return lines


def describe_step(s: dict) -> str:
    """One line per step for the CLI and the flow's log."""
    if s["step"] == "ingest":
        gone = "".join(f"; removed {r['path']} ({r['kept']} rows dropped)" for r in s["removed"])
        skipped = f"; {s['skipped']} files found and not read (see pool.json)" \
            if s.get("skipped") else ""
        return (f"ingest: {s['files']} files ({s['files_reused']} unchanged, reused; "
                f"{s['files_read']} read: {s['read_now']} rows) -> {s['kept']} rows kept, "
                f"{s['quarantined']} quarantined{gone}{skipped} [{s['seconds']:.1f}s]")
    if s["step"] == "stage":
        units = s["units_computed"] + s["units_cached"]
        how = "cached" if s["cached"] else (
            f"{s['units_computed']} of {units} units computed ({s['rows_computed']} rows), "
            f"{s['units_cached']} cached")
        return f"stage {s['describe']}: {how} [{s['seconds']:.1f}s]"
    if s["step"] == "select":
        return (f"select {s['name']} ({s['method']}): {s['selected']} of {s['candidates']} -> "
                f"{s['output']} [{s['seconds']:.1f}s]")
    if s["step"] == "annotate":
        kept = f", {s['keep']} keep" if s.get("keep") is not None else ""
        return (f"annotate {s['name']} ({s['method']}): {s['rows']} rows{kept} -> {s['output']} "
                f"[{s['seconds']:.1f}s]")
    if s["step"] == "verify":
        return f"verify {', '.join(s['subsets'])} -> {s['out']} [{s['seconds']:.1f}s]"
    if s.get("skipped"):
        return f"report: skipped ({s['skipped']})"
    return f"report -> {s['out']} [{s['seconds']:.1f}s]"
