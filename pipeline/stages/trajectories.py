"""Checkpoint trajectories: train a proxy (the bundled LoRA trainer) and run the forward engine
once per checkpoint; each row's response loss (and EL2N) per checkpoint, aligned to pool order.

    run = train_proxy(pool, store, ProxySpec(epochs=3, checkpoints=12))   # cached, resumable
    tr = trajectories(pool, store, run.checkpoints)                       # cached per (ckpt, shard)
    tr.loss()    # float16 [N, T]: mean response-token NLL of row i at checkpoint t (NaN: no loss token)
    tr.el2n()    # float16 [N, T]: mean ||p - e_y||_2 over the same tokens

S2L (methods-a.md §4.2) clusters `loss()`; published EL2N (§1.3) averages `el2n()` over the early
checkpoints of several seeds' proxies; DEALRec's surrogate is a proxy's final adapter.

The proxy trains on the pool, or on a seeded random part of it (`part` < 1: each EL2N seed its
own part, as Marion et al.'s reference models), with `TrainConfig`'s defaults unless set; its
run lives in the artifact store (`proxy/<key>/run`) and a killed run resumes from its newest
checkpoint. Trajectories take any list of checkpoints (trainer checkpoints or finished run
directories), are keyed by the checkpoints' adapter bytes, and write one float16 file per
(checkpoint, pool shard), so a killed pass resumes at the first missing one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
from thresher.pipeline.artifacts import ArtifactDir, ArtifactStore
from thresher.pipeline.io.pool import Pool
from thresher.pipeline.models.engine import engine_dtype, run_forward
from thresher.pipeline.models.resolve import DEFAULT_LM
from thresher.pipeline.stage import Resources, Stage, StageRun

log = logging.getLogger(__name__)

TRAJ_VERSION = 1
SIGNALS = ("loss", "el2n")


@dataclass(frozen=True)
class ProxySpec:
    """How to train a proxy. `checkpoints` evenly spaced checkpoints over the run (the last at
    its final step) plus explicit `save_steps`; `stop_after` ends training after that step, and
    `stop_fraction` after that fraction of the run's steps, with a checkpoint there (EL2N needs
    only its early checkpoints; the learning-rate schedule is still the full run's)."""

    model: str = DEFAULT_LM
    part: float = 1.0
    seed: int = 0
    epochs: int = 1
    lr: float = 2e-4
    batch_size: int = 8
    max_tokens: int = 512
    checkpoints: int = 0
    save_steps: tuple[int, ...] = ()
    stop_after: int | None = None
    stop_fraction: float | None = None
    dtype: str | None = None        # trainer autocast: None = fp32 on CPU, bf16/fp16 on GPU

    def __post_init__(self):
        if not 0 < self.part <= 1:
            raise ValueError(f"proxy part must be in (0, 1], got {self.part}")
        if self.checkpoints < 0:
            raise ValueError(f"proxy checkpoints must be >= 0, got {self.checkpoints}")
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"proxy stop_after must be >= 1, got {self.stop_after}")
        if self.stop_fraction is not None and not 0 < self.stop_fraction <= 1:
            raise ValueError(f"proxy stop_fraction must be in (0, 1], got {self.stop_fraction}")


@dataclass
class ProxyRun:
    dir: Path                   # the trainer's run directory
    checkpoints: list[Path]     # in step order
    steps: list[int]
    total_steps: int
    seconds: float              # training time (0 when reused from the cache)
    cached: bool
    key: str = ""               # the proxy's cache key

    @property
    def fingerprint(self) -> str:
        return f"proxy:{self.key}"

    @property
    def final(self) -> Path:
        """The trained adapter (the run's `adapter/` when it finished, else its last checkpoint)."""
        return self.dir if (self.dir / "adapter").is_dir() else self.checkpoints[-1]


def proxy_rows(pool: Pool, part: float, seed: int) -> list[dict]:
    """The proxy's training rows: the whole pool, or a seeded uniform part (pool order)."""
    rows = list(pool.iter_rows(["id", "source", "kind", "messages", "text"]))
    if part >= 1:
        return rows
    n = max(1, round(part * len(rows)))
    keep = np.sort(np.random.default_rng([seed, 7919]).choice(len(rows), n, replace=False))
    return [rows[i] for i in keep]


def stop_step(total: int, spec: ProxySpec) -> int | None:
    """The step training stops after (None: runs to the end)."""
    stops = [spec.stop_after] if spec.stop_after is not None else []
    if spec.stop_fraction is not None:
        stops.append(max(1, round(spec.stop_fraction * total)))
    return min(stops) if stops else None


def planned_steps(n_examples: int, spec: ProxySpec) -> tuple[int, tuple[int, ...]]:
    """(total optimizer steps, checkpoint steps) for a run over n_examples rows."""
    total = math.ceil(n_examples / spec.batch_size) * spec.epochs
    even = {max(1, round(total * (j + 1) / spec.checkpoints)) for j in range(spec.checkpoints)}
    extra = {max(1, round(spec.stop_fraction * total))} if spec.stop_fraction is not None else set()
    steps = sorted(s for s in even | extra | set(spec.save_steps) if s <= total)
    stop = stop_step(total, spec)
    if stop is not None:
        steps = [s for s in steps if s <= stop]
    return total, tuple(steps)


def train_proxy(pool: Pool, store: ArtifactStore, spec: ProxySpec, device: str | None = None,
                progress: bool = True) -> ProxyRun:
    """Train (or reuse) the proxy described by `spec`; returns its checkpoints."""
    from thresher.pipeline.models.resolve import load_tokenizer, resolve
    from thresher.pipeline.training.train import TrainConfig, checkpoints, make_examples, train

    resolved = resolve(spec.model)
    stage = store.dir("proxy", [pool.fingerprint], {**asdict(spec), "model": resolved.identity})
    run_dir = stage.path("run")
    if stage.done:
        info = stage.info()
        return ProxyRun(run_dir, [run_dir / c for c in info["checkpoints"]], info["steps"],
                        info["total_steps"], 0.0, True, stage.key)
    rows = proxy_rows(pool, spec.part, spec.seed)
    examples, _, _ = make_examples(load_tokenizer(resolved), rows, spec.max_tokens)
    if not examples:
        raise ValueError(f"no pool row has a response token within max_tokens={spec.max_tokens}")
    total, steps = planned_steps(len(examples), spec)
    if not steps:
        raise ValueError(f"the proxy run has {total} steps; no checkpoint step (stop_after / "
                         f"save_steps / checkpoints) falls inside it")
    cfg = TrainConfig(model=spec.model, epochs=spec.epochs, lr=spec.lr, batch_size=spec.batch_size,
                      max_tokens=spec.max_tokens, seed=spec.seed, save_steps=steps, device=device,
                      dtype=spec.dtype)
    stop = stop_step(total, spec)
    stop = stop if stop is not None and stop < total else None
    summary = train(rows, run_dir, cfg, stop_after=stop, progress=progress)
    found = {int(p.name.split("-")[1]): p for p in checkpoints(run_dir)}
    missing = [s for s in steps if s not in found]
    if missing:
        raise RuntimeError(f"proxy run {run_dir} lacks checkpoints {missing}")
    ckpts = [found[s] for s in steps]
    stage.complete({"checkpoints": [p.name for p in ckpts], "steps": list(steps),
                    "total_steps": total, "rows": len(rows), "trained_rows": len(examples),
                    "seconds": summary["seconds"], "final_loss": summary["final_loss"]})
    return ProxyRun(run_dir, ckpts, list(steps), total, float(summary["seconds"]), False, stage.key)


# ---------------------------------------------------------------- trajectories

def checkpoint_fingerprint(path: Path) -> str:
    """Identity of a checkpoint: its adapter bytes and config, and its base model."""
    path = Path(path)
    adapter = path / "adapter" if (path / "adapter").is_dir() else path
    files = sorted(adapter.glob("adapter_model.*")) + [adapter / "adapter_config.json"]
    if not all(f.exists() for f in files) or len(files) < 2:
        raise FileNotFoundError(f"{path}: not a training checkpoint or run (no adapter files)")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    meta = adapter / "checkpoint.json" if (adapter / "checkpoint.json").exists() else path / "train.json"
    if meta.exists():
        h.update(json.dumps(json.loads(meta.read_text()).get("model_identity")).encode())
    return h.hexdigest()[:32]


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


def trajectories(pool: Pool, store: ArtifactStore, ckpts: list[Path], max_tokens: int = 512,
                 response_only: bool = True, device: str | None = None, dtype: str | None = None,
                 token_budget: int | None = None, threads: int | None = None,
                 progress=None) -> Trajectories:
    """The per-row loss and EL2N of every pool row at every checkpoint (cached, resumable).

    Each checkpoint is loaded once (base + adapter, merged, in the engine's dtype) and runs
    `engine.run_forward` over every pool shard not yet done for it."""
    import torch
    from thresher.pipeline.models.resolve import pick_device

    if not ckpts:
        raise ValueError("trajectories need at least one checkpoint")
    dev = pick_device(device)
    torch_dtype = engine_dtype(dev, dtype)
    fps = [checkpoint_fingerprint(Path(c)) for c in ckpts]
    stage = store.dir("trajectories", [pool.fingerprint, *fps],
                        {"max_tokens": int(max_tokens), "response_only": bool(response_only),
                         "dtype": str(torch_dtype).removeprefix("torch."), "version": TRAJ_VERSION})
    result = Trajectories(stage, [str(c) for c in ckpts])
    if stage.done:
        return result
    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        names = [s.stem for s in pool.shards]
        for j, ckpt in enumerate(ckpts):
            _one_checkpoint(pool, stage, j, Path(ckpt), dev, torch_dtype, max_tokens,
                            response_only, token_budget, progress)
    finally:
        torch.set_num_threads(saved_threads)
    for k, sig in enumerate(SIGNALS):
        cols = [np.concatenate([np.load(stage.path(f"c{j:03d}.{s}.npy"))[:, k] for s in names])
                for j in range(len(ckpts))]
        with stage.writing(f"{sig}.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, np.stack(cols, axis=1).astype(np.float16))
    stage.complete({"rows": pool.n_rows, "checkpoints": [str(c) for c in ckpts],
                    "fingerprints": fps, "signals": list(SIGNALS)})
    return result


def _one_checkpoint(pool, stage, j, ckpt, dev, torch_dtype, max_tokens, response_only,
                    token_budget, progress) -> None:
    from thresher.pipeline.training.train import load_trained

    model = tok = None
    for shard, rows in pool.iter_shards(["id", "kind", "messages", "text"]):
        name = f"c{j:03d}.{shard}.npy"
        if stage.has(name):
            continue
        if model is None:
            model, tok = load_trained(ckpt, dev, merge=True)
            model = model.to(torch_dtype)
        out = run_forward(model, tok, rows, {"loss", "el2n"}, max_tokens=max_tokens,
                          token_budget=token_budget, response_only=response_only)
        with stage.writing(name) as tmp, open(tmp, "wb") as f:
            np.save(f, np.stack([out["loss"], out["el2n"]], axis=1).astype(np.float16))
        log.info("trajectories: checkpoint %d (%s), %s done", j, ckpt.name, shard)
        if progress is not None:
            progress(len(rows))


# ---------------------------------------------------------------- as declared stages

def _spec_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(ProxySpec)]


@dataclass(frozen=True)
class Proxy(Stage, ProxySpec):
    """A proxy LoRA run on the pool (a whole-pool stage); loads a `ProxyRun`. Its fields are
    `ProxySpec`'s (validated there); the run itself lives under `proxy/<key>` (`train_proxy`'s
    cache), shared with direct callers."""

    kind: ClassVar[str] = "proxy"
    per_shard: ClassVar[bool] = False
    loads_model: ClassVar[bool] = True
    unit: ClassVar[str] = "runs"

    def spec(self) -> ProxySpec:
        return ProxySpec(**{n: getattr(self, n) for n in _spec_fields()})

    def key_extra(self) -> dict:
        from thresher.pipeline.models.resolve import model_identity

        return {"model": model_identity(self.model)}

    def resources(self) -> Resources:
        return Resources(cpus=2, gpus=1, memory_gb=6)

    def run_whole(self, run: StageRun) -> dict:
        r = train_proxy(run.pool, run.store, self.spec(), device=run.device, progress=False)
        return {"rows": run.pool.n_rows, "steps": r.steps, "total_steps": r.total_steps,
                "train_seconds": r.seconds}

    def load(self, run: StageRun) -> ProxyRun:
        return train_proxy(run.pool, run.store, self.spec(), device=run.device, progress=False)


@dataclass(frozen=True)
class TrajectoryStage(Stage):
    """Per-row loss and EL2N at every checkpoint of `proxy` (or of the given `ckpts`)."""

    kind: ClassVar[str] = "trajectories"
    per_shard: ClassVar[bool] = False
    loads_model: ClassVar[bool] = True
    proxy: Stage | None = None
    ckpts: tuple[str, ...] = ()
    max_tokens: int = 512
    response_only: bool = True
    dtype: str | None = None
    threads: int | None = field(default=None, compare=False, metadata={"key": False})

    def __post_init__(self):
        if (self.proxy is None) == (not self.ckpts):
            raise ValueError("trajectories need either a proxy stage or a list of checkpoints")

    def deps(self) -> tuple[Stage, ...]:
        return (*super().deps(), *((self.proxy,) if self.proxy is not None else ()))

    def key_extra(self) -> dict:
        return {"ckpts": [checkpoint_fingerprint(Path(c)) for c in self.ckpts]}

    def resources(self) -> Resources:
        return Resources(cpus=1, gpus=1, memory_gb=4)

    def _ckpts(self, run: StageRun) -> list[str]:
        if self.proxy is not None:
            return [str(c) for c in run.deps[self.proxy].checkpoints]
        return list(self.ckpts)

    def _traj(self, run: StageRun) -> Trajectories:
        return trajectories(run.pool, run.store, self._ckpts(run), max_tokens=self.max_tokens,
                            response_only=self.response_only, device=run.device,
                            dtype=self.dtype, threads=self.threads)

    def run_whole(self, run: StageRun) -> dict:
        tr = self._traj(run)
        return {"rows": run.pool.n_rows, "checkpoints": len(tr.checkpoints)}

    def load(self, run: StageRun) -> Trajectories:
        return self._traj(run)
