"""A plan: the stages a request needs, deduplicated and ordered, then run by an executor.

    plan = make_plan(needs.values(), device="cpu")
    print(plan.show(pool, store))                   # one line per stage, with what is cached
    outputs, stats = plan.run(pool, store, LocalExecutor())

Several methods (or several selections of one recipe) that need the same stage share it: stages
are frozen configs, so equal configs are one step. `run` hands each per-shard stage's missing
shards to the executor, assembles the pool-level output, and records the same statistics for
every stage (rows, tokens, seconds, device, FLOPs, what was cached).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq
from thresher.pipeline.artifacts import ArtifactStore
from thresher.pipeline.io.cachefiles import cache_guard
from thresher.pipeline.io.pool import Pool
from thresher.pipeline.progress import stage_bar
from thresher.pipeline.stage import Stage, StageRun, StageStats, shard_done


def _bind(stage: Stage, device: str) -> Stage:
    """Resolve device-dependent fields ("auto" dtypes) so the cache key is concrete."""
    changes = {f.name: _bind(getattr(stage, f.name), device) for f in dataclasses.fields(stage)
               if isinstance(getattr(stage, f.name), Stage)}
    stage = dataclasses.replace(stage, **changes) if changes else stage
    bind = getattr(stage, "bind", None)
    return bind(device) if bind else stage


@dataclass
class Plan:
    stages: list[Stage]            # every stage to run, dependencies first, each once
    roots: list[Stage]             # the needs as bound (device-resolved), in the order given
    device: str = "cpu"

    def _run_for(self, stage: Stage, pool: Pool, store: ArtifactStore, outputs: dict) -> StageRun:
        stage_pool = outputs[stage.source] if stage.source is not None else pool
        return StageRun(stage, stage_pool, store, self.device,
                        deps={d: outputs[d] for d in stage.deps()})

    def show(self, pool: Pool, store: ArtifactStore) -> list[str]:
        """One line per stage: cached, partly cached (k of n shards), or to run. Nothing is
        computed or loaded except the outputs of earlier cached stages that later keys need."""
        lines, outputs = [], {}
        for i, stage in enumerate(self.stages, 1):
            try:
                run = self._run_for(stage, pool, store, outputs)
            except KeyError:          # an upstream stage is not computed yet: key unknown
                lines.append(f"{i}. {stage.describe()}: to run (after its inputs)")
                continue
            if stage.done(run):
                outputs[stage] = _load(run)
                lines.append(f"{i}. {stage.describe()}: cached ({run.dir.dir})")
            elif stage.per_shard:
                have = sum(shard_done(run, s) is not None for s in run.pool.shards)
                lines.append(f"{i}. {stage.describe()}: to run ({have} of "
                             f"{len(run.pool.shards)} shards cached)")
            else:
                lines.append(f"{i}. {stage.describe()}: to run")
        return lines

    def run(self, pool: Pool, store: ArtifactStore, executor) -> tuple[dict[Stage, Any], list[StageStats]]:
        outputs: dict[Stage, Any] = {}
        stats: list[StageStats] = []
        for stage in self.stages:
            run = self._run_for(stage, pool, store, outputs)
            st = _run_stage(run, executor)
            outputs[stage] = _load(run)
            stats.append(st)
        return outputs, stats


def make_plan(needs: Iterable[Stage], device: str = "cpu") -> Plan:
    """Every stage the needs depend on, each once, dependencies first."""
    order: list[Stage] = []
    seen: set[Stage] = set()
    roots = [_bind(stage, device) for stage in needs]

    def visit(stage: Stage) -> None:
        if stage in seen:
            return
        for dep in stage.deps():
            visit(dep)
        seen.add(stage)
        order.append(stage)

    for stage in roots:
        visit(stage)
    for stage in order:
        stage.check_requirements()
    return Plan(order, roots, device)


def _cached_files(run: StageRun) -> list:
    """What a stage reads of the cache: its own artifact directory, its shard files for this
    pool, and its dependencies' artifact directories."""
    paths = [run.dir.dir]
    if run.stage.per_shard and run.shard_dir().is_dir():
        names = {run.shard_prefix(s).name for s in run.pool.shards}
        paths += [f for f in run.shard_dir().iterdir() if f.name.split(".")[0] in names]
    return paths + artifact_dirs(run.deps.values())


def artifact_dirs(outputs) -> list:
    """The artifact directories of stage outputs (those that carry one)."""
    return [o.dir.dir for o in outputs if hasattr(getattr(o, "dir", None), "dir")]


def _load(run: StageRun) -> Any:
    with cache_guard(lambda: _cached_files(run), run.store.root):
        return run.stage.load(run)


def _run_stage(run: StageRun, executor) -> StageStats:
    with cache_guard(lambda: _cached_files(run), run.store.root):
        return _compute(run, executor)


def _compute(run: StageRun, executor) -> StageStats:
    stage = run.stage
    st = StageStats(stage=stage.kind, config=stage.key_config(), device=run.device,
                    rows_in=run.pool.n_rows)
    t0 = time.perf_counter()
    if stage.done(run):
        info = run.dir.info()
        st.cached, st.rows_out = True, int(info.get("rows", 0))
        st.tokens = int(info.get("tokens", 0))
        st.shards_cached = len(run.pool.shards) if stage.per_shard else 0
        st.seconds = time.perf_counter() - t0
        return st
    if stage.per_shard:
        _fill_shards(run, executor, st)
        extra = stage.assemble(run)
    else:
        total = run.pool.n_rows if stage.uses_pool else 1
        with stage_bar(stage.kind, total, stage.unit) as bar:
            extra = stage.run_whole(run) or {}
            bar.update(total)
        st.tokens, st.flops = int(extra.pop("tokens", 0)), float(extra.pop("flops", 0.0))
        for name in ("shards_computed", "shards_cached", "rows_computed"):   # if it reports them
            setattr(st, name, int(extra.get(name, 0)))
    st.rows_out = int(extra.get("rows", run.pool.n_rows))
    run.dir.complete({"rows": st.rows_out, "tokens": st.tokens, **run.notes, **extra})
    st.seconds = time.perf_counter() - t0
    return st


def _fill_shards(run: StageRun, executor, st: StageStats) -> None:
    missing = [s for s in run.pool.shards if shard_done(run, s) is None]
    st.shards_cached = len(run.pool.shards) - len(missing)
    st.shards_computed = len(missing)
    total = sum(pq.ParquetFile(s).metadata.num_rows for s in missing)
    st.rows_computed = total
    with stage_bar(run.stage.kind, total, "rows") as bar:
        executor.fill(run, missing, bar.update)
    for s in run.pool.shards:
        info = shard_done(run, s)
        st.tokens += info["tokens"]
        if s in missing:
            st.flops += info["flops"]


def run_one(plan: Plan, index: int, pool: Pool, store: ArtifactStore, executor) -> StageStats:
    """Run stage `index` of a plan alone (as a Prefect task does): the outputs of the stages it
    reads were computed by earlier steps and are only loaded here."""
    stage = plan.stages[index]
    needed: set[Stage] = set()

    def visit(s: Stage) -> None:
        for d in s.deps():
            if d not in needed:
                needed.add(d)
                visit(d)

    visit(stage)
    outputs: dict[Stage, Any] = {}
    for s in plan.stages[:index]:
        if s in needed:
            outputs[s] = _load(plan._run_for(s, pool, store, outputs))
    return _run_stage(plan._run_for(stage, pool, store, outputs), executor)


def run_stage(stage: Stage, pool: Pool, store: ArtifactStore, device: str = "cpu", executor=None):
    """Run one stage (and what it depends on) in this process; returns its output."""
    from thresher.pipeline.executors import LocalExecutor

    plan = make_plan([stage], device)
    outputs, _ = plan.run(pool, store, executor or LocalExecutor())
    return outputs[plan.roots[0]]
