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
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from thresher.pipeline.artifacts import ArtifactStore, config_key
from thresher.pipeline.io.cachefiles import cache_guard
from thresher.pipeline.io.pool import Pool
from thresher.pipeline.progress import stage_bar
from thresher.pipeline.stage import WHOLE, Stage, StageRun, StageStats, Unit, unit_done

log = logging.getLogger(__name__)


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
        stage_pool = outputs[stage.over] if stage.over is not None else pool
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
            else:
                units = stage.units(run)
                have = sum(unit_done(run, u) is not None for u in units)
                lines.append(f"{i}. {stage.describe()}: to run ({have} of {len(units)} units cached)")
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
    """What a stage reads of the cache: its own artifact directory, its unit files for this
    pool, and its dependencies' artifact directories."""
    paths = [run.dir.dir]
    units = run.store.root / run.stage.kind / config_key(run.stage.key_config()) / "units"
    if units.is_dir():
        names = {run.unit_prefix(u).name for u in run.stage.units(run) if u.key != WHOLE}
        paths += [f for f in units.iterdir() if f.name.split(".")[0] in names]
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
        st.units_cached = int(info.get("units", 0))
        st.seconds = time.perf_counter() - t0
        return st
    units = stage.units(run)
    _run_units(run, units, executor, st)
    extra = stage.assemble(run)
    st.rows_out = int(extra.get("rows", run.pool.n_rows))
    run.dir.complete({"rows": st.rows_out, "tokens": st.tokens, "units": len(units),
                      **run.notes, **extra})
    st.seconds = time.perf_counter() - t0
    return st


def _run_units(run: StageRun, units: list[Unit], executor, st: StageStats) -> None:
    """Hand the missing units to the executor; count what was computed and what was cached.
    A progress line per unit goes to the log, a bar to a terminal."""
    done = {u.key: unit_done(run, u) for u in units}
    missing = [u for u in units if done[u.key] is None]
    st.units_cached, st.units_computed = len(units) - len(missing), len(missing)
    st.rows_computed = sum(u.size for u in missing)
    kind, n = run.stage.kind, len(missing)
    with stage_bar(kind, st.rows_computed, run.stage.counts) as bar:
        def finished(unit: Unit, info: dict) -> None:
            finished.count += 1
            bar.update(unit.size)
            st.flops += info["flops"]
            log.info("%s: unit %d/%d %s done (%d %s, %.1fs)", kind, finished.count, n,
                     unit.label or unit.key, unit.size, run.stage.counts, info["seconds"])

        finished.count = 0
        executor.run(run, missing, finished)
    for u in units:
        info = unit_done(run, u)
        if info is None:
            raise RuntimeError(f"{kind}: unit {u.label or u.key} has no output after the executor ran it")
        st.tokens += int(info["tokens"])


def run_stage_at(plan: Plan, index: int, pool: Pool, store: ArtifactStore, executor) -> StageStats:
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
