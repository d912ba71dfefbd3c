"""Executors run a stage's missing units; the plan (`pipeline/plan.py`) does the rest.

    LocalExecutor()                      in this process: each worker (model) loaded once per
                                         `Unit.worker` key
    RayExecutor(address=None)            Ray actors sized by the stage's `resources()`, each
                                         holding its worker; a local cluster unless an address
                                         (or RAY_ADDRESS) names one

Both run every unit through the same code (`run_one`: `Stage.run_unit`, then `write_unit`, which
records the unit's rows, tokens, FLOPs and seconds), so their artifacts and the subsets built on
them are the same bytes. Units are handed out one worker key at a time (every unit of checkpoint
1, then of checkpoint 2...), so an actor loads each checkpoint's model at most once per group.
(Float reductions depend on the CPU thread count, so actors run torch with the driver's thread
count: Ray would otherwise give each actor one thread per CPU it holds, and the last bits would
differ.)
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable

from thresher.pipeline.stage import WHOLE, StageRun, Unit, write_unit

log = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")

Update = Callable[[Unit, dict], object]     # called once per finished unit with its statistics


def run_one(run: StageRun, unit: Unit, worker) -> dict:
    """The unit every executor runs: compute it, write its files and statistics."""
    t0 = time.perf_counter()
    result = run.stage.run_unit(run, worker, unit)
    return write_unit(run, unit, result, time.perf_counter() - t0)


def open_worker(run: StageRun, unit: Unit):
    """The stage's worker for this unit's key (stages without per-unit workers take no key);
    None for a whole-pool unit, which loads what it needs itself."""
    if unit.key == WHOLE:
        return None
    return run.stage.open_worker(run.device, unit.worker) if unit.worker else \
        run.stage.open_worker(run.device)


def by_worker(units: list[Unit]) -> list[list[Unit]]:
    """Consecutive groups of units that share a worker key, in the order given."""
    return [list(g) for _, g in itertools.groupby(units, key=lambda u: u.worker)]


class LocalExecutor:
    name = "local"

    def run(self, run: StageRun, units: list[Unit], update: Update) -> None:
        for group in by_worker(units):
            worker, opened = None, False         # loaded only when some unit is missing
            for unit in group:
                if not opened:
                    worker, opened = open_worker(run, unit), True
                update(unit, run_one(run, unit, worker))
            del worker


class UnitActor:
    """One Ray actor: a stage's run, its worker loaded once per worker key, one unit per call."""

    def __init__(self, run: StageRun, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.run_, self.key, self.worker, self.opened = run, None, None, False

    def run(self, unit: Unit) -> tuple[Unit, dict]:
        if not self.opened or unit.worker != self.key:
            self.worker, self.key = None, unit.worker
            self.worker, self.opened = open_worker(self.run_, unit), True
        return unit, run_one(self.run_, unit, self.worker)


class RayExecutor:
    name = "ray"

    def __init__(self, address: str | None = None):
        self.address = address or os.environ.get("RAY_ADDRESS")

    def _init(self):
        try:
            import ray
        except ModuleNotFoundError:
            raise ModuleNotFoundError("--executor ray needs Ray: pip install 'ray[data]' "
                                      "(or `make setup`)") from None
        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        return ray

    def run(self, run: StageRun, units: list[Unit], update: Update) -> None:
        if not units:
            return
        ray = self._init()
        import torch
        from ray.util import ActorPool

        res = run.stage.resources()
        cluster = ray.cluster_resources()
        gpus = res.gpus if cluster.get("GPU", 0) > 0 else 0
        if not gpus:
            run = StageRun(run.stage, run.pool, run.store, "cpu", run.deps, run.notes)
        n = max(1, min(len(units), int(cluster.get("CPU", 1) // max(res.cpus, 1e-9))))
        actor = ray.remote(num_cpus=res.cpus, num_gpus=gpus,
                           memory=int(res.memory_gb * 2**30))(UnitActor)
        actors = [actor.remote(run, torch.get_num_threads()) for _ in range(n)]
        try:
            pool = ActorPool(actors)
            for group in by_worker(units):
                for unit, info in pool.map_unordered(lambda a, u: a.run.remote(u), group):
                    update(unit, info)
        finally:
            for a in actors:
                ray.kill(a)


def make_executor(name: str = "local", address: str | None = None):
    if name == "local":
        if address:
            raise ValueError("--ray-address goes with --executor ray")
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(address)
    raise ValueError(f"unknown executor {name!r}; expected one of {', '.join(EXECUTORS)}")
