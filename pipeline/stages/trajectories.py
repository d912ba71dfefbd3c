"""Checkpoint trajectories: the forward engine at every checkpoint of a proxy run (or of given
trainer checkpoints); each row's response loss (and EL2N) per checkpoint, aligned to pool order.

    run = train_proxy(pool, store, ProxySpec(epochs=3, checkpoints=12))   # pipeline/stages/proxy.py
    tr = trajectories(pool, store, run.checkpoints)                       # cached per (ckpt, shard)
    tr.loss()    # float16 [N, T]: mean response-token NLL of row i at checkpoint t (NaN: no loss token)
    tr.el2n()    # float16 [N, T]: mean ||p - e_y||_2 over the same tokens

S2L (methods-a.md §4.2) clusters `loss()`; published EL2N (§1.3) averages `el2n()` over the early
checkpoints of several seeds' proxies; DEALRec's surrogate is a proxy's final adapter.

The stage's units are (checkpoint x pool shard), keyed by the checkpoint's adapter bytes and the
shard's content: a killed pass resumes at the first missing unit, and the executor loads each
checkpoint's model (base + adapter, merged, in the engine's dtype) once per worker.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from thresher.pipeline.artifacts import ArtifactDir, ArtifactStore
from thresher.pipeline.io.pool import Pool
from thresher.pipeline.models.engine import engine_dtype, run_forward
from thresher.pipeline.stage import Resources, ShardResult, Stage, StageRun, Unit, gather_units
from thresher.pipeline.stages.proxy import checkpoint_fingerprint

log = logging.getLogger(__name__)

TRAJ_VERSION = 2
SIGNALS = ("loss", "el2n")


@dataclass
class Trajectories:
    stage: ArtifactDir
    checkpoints: list[str]

    @property
    def fingerprint(self) -> str:
        return f"trajectories:{self.stage.key}"

    def _load(self, name: str) -> np.ndarray:
        return np.load(self.stage.path(f"{name}.npy"), mmap_mode="r")

    def loss(self) -> np.ndarray:
        return self._load("loss")

    def el2n(self) -> np.ndarray:
        return self._load("el2n")

    def matrix(self) -> np.ndarray:
        """The loss trajectories as float32 with NaN (no loss token) set to 0, as S2L's code:
        the matrix the k-means stage clusters."""
        x = np.array(self.loss(), dtype=np.float32)
        x[~np.isfinite(x)] = 0.0
        return x


@dataclass(frozen=True)
class TrajectoryStage(Stage):
    """Per-row loss and EL2N at every checkpoint of `proxy` (or of the given `ckpts`)."""

    kind: ClassVar[str] = "trajectories"
    loads_model: ClassVar[bool] = True
    proxy: Stage | None = None
    ckpts: tuple[str, ...] = ()
    max_tokens: int = 512
    response_only: bool = True
    dtype: str | None = None        # the engine's (resolved per device when planned: `bind`)

    def __post_init__(self):
        if (self.proxy is None) == (not self.ckpts):
            raise ValueError("trajectories need either a proxy stage or a list of checkpoints")

    def deps(self) -> tuple[Stage, ...]:
        return (*super().deps(), *((self.proxy,) if self.proxy is not None else ()))

    def bind(self, device: str) -> TrajectoryStage:
        dtype = str(engine_dtype(device, self.dtype)).removeprefix("torch.")
        return dataclasses.replace(self, dtype=dtype)

    def key_extra(self) -> dict:
        return {"ckpts": [checkpoint_fingerprint(Path(c)) for c in self.ckpts],
                "version": TRAJ_VERSION}

    def resources(self) -> Resources:
        return Resources(cpus=1, gpus=1, memory_gb=4)

    def checkpoints(self, run: StageRun) -> list[str]:
        if self.proxy is not None:
            return [str(c) for c in run.deps[self.proxy].checkpoints]
        return list(self.ckpts)

    def units(self, run: StageRun) -> list[Unit]:
        out = []
        for j, ckpt in enumerate(self.checkpoints(run)):
            fp = checkpoint_fingerprint(Path(ckpt))[:16]
            for shard in run.pool.shards:
                u = run.shard_unit(shard)
                out.append(dataclasses.replace(u, key=f"{fp}-{u.key}", worker=("checkpoint", ckpt),
                                               label=f"checkpoint {j} {u.label}"))
        return out

    def open_worker(self, device: str, key: tuple = ()):
        import torch
        from thresher.pipeline.training.train import load_trained

        model, tok = load_trained(Path(key[1]), device, merge=True)
        return model.to(getattr(torch, self.dtype)), tok

    def run_shard(self, worker, rows: list[dict]) -> ShardResult:
        model, tok = worker
        out = run_forward(model, tok, rows, set(SIGNALS), max_tokens=self.max_tokens,
                          response_only=self.response_only)
        return ShardResult(arrays={"signals": np.stack([out[s] for s in SIGNALS], axis=1)
                                   .astype(np.float16)}, tokens=int(out["n_tokens"].sum()))

    def assemble(self, run: StageRun) -> dict:
        """Per signal one float16 [N, T] matrix: checkpoint t's column is its units in pool order."""
        units, ckpts = self.units(run), self.checkpoints(run)
        per_ckpt = len(run.pool.shards)
        per_ck = [gather_units(run, units[j * per_ckpt:(j + 1) * per_ckpt], "signals.npy")
                  for j in range(len(ckpts))]                        # [N, 2] per checkpoint
        for k, sig in enumerate(SIGNALS):
            run.dir.save_array(f"{sig}.npy", np.stack([c[:, k] for c in per_ck], axis=1)
                               .astype(np.float16))
        return {"rows": run.pool.n_rows, "checkpoints": ckpts, "signals": list(SIGNALS)}

    def load(self, run: StageRun) -> Trajectories:
        return Trajectories(run.dir, list(run.dir.info()["checkpoints"]))


def trajectories(pool: Pool, store: ArtifactStore, ckpts: list[Path], max_tokens: int = 512,
                 response_only: bool = True, device: str | None = None,
                 dtype: str | None = None) -> Trajectories:
    """The per-row loss and EL2N of every pool row at every checkpoint (cached, resumable)."""
    from thresher.pipeline.models.resolve import pick_device
    from thresher.pipeline.plan import run_stage

    if not ckpts:
        raise ValueError("trajectories need at least one checkpoint")
    stage = TrajectoryStage(ckpts=tuple(str(c) for c in ckpts), max_tokens=max_tokens,
                            response_only=response_only, dtype=dtype)
    return run_stage(stage, pool, store, pick_device(device))
