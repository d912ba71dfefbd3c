"""Run one selection: method parameters -> needs -> plan -> executor -> scores -> selector -> files.

    m = run_select("out/pool", "semdedup", "50%", "out/dedup.jsonl", params={"eps": 0.1})
    lines = run_select(..., dry_run=True)["plan"]          # the plan, with what is cached

The CLI, `thresher run` (recipes), the Prefect flows and library users all call this; nothing
else decides what runs. The manifest (built by `pipeline/manifest.py`) records the plan's
per-stage statistics (rows, tokens, seconds, device, FLOPs, cached), the method's parameters and
notes, the selector, the model identities, and the counts, so each selection states what it cost.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
from thresher.pipeline import logs, registry
from thresher.pipeline.artifacts import ArtifactStore, write_json_atomic
from thresher.pipeline.budget import Budget
from thresher.pipeline.executors import make_executor
from thresher.pipeline.io.cachefiles import cache_guard
from thresher.pipeline.io.card import write_card
from thresher.pipeline.io.guard import (
    check_outputs,
    check_replace_dir,
    check_workdir,
    file_output,
)
from thresher.pipeline.io.outputs import OutputSet
from thresher.pipeline.io.pool import Pool
from thresher.pipeline.io.writers import (
    FORMATS,
    HF_DATA,
    HF_OWN,
    manifest_path,
    write_selection,
)
from thresher.pipeline.manifest import Tally, annotation_manifest, selection_manifest
from thresher.pipeline.method import Inputs, Method, Request
from thresher.pipeline.models.resolve import pick_device
from thresher.pipeline.params import parse_params
from thresher.pipeline.plan import Plan, artifact_dirs, make_plan
from thresher.pipeline.stage import Stage, StageStats
from thresher.pipeline.stages.targets import check_targets
from thresher.pipeline.stages.tokens import TokenCounts


def default_workdir(pool: Path) -> Path:
    """Artifacts live beside the pool, shared by every pool in that folder (keys differ)."""
    return Path(pool).resolve().parent / ".thresher-work"


def open_store(workdir: Path | str | None, pool: Pool, read_only: bool = False) -> ArtifactStore:
    """The artifact store of a command on `pool`: --workdir, checked by the output guard (not
    inside a pool or another cache, not a folder of other files), or the default beside it."""
    if workdir is not None:
        check_workdir(Path(workdir), [pool.path])
    store = ArtifactStore(workdir or default_workdir(pool.path), read_only=read_only)
    if not read_only:
        logs.log_to(store.root)      # the CLI's log file (library warnings, INFO lines)
    return store


@dataclass
class Prepared:
    """A selection resolved up to its plan: nothing computed or loaded yet."""

    method: Method
    params: Any
    selector_cls: type | None
    selector_params: dict
    request: Request
    needs: dict[str, Stage]
    plan: Plan


def budget_rows(budget: Budget | None, pool: Pool) -> int | None:
    """The budget in rows before any stage ran: a token budget by the pool's mean row length at
    about 4 characters a token (what a method may size its own stages by, e.g. a shortlist)."""
    if budget is None:
        return None
    if budget.kind != "tokens":
        return budget.rows_of(pool.n_rows)            # from pool.json: no column read
    mean_chars = pool.frame(["n_chars"])["n_chars"].mean() or 4.0
    return budget.rows_of(pool.n_rows, mean_chars / 4)


def prepare(pool: Pool, method: str, params: dict | None = None, selector: str | None = None,
            targets=(), seed: int = 0, device: str | None = None,
            budget: Budget | None = None) -> Prepared:
    choice = registry.choose(method, params, selector)       # fails before any work
    impl, p = choice.method, choice.params
    req = Request(pool, tuple(Path(t) for t in targets or ()), seed, pick_device(device),
                  budget_rows(budget, pool))
    if targets and not impl.needs_targets:
        raise ValueError(f"--target: method {method} does not use a target set")
    if impl.needs_targets and not targets:
        raise ValueError(f"--method {method} needs --target FILE (repeat --target for several tasks)")
    check_targets(req.targets)
    needs = dict(impl.needs(p, req))
    if budget is not None and budget.kind == "tokens":    # token budgets need per-row counts: the tokenizer only, no weights
        needs["tokens"] = TokenCounts(tokenizer=impl.tokenizer(p))
    plan = make_plan(needs.values(), req.device)
    for stage in plan.stages:   # every model resolved, every target found: before any work
        stage.key_config()
    return Prepared(impl, p, choice.selector_cls, choice.selector_params, req, needs, plan)


def candidates_of(pool: Pool, tokens=None) -> pl.DataFrame:
    """Every pool row that may be selected: id, source, kind, n_chars, `row` (pool index)."""
    cands = pool.frame(["id", "source", "kind", "n_chars"]).with_row_index("row")
    if tokens is not None:
        cands = cands.join(tokens.frame().select("id", "n_tokens", "n_loss_tokens"), on="id",
                           how="left", maintain_order="left")
    return cands


def check_scores(scores: pl.DataFrame, cands: pl.DataFrame, method: str) -> pl.DataFrame:
    if "id" not in scores.columns:
        raise RuntimeError(f"method {method} returned scores without an id column")
    if scores["id"].n_unique() != scores.height:
        raise RuntimeError(f"method {method} scored some id twice")
    unknown = scores.filter(~pl.col("id").is_in(cands["id"].implode())).height
    if unknown:
        raise RuntimeError(f"method {method} scored {unknown} ids that are not in the pool")
    return scores


def _score(prep: Prepared, inputs: Inputs, store: ArtifactStore, stats: list[StageStats]
           ) -> tuple[pl.DataFrame, Path]:
    """The method's score frame, checked and saved as the selection's scores artifact."""
    impl, p, cands = prep.method, prep.params, inputs.candidates
    t0 = time.perf_counter()
    with cache_guard(lambda: artifact_dirs(inputs.outputs.values()), store.root):
        scores = check_scores(impl.score(p, inputs), cands, impl.name)
    keyed = [o.fingerprint for o in inputs.outputs.values()]
    out = store.dir("scores", [prep.request.pool.fingerprint, *keyed],
                    {"method": impl.name, "params": dataclasses.asdict(p), "seed": inputs.seed})
    with out.writing("scores.parquet") as tmp:
        scores.write_parquet(tmp)
    stats.append(StageStats(stage="score", config={"method": impl.name}, rows_in=cands.height,
                            rows_out=scores.height, seconds=time.perf_counter() - t0))
    return scores, out.path("scores.parquet")


def _score_and_cut(prep: Prepared, inputs: Inputs, budget: Budget, store: ArtifactStore,
                   stats: list[StageStats], among: list[str] | None = None,
                   ) -> tuple[pl.DataFrame, pl.DataFrame, Any, Path]:
    impl, p, cands = prep.method, prep.params, inputs.candidates
    scores, scores_path = _score(prep, inputs, store, stats)
    t0 = time.perf_counter()
    dup = [c for c in scores.columns if c in cands.columns and c != "id"]
    scored = cands.drop(dup).join(scores, on="id", how="inner", maintain_order="left")
    if among is not None:   # scores are over the whole pool; the cut only among these rows
        scored = scored.filter(pl.col("id").is_in(pl.Series(among, dtype=pl.String).implode()))
    if prep.selector_cls is not None:
        selector = parse_params(prep.selector_cls, prep.selector_params, "selector parameter")
    else:
        selector = impl.selector(p, inputs, scored)
    chosen = selector.select(scored, budget, inputs.seed)
    from thresher.selectors.base import check_selection

    chosen = check_selection(chosen, scored)
    inputs.notes.update(getattr(selector, "notes", {}))
    stats.append(StageStats(stage="select", config={"selector": type(selector).__name__},
                            rows_in=scored.height, rows_out=chosen.height,
                            seconds=time.perf_counter() - t0))
    return scored, chosen, selector, scores_path


def _output_files(out: Path, fmt: str, pool: Pool, targets, workdir: Path,
                  annotate_only: bool = False) -> dict:
    """The OutputSet arguments of one selection (subset, reasons, manifest; `--format hf` writes
    a directory; annotate-only: the per-row table and manifest), checked by the output guard
    against every input (the pool, the files it was ingested from, the targets) and the work
    directory."""
    finals = [out, out.with_name(out.name + ".selection.parquet"), manifest_path(out)]
    if annotate_only:
        finals, fmt = [out, manifest_path(out)], "parquet"
    dirs = [out] if fmt == "hf" else []
    inputs = [pool.path, *pool.input_files(), *(Path(t) for t in targets or ())]
    check_outputs([f for f in finals if f not in dirs], inputs, dirs, workdir=workdir)
    if fmt == "hf":
        check_replace_dir(out, HF_OWN, manifest_path(out))
    return {"finals": finals, "inputs": inputs, "dir_outputs": dirs, "workdir": workdir}


def run_select(pool_path: Path | str, method: str, budget: str | Budget, out: Path | str,
               fmt: str = "messages", seed: int = 0, workdir: Path | str | None = None,
               params: dict | None = None, selector: str | None = None, targets=(),
               device: str | None = None, executor: str = "local", ray_address: str | None = None,
               dry_run: bool = False, among: list[str] | None = None,
               ran: dict[str, dict] | None = None, label: dict | None = None,
               annotate_only: bool = False) -> dict:
    """among: choose only among these ids (a recipe's `from:`); ran: statistics of stages the
    caller already ran for this selection (a recipe's shared plan), keyed by `stage_key`, which
    the manifest records instead of the cached re-visit; label: extra manifest fields;
    annotate_only: run the stages and the scoring, write every row's score columns (a filter's
    annotations, `keep` and `reason`) as Parquet at `out` with its manifest, and no subset (the
    budget, selector and format play no part)."""
    t_start = time.perf_counter()
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if annotate_only:
        budget = None
    else:
        budget = budget if isinstance(budget, Budget) else Budget.parse(budget)
    out = out if fmt == "hf" or os.fspath(out) == "-" else file_output(out)
    pool = Pool(pool_path)
    if pool.n_rows == 0:
        raise ValueError(f"{pool.path}: the pool has no rows to select from")
    out = Path(out)
    cache = Path(workdir) if workdir else default_workdir(pool.path)
    if workdir:
        check_workdir(cache, [pool.path])
    if not (dry_run and os.fspath(out) == "-"):   # refused before any work, dry run or not
        files = _output_files(out, fmt, pool, targets, cache, annotate_only)
    prep = prepare(pool, method, params, selector, targets, seed, device, budget)
    store = open_store(workdir, pool, read_only=dry_run)   # after every check: a mistake
    run_with = make_executor(executor, ray_address)       # leaves no empty work directory
    if dry_run:
        return {"plan": prep.plan.show(pool, store)}
    outputs, stats = prep.plan.run(pool, store, run_with)
    stats = [_ran_instead(s, ran or {}) for s in stats]
    by_name = {name: outputs[bound] for name, bound in zip(prep.needs, prep.plan.roots)}
    inputs = Inputs(pool, candidates_of(pool, by_name.get("tokens")), by_name, seed,
                    prep.request.targets, among=among)
    if annotate_only:
        return _write_annotations(prep, inputs, store, stats, files, out, executor, t_start,
                                  label)
    scored, chosen, sel, scores_path = _score_and_cut(prep, inputs, budget, store, stats, among)
    if chosen.height == 0:
        raise ValueError(f"method {method} selected nothing under budget {budget}")
    pool.check_unchanged()
    with OutputSet(**files) as outs:  # all renamed into place together, the manifest last
        t0 = time.perf_counter()
        tally = Tally(prep, inputs)   # sources and tokens of the rows as they stream past
        sidecar = out.with_name(out.name + ".selection.parquet")
        written = write_selection(pool, chosen["id"].to_list(), outs.temp(out), fmt, tally.add)
        chosen.with_row_index("rank").write_parquet(outs.temp(sidecar))
        stats.append(StageStats(stage="write", config={"format": fmt}, rows_in=chosen.height,
                                rows_out=written, seconds=time.perf_counter() - t0))
        manifest = selection_manifest(prep, inputs, scored, chosen, sel, tally, stats, budget,
                                      fmt, out, sidecar, scores_path, store, executor)
        manifest.update(label or {})
        if among is not None:
            manifest["counts"]["eligible"] = scored.height
        manifest["timings"] = {s.stage: round(s.seconds, 3) for s in stats}
        manifest["timings"]["total"] = round(time.perf_counter() - t_start, 3)
        if fmt == "hf":   # the dataset directory's own card, part of the unit
            write_card(outs.temp(out), manifest, HF_DATA)
        pool.check_unchanged()   # the rows written are the pool's the manifest names
        write_json_atomic(outs.temp(manifest_path(out)), manifest)
    return manifest


def _write_annotations(prep: Prepared, inputs: Inputs, store: ArtifactStore,
                       stats: list[StageStats], files: dict, out: Path, executor: str,
                       t_start: float, label: dict | None) -> dict:
    """Annotate only: every row's score columns at `out` (Parquet, pool order) + the manifest."""
    scores, scores_path = _score(prep, inputs, store, stats)
    cands = inputs.candidates.select("id", "source", "kind", "n_chars")
    dup = [c for c in scores.columns if c in cands.columns and c != "id"]
    table = cands.join(scores.drop(dup), on="id", how="left", maintain_order="left")
    with OutputSet(**files) as outs:
        t0 = time.perf_counter()
        table.write_parquet(outs.temp(out))
        stats.append(StageStats(stage="write", config={"format": "parquet"},
                                rows_in=table.height, rows_out=table.height,
                                seconds=time.perf_counter() - t0))
        manifest = annotation_manifest(prep, inputs, table, scores, scores_path, stats, out,
                                       store, executor)
        manifest.update(label or {})
        manifest["timings"] = {s.stage: round(s.seconds, 3) for s in stats}
        manifest["timings"]["total"] = round(time.perf_counter() - t_start, 3)
        prep.request.pool.check_unchanged()   # the rows annotated: the manifest's pool's
        write_json_atomic(outs.temp(manifest_path(out)), manifest)
    return manifest


def stage_key(stage: str, config: dict) -> str:
    return json.dumps([stage, config], sort_keys=True, default=str)


def _ran_instead(s: StageStats, ran: dict[str, dict]) -> StageStats:
    d = ran.get(stage_key(s.stage, s.config))
    if d is None or not s.cached:
        return s
    return StageStats(**{f.name: d[f.name] for f in dataclasses.fields(StageStats)})
