"""LESS gradient features (Xia et al. 2024; methods-b.md §4.2) as a cached stage: per warm-up
checkpoint, every row's LoRA gradient, randomly projected to `d` dimensions and L2-normalised.

    warm = warmup_proxy(n_rows=pool.n_rows)                     # a `Proxy`: 5% of the pool, 4 epochs
    pool_feats = GradFeatures(proxy=warm, d=8192)               # Adam-preconditioned (pool rows)
    target_feats = GradFeatures(proxy=warm, d=8192, source=TargetPool(path="t.jsonl"))   # SGD
    fs = run_stage(pool_feats, pool, store)                     # -> GradFeatureSet
    fs.features(j)   # float16 [N, d] memmap for checkpoint j, pool order, unit rows (0: no loss token)
    GradFeatures(proxy=warm, rows=Shortlist(...))               # only the shortlist's rows
    fs.etas          # float64 [K]: each checkpoint's mean learning rate over its epoch, sum 1

Per checkpoint theta_j (base + adapter from the trainer's `checkpoint-<step>/`):
- g = per-sample gradient of the row's mean response-token loss over the LoRA matrices
  (`pipeline/models/grads.py`: rows packed into unpadded sequences, one forward and backward
  per pack, each row's LoRA gradients formed from what the layers saw on its tokens,
  `packed_grads.py`; bf16 autocast on CPUs with native bf16 (`grad_dtype`), else float32;
  LESS: one backward call per row);
- pool rows (`grad="adam"`, the default without `source`): Gamma = m' / sqrt(v' + 1e-8) with
  m' = 0.9 m + 0.1 g and v' = 0.999 v + 0.001 g^2, m and v the checkpoint's AdamW moments
  (saved by the trainer in `state.safetensors`) (LESS `obtain_gradients_with_adam`); target rows
  (`grad="sgd"`, the default with a `source`): g itself;
- x R with R a [P, d] Rademacher (+-1) matrix, seeded, never built whole: rows of R come in
  blocks of `ROW_BLOCK` parameters, block b drawn from numpy's `default_rng([seed, b])`
  (`rademacher_block`), so the same seed gives the same R for pool and targets on any machine;
  pending gradients are gathered to `project_rows` (256) rows so each block is drawn once per
  group (drawing a block costs about as much as multiplying 100 rows by it);
  the product runs in bf16 on CPUs with native bf16 (LESS/TRAK: fp16 input), else fp32;
- then each projected vector is L2-normalised and stored as float16.

Units and caching: the rows to compute (every pool row, or those of a `rows` stage such as a
`Shortlist`: the two-stage selection) are cut into units of at most UNIT_ROWS (256) rows within
a pool shard. One float16 file per (checkpoint, unit), keyed by the checkpoint's adapter (and
optimizer state) bytes, the shard's content, the unit's rows and the settings, so a killed run
resumes at the first missing unit and a pool that gains a shard computes only its units; each
unit logs a line (rows, tokens, seconds) and advances a progress bar. The `c<j>.npy` matrices
are then concatenated in pool order (`positions()` maps their rows to the pool's when a `rows`
stage chose them). This is a whole-pool stage (the checkpoints are known only once the proxy
stage has run), with per-unit files inside.

Deviations from LESS (docs/less.md): the trainer's LoRA (r=8, alpha 16, lr 2e-4, cosine) instead
of r=128, alpha 512, lr 2e-5, linear; packed batches instead of batch size 1 (the same gradients
in float32; bf16 autocast by default on CPUs with native bf16, within cosine 0.998 of them);
numpy-drawn blocks instead of TRAK's fast_jl kernel (another +-1 matrix; equal in distribution).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from thresher.pipeline.artifacts import ArtifactDir, atomic_path, config_key, file_fingerprint
from thresher.pipeline.models.grads import DEFAULT_GRAD_TOKENS
from thresher.pipeline.models.less_maths import (
    ROW_BLOCK,
    adam_moments,
    adam_precondition,
    checkpoint_etas,
    normalize_rows,
    project,
)
from thresher.pipeline.stage import Resources, Stage, StageRun

log = logging.getLogger(__name__)

FEATURES_VERSION = 2              # 2: packed per-sample gradients (bf16 autocast by default)
UNIT_ROWS = 256                   # rows per unit of work: one cached file per checkpoint and unit


# ---------------------------------------------------------------- one shard

@dataclass
class FeatureJob:
    """What one checkpoint's shards need: the model, its LoRA parameters, Adam moments or None."""

    model: object
    tok: object
    params: dict
    moments: tuple | None
    d: int
    seed: int
    dtype: object
    max_tokens: int
    response_only: bool
    token_budget: int
    project_rows: int
    grad_dtype: str = "fp32"
    how: str = "auto"                 # grads.iter_grads's way (packed where it applies)
    project_seconds: float = 0.0      # time spent in the projection (for the statistics)


def shard_features(job: FeatureJob, rows: list[dict]) -> tuple[np.ndarray, np.ndarray, int]:
    """(float16 [n, d] unit features, bool [n] rows without a loss token, tokens) for rows."""
    import torch
    from thresher.pipeline.models.chat import encode
    from thresher.pipeline.models.grads import flatten, iter_grads

    enc = [encode(job.tok, r, job.max_tokens, job.response_only) for r in rows]
    no_loss = np.array([not e.loss_mask[1:].any() for e in enc], dtype=bool)
    out = np.zeros((len(rows), job.d), dtype=np.float16)
    pending, idx = [], []

    def flush():
        t0 = time.perf_counter()
        x = project(torch.cat(pending), job.d, job.seed, job.dtype)
        out[np.concatenate(idx)] = normalize_rows(x).cpu().numpy().astype(np.float16)
        pending.clear()
        idx.clear()
        job.project_seconds += time.perf_counter() - t0

    for batch_idx, g in iter_grads(job.model, enc, job.params, job.how, job.token_budget,
                                   dtype=job.grad_dtype):
        flat = flatten(g)
        if job.moments is not None:
            flat = adam_precondition(flat, *(t.to(flat.device) for t in job.moments))
        pending.append(flat.to(job.dtype))
        idx.append(np.asarray(batch_idx))
        if sum(len(i) for i in idx) >= job.project_rows:
            flush()
    if pending:
        flush()
    out[no_loss] = 0
    return out, no_loss, int(sum(len(e.input_ids) for e in enc))


# ---------------------------------------------------------------- the stage

@dataclass
class GradFeatureSet:
    """The stage output: per checkpoint a float16 [N, d] matrix aligned to (source) pool order."""

    dir: ArtifactDir
    info: dict

    @property
    def fingerprint(self) -> str:
        return f"grad_features:{self.dir.key}"

    @property
    def etas(self) -> np.ndarray:
        return np.asarray(self.info["etas"], dtype=np.float64)

    @property
    def n_checkpoints(self) -> int:
        return len(self.info["checkpoints"])

    def features(self, j: int) -> np.ndarray:
        return np.load(self.dir.path(f"c{j:03d}.npy"), mmap_mode="r")

    def positions(self) -> np.ndarray | None:
        """Pool positions of the feature rows when the stage ran over some rows only (a
        shortlist), ascending; None when it covers every pool row in order."""
        path = self.dir.path("rows.npy")
        return np.load(path) if path.exists() else None

    def all(self) -> list[np.ndarray]:
        return [self.features(j) for j in range(self.n_checkpoints)]

    def no_loss(self) -> np.ndarray:
        """bool [N]: rows with no loss token (all-zero features; LESS cannot score them)."""
        return np.load(self.dir.path("no_loss.npy"))


@dataclass(frozen=True)
class GradFeatures(Stage):
    """LESS gradient features of every row at every checkpoint of the warm-up `proxy` stage."""

    kind: ClassVar[str] = "grad_features"
    per_shard: ClassVar[bool] = False
    loads_model: ClassVar[bool] = True
    proxy: Stage | None = None
    rows: Stage | None = None         # only these pool rows (a `Shortlist` stage); None: all
    d: int = 8192
    seed: int = 0
    grad: Literal["auto", "adam", "sgd"] = "auto"
    params: str = "lora"
    max_tokens: int = 512
    response_only: bool = True
    dtype: str | None = None          # the projection's: bf16 | fp32 (None: by device, `bind`)
    grad_dtype: str | None = None     # the gradient pass's autocast: bf16 | fp32 (None: `bind`)
    token_budget: int = field(default=DEFAULT_GRAD_TOKENS, compare=False, metadata={"key": False})
    project_rows: int = field(default=256, compare=False, metadata={"key": False})

    def __post_init__(self):
        if self.proxy is None:
            raise ValueError("grad_features need a warm-up proxy stage (proxy=Proxy(...))")
        if min(self.d, self.project_rows, self.token_budget) < 1:
            raise ValueError(f"grad_features: d, project_rows and token_budget must be >= 1, got "
                             f"{self.d}, {self.project_rows}, {self.token_budget}")
        if self.grad not in ("auto", "adam", "sgd"):
            raise ValueError(f"grad must be auto, adam or sgd, got {self.grad!r}")
        if self.dtype not in (None, "bf16", "fp32"):
            raise ValueError(f"projection dtype must be bf16 or fp32, got {self.dtype!r}")
        if self.grad_dtype not in (None, "bf16", "fp32"):
            raise ValueError(f"gradient dtype must be bf16 or fp32, got {self.grad_dtype!r}")

    def deps(self) -> tuple[Stage, ...]:
        return (*super().deps(), self.proxy, *((self.rows,) if self.rows is not None else ()))

    def bind(self, device: str) -> GradFeatures:
        if self.dtype is not None and self.grad_dtype is not None:
            return self
        import torch
        from thresher.pipeline.models.engine import engine_dtype

        native = "bf16" if engine_dtype(device) == torch.bfloat16 else "fp32"
        return dataclasses.replace(self, dtype=self.dtype or native,
                                   grad_dtype=self.grad_dtype or native)

    def mode(self) -> str:
        """adam for the pool, sgd for a target set (LESS), unless `grad` says otherwise."""
        return self.grad if self.grad != "auto" else ("adam" if self.source is None else "sgd")

    def key_extra(self) -> dict:
        return {"mode": self.mode(), "version": FEATURES_VERSION, "row_block": ROW_BLOCK}

    def resources(self) -> Resources:
        return Resources(cpus=2, gpus=1, memory_gb=6)

    def _shard_dir(self, run: StageRun, ckpt: Path) -> Path:
        names = ["adapter_model.safetensors", "adapter_config.json"]
        if self.mode() == "adam":
            names.append("state.safetensors")
        parts = [file_fingerprint(ckpt / n) for n in names]
        d = run.store.root / self.kind / config_key(self.key_config(), parts) / "shards"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _job(self, ckpt: Path, device: str) -> FeatureJob:
        import torch
        from thresher.pipeline.models.grads import select_params
        from thresher.pipeline.training.train import load_trained

        model, tok = load_trained(ckpt, device)
        params = select_params(model, self.params)
        moments = adam_moments(ckpt, params) if self.mode() == "adam" else None
        dtype = torch.bfloat16 if self.dtype == "bf16" else torch.float32
        return FeatureJob(model, tok, params, moments, self.d, self.seed, dtype, self.max_tokens,
                          self.response_only, self.token_budget, self.project_rows,
                          self.grad_dtype or "fp32")

    def _units(self, run: StageRun) -> list[tuple[Path, np.ndarray]]:
        """(shard, shard-local row positions) of every unit, in pool order: the rows to compute
        (all, or those of the `rows` stage) in chunks of at most UNIT_ROWS within a shard."""
        import pyarrow.parquet as pq

        keep = None if self.rows is None else run.deps[self.rows].rows
        units, start = [], 0
        for shard in run.pool.shards:
            n = pq.ParquetFile(shard).metadata.num_rows
            local = np.arange(n) if keep is None else \
                keep[(keep >= start) & (keep < start + n)] - start
            units += [(shard, local[s:s + UNIT_ROWS]) for s in range(0, len(local), UNIT_ROWS)]
            start += n
        return units

    def _checkpoint(self, run: StageRun, ckpt: Path, units, stats: dict, bar) -> list[Path]:
        """Fill the missing unit files of one checkpoint; returns them in pool order."""
        import hashlib

        from thresher.pipeline.executors import read_shard

        folder, files, job, cache = self._shard_dir(run, ckpt), [], None, {}
        for i, (shard, local) in enumerate(units):
            rows_key = hashlib.sha256(np.ascontiguousarray(local, dtype=np.int64)).hexdigest()[:12]
            path = folder / f"{run.pool.shard_fingerprint(shard)[:32]}-{rows_key}.npy"
            files.append(path)
            if path.exists():
                stats["units_cached"] += 1
                bar.update(len(local))
                continue
            if shard not in cache:                     # consecutive units share a shard read
                cache = {shard: read_shard(shard, self.columns())}
            job = job or self._job(ckpt, run.device)
            t0 = time.perf_counter()
            feats, no_loss, tokens = shard_features(job, [cache[shard][k] for k in local])
            with atomic_path(path.with_suffix(".noloss.npy")) as tmp, open(tmp, "wb") as f:
                np.save(f, no_loss)
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.save(f, feats)
            sec = time.perf_counter() - t0
            stats["units_computed"] += 1
            stats["rows_computed"] += len(feats)
            stats["tokens"] += tokens
            stats["project_seconds"] += job.project_seconds
            job.project_seconds = 0.0
            bar.update(len(local))
            log.info("grad_features: %s unit %d/%d done (%d rows, %d tokens, %.1f s, %.2f rows/s)",
                     ckpt.name, i + 1, len(units), len(feats), tokens, sec, len(feats) / sec)
        return files

    def run_whole(self, run: StageRun) -> dict:
        from thresher.pipeline.progress import stage_bar

        proxy = run.deps[self.proxy]
        ckpts = [Path(c) for c in proxy.checkpoints]
        units = self._units(run)
        n = sum(len(local) for _, local in units)
        stats = {"units_computed": 0, "units_cached": 0, "rows_computed": 0, "tokens": 0,
                 "project_seconds": 0.0}
        t0 = time.perf_counter()
        with stage_bar("grad_features", n * len(ckpts)) as bar:
            for j, ckpt in enumerate(ckpts):
                files = self._checkpoint(run, ckpt, units, stats, bar)
                _concat(files, run.dir, f"c{j:03d}.npy", self.d)
        no_loss = np.concatenate([np.load(f.with_suffix(".noloss.npy")) for f in files]) \
            if files else np.zeros(0, dtype=bool)
        with run.dir.writing("no_loss.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, no_loss)
        if self.rows is not None:
            with run.dir.writing("rows.npy") as tmp, open(tmp, "wb") as f:
                np.save(f, run.deps[self.rows].rows)
        seconds = time.perf_counter() - t0
        return {"rows": n, "pool_rows": run.pool.n_rows, "checkpoints": [str(c) for c in ckpts],
                "steps": list(proxy.steps), "etas": checkpoint_etas(ckpts).tolist(),
                "mode": self.mode(), "d": self.d, "no_loss_rows": int(no_loss.sum()),
                "units": len(units), "feature_seconds": round(seconds, 2),
                "seconds_per_row": round(seconds / max(1, stats["rows_computed"]), 4),
                **stats, "project_seconds": round(stats["project_seconds"], 2),
                # the plan's statistics count this stage's units as its shards
                "shards_computed": stats["units_computed"], "shards_cached": stats["units_cached"]}

    def load(self, run: StageRun) -> GradFeatureSet:
        return GradFeatureSet(run.dir, run.dir.info())


def _concat(files: list[Path], out: ArtifactDir, name: str, d: int) -> None:
    """Shard matrices -> one float16 [N, d] .npy in pool order, streamed (never all in memory)."""
    n = sum(np.load(f, mmap_mode="r").shape[0] for f in files)
    with out.writing(name) as tmp:
        dest = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, d))
        at = 0
        for f in files:
            block = np.load(f, mmap_mode="r")
            dest[at:at + len(block)] = block
            at += len(block)
        dest.flush()
        del dest


# ---------------------------------------------------------------- the warm-up proxy

def warmup_proxy(n_rows: int, model: str | None = None, part: float = 0.05, min_rows: int = 32,
                 epochs: int = 4, seed: int = 0, lr: float = 2e-4, batch_size: int = 8,
                 max_tokens: int = 512, dtype: str | None = None) -> Stage:
    """LESS's warm-up as a `Proxy` stage: LoRA on a seeded random `part` of the pool (at least
    `min_rows` rows), `epochs` epochs, a checkpoint at the end of each epoch."""
    from thresher.pipeline.models.resolve import DEFAULT_LM
    from thresher.pipeline.stages.trajectories import Proxy

    if not 0 < part <= 1 or min_rows < 1 or epochs < 1:
        raise ValueError(f"warm-up: need 0 < part <= 1, min_rows >= 1, epochs >= 1; got "
                         f"part={part}, min_rows={min_rows}, epochs={epochs}")
    share = min(1.0, max(part, min_rows / max(1, n_rows)))
    return Proxy(model=model or DEFAULT_LM, part=share, seed=seed, epochs=epochs, lr=lr,
                 batch_size=batch_size, max_tokens=max_tokens, checkpoints=epochs, dtype=dtype)
