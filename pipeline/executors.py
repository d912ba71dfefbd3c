"""Executors fill a per-shard stage's missing shards; the plan (`pipeline/plan.py`) does the rest.

    LocalExecutor()                      in this process: the stage's model loaded once
    RayExecutor(address=None)            Ray actors sized by the stage's `resources()`, each
                                         holding the model once; a local cluster unless an
                                         address (or RAY_ADDRESS) names one

Both write through the same artifact store with the same per-shard code (`Stage.run_shard` then
`write_shard`), so their artifacts and the subsets built on them are the same bytes. (Float
reductions depend on the CPU thread count, so actors run torch with the driver's thread count:
Ray would otherwise give each actor one thread per CPU it holds, and the last bits would differ.)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
from thresher.pipeline.artifacts import ArtifactStore
from thresher.pipeline.stage import Stage, StageRun, write_shard

EXECUTORS = ("local", "ray")


def read_shard(shard: Path, columns: list[str]) -> list[dict]:
    schema = pq.read_schema(shard)
    return pq.read_table(shard, columns=[c for c in columns if c in schema.names]).to_pylist()


def compute_shard(run: StageRun, shard: Path, worker) -> int:
    """The per-shard unit every executor runs: read the shard, run the stage, write its files."""
    try:
        rows = read_shard(shard, run.stage.columns())
    except OSError:
        run.pool.check_unchanged()   # a shard gone mid-read: the pool was replaced
        raise
    run.pool.check_unchanged()   # never cache a replaced pool's rows under this pool's shard key
    write_shard(run, shard, run.stage.run_shard(worker, rows))
    return len(rows)


class LocalExecutor:
    name = "local"

    def fill(self, run: StageRun, missing: list[Path], update: Callable[[int], object]) -> None:
        worker = None
        for shard in missing:
            if worker is None:               # loaded only when some shard is missing
                worker = run.stage.open_worker(run.device)
            update(compute_shard(run, shard, worker))


class ShardActor:
    """One Ray actor: the stage's worker (model) loaded once, then one shard per call."""

    def __init__(self, stage: Stage, pool_path: str, store_root: str, device: str, threads: int):
        import torch
        from thresher.pipeline.io.pool import Pool

        torch.set_num_threads(threads)
        self.stage, self.device = stage, device
        self.pool, self.store = Pool(pool_path), ArtifactStore(store_root)
        self.worker = stage.open_worker(device)

    def run(self, shard: str) -> int:
        run = StageRun(self.stage, self.pool, self.store, self.device)
        return compute_shard(run, Path(shard), self.worker)


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

    def fill(self, run: StageRun, missing: list[Path], update: Callable[[int], object]) -> None:
        if not missing:
            return
        ray = self._init()
        from ray.util import ActorPool

        res = run.stage.resources()
        cluster = ray.cluster_resources()
        gpus = res.gpus if cluster.get("GPU", 0) > 0 else 0
        device = run.device if gpus else "cpu"
        n = max(1, min(len(missing), int(cluster.get("CPU", 1) // max(res.cpus, 1e-9))))
        actor = ray.remote(num_cpus=res.cpus, num_gpus=gpus,
                           memory=int(res.memory_gb * 2**30))(ShardActor)
        import torch

        actors = [actor.remote(run.stage, str(run.pool.path), str(run.store.root), device,
                               torch.get_num_threads()) for _ in range(n)]
        try:
            for rows in ActorPool(actors).map_unordered(lambda a, s: a.run.remote(str(s)), missing):
                update(rows)
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
