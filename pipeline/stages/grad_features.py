"""LESS gradient features (Xia et al. 2024; methods-b.md §4.2) as a cached stage: per warm-up
checkpoint, every row's LoRA gradient, randomly projected to `d` dimensions and L2-normalised.

    warm = warmup_proxy(n_rows=pool.n_rows)                     # a `Proxy`: 5% of the pool, 4 epochs
    pool_feats = GradFeatures(proxy=warm, d=8192)               # Adam-preconditioned (pool rows)
    target_feats = GradFeatures(proxy=warm, d=8192, over=TargetPool(path="t.jsonl"))   # SGD
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
- pool rows (`grad="adam"`, the default without `over`): Gamma = m' / sqrt(v' + 1e-8) with
  m' = 0.9 m + 0.1 g and v' = 0.999 v + 0.001 g^2, m and v the checkpoint's AdamW moments
  (saved by the trainer in `state.safetensors`) (LESS `obtain_gradients_with_adam`); target rows
  (`grad="sgd"`, the default with an `over` target): g itself;
- x R with R a [P, d] Rademacher (+-1) matrix, seeded, never built whole: rows of R come in
  blocks of `ROW_BLOCK` parameters, block b drawn from numpy's `default_rng([seed, b])`
  (`rademacher_block`), so the same seed gives the same R for pool and targets on any machine;
  pending gradients are gathered to `project_rows` (256) rows so each block is drawn once per
  group (drawing a block costs about as much as multiplying 100 rows by it);
  the product runs in bf16 on CPUs with native bf16 (LESS/TRAK: fp16 input), else fp32;
- then each projected vector is L2-normalised and stored as float16.

Units: (checkpoint x at most `unit_rows` rows of a shard): every pool row, or only those of a
`rows` stage such as a `Shortlist` (the two-stage selection). Each is keyed by the checkpoint's
adapter (and optimizer state) bytes, the shard's content, the unit's rows and the settings; the
executor runs them one checkpoint at a time (the model loaded once per worker), so a killed run
resumes at the first missing unit and a pool that gains a shard computes only that shard's
units. The checkpoints are known once the proxy stage (a dependency) has run; `assemble`
concatenates the units into one `c<j>.npy` matrix per checkpoint, in pool order (`positions()`
maps their rows to the pool's when a `rows` stage chose them).

Deviations from LESS (docs/target-aware.md, "LESS"): the trainer's LoRA (r=8, alpha 16, lr 2e-4,
cosine) instead of r=128, alpha 512, lr 2e-5, linear; packed batches instead of batch size 1 (the
same gradients in float32; bf16 autocast by default on CPUs with native bf16, within cosine 0.998
of them);
numpy-drawn blocks instead of TRAK's fast_jl kernel (another +-1 matrix; equal in distribution).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from thresher.pipeline.artifacts import ArtifactDir
from thresher.pipeline.models.grads import DEFAULT_GRAD_TOKENS
from thresher.pipeline.models.less_maths import (
    ROW_BLOCK,
    adam_moments,
    adam_precondition,
    checkpoint_etas,
    normalize_rows,
    project,
)
from thresher.pipeline.stage import (
    Resources,
    ShardResult,
    Stage,
    StageRun,
    Unit,
    gather_units,
    unit_done,
    unit_file,
)
from thresher.pipeline.stages.proxy import checkpoint_fingerprint

log = logging.getLogger(__name__)

FEATURES_VERSION = 3              # 3: packed per-sample gradients (bf16 autocast by default)


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
    batch_tokens: int
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

    for batch_idx, g in iter_grads(job.model, enc, job.params, job.how, job.batch_tokens,
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
    batch_tokens: int = field(default=DEFAULT_GRAD_TOKENS, compare=False, metadata={"key": False})
    project_rows: int = field(default=256, compare=False, metadata={"key": False})
    unit_rows: int = 256              # rows per unit of work (a progress line and a resume point)

    def __post_init__(self):
        if self.proxy is None:
            raise ValueError("grad_features need a warm-up proxy stage (proxy=Proxy(...))")
        if min(self.d, self.project_rows, self.batch_tokens, self.unit_rows) < 1:
            raise ValueError(f"grad_features: d, project_rows, batch_tokens and unit_rows must be "
                             f">= 1, got {self.d}, {self.project_rows}, {self.batch_tokens}, "
                             f"{self.unit_rows}")
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
        return self.grad if self.grad != "auto" else ("adam" if self.over is None else "sgd")

    def key_extra(self) -> dict:
        return {"mode": self.mode(), "version": FEATURES_VERSION, "row_block": ROW_BLOCK}

    def resources(self) -> Resources:
        return Resources(cpus=2, gpus=1, memory_gb=6)

    def checkpoints(self, run: StageRun) -> list[Path]:
        return [Path(c) for c in run.deps[self.proxy].checkpoints]


    def _chunks(self, run: StageRun) -> list[tuple[Unit, str, tuple | None, tuple | None, int, str]]:
        """(shard unit, key part, row range, positions, size, label part) of every row chunk in
        pool order: `unit_rows` rows of a shard at a time, of every row or only of the rows the
        `rows` stage keeps (shard-local positions). The same for every checkpoint."""
        keep = None if self.rows is None else run.deps[self.rows].rows
        out, start = [], 0
        for shard in run.pool.shards:
            base, n = run.shard_unit(shard), run.pool.shard_rows(shard)
            if keep is None:
                for lo in range(0, n, self.unit_rows):
                    hi = min(n, lo + self.unit_rows)
                    out.append((base, f"{lo}", (lo, hi), None, hi - lo, f"[{lo}:{hi}]"))
            else:
                local = keep[(keep >= start) & (keep < start + n)] - start
                for lo in range(0, len(local), self.unit_rows):
                    picks = tuple(int(i) for i in local[lo:lo + self.unit_rows])
                    digest = hashlib.sha256(np.asarray(picks, np.int64).tobytes()).hexdigest()
                    out.append((base, f"p{digest[:16]}", None, picks, len(picks),
                                f"[{len(picks)} rows]"))
            start += n
        return out

    def units(self, run: StageRun) -> list[Unit]:
        """(checkpoint x row chunk) units: at most `unit_rows` rows of one shard at one checkpoint."""
        chunks, out = self._chunks(run), []
        for j, ckpt in enumerate(self.checkpoints(run)):
            ck = checkpoint_fingerprint(ckpt, with_state=self.mode() == "adam")[:16]
            for base, key, span, picks, size, where in chunks:
                out.append(Unit(f"{ck}-{base.key}-{key}", base.shard, span,
                                ("checkpoint", str(ckpt)), size,
                                f"checkpoint {j} {base.label}{where}", positions=picks))
        return out

    def open_worker(self, device: str, key: tuple = ()) -> FeatureJob:
        import torch
        from thresher.pipeline.models.grads import select_params
        from thresher.pipeline.training.train import load_trained

        ckpt = Path(key[1])
        model, tok = load_trained(ckpt, device)
        params = select_params(model, self.params)
        moments = adam_moments(ckpt, params) if self.mode() == "adam" else None
        dtype = torch.bfloat16 if self.dtype == "bf16" else torch.float32
        return FeatureJob(model, tok, params, moments, self.d, self.seed, dtype, self.max_tokens,
                          self.response_only, self.batch_tokens, self.project_rows,
                          self.grad_dtype or "fp32")

    def run_shard(self, worker: FeatureJob, rows: list[dict]) -> ShardResult:
        worker.project_seconds = 0.0
        feats, no_loss, tokens = shard_features(worker, rows)
        return ShardResult(arrays={"features": feats, "noloss": no_loss}, tokens=tokens,
                           info={"project_seconds": round(worker.project_seconds, 4)})

    def assemble(self, run: StageRun) -> dict:
        """Per checkpoint one float16 [N, d] matrix (`c<j>.npy`, pool order), `no_loss.npy`, and
        with a `rows` stage the pool positions of the N rows (`rows.npy`)."""
        ckpts, units = self.checkpoints(run), self.units(run)
        per_ckpt = len(units) // max(1, len(ckpts))
        for j in range(len(ckpts)):
            part = units[j * per_ckpt:(j + 1) * per_ckpt]
            run.dir.concat_arrays([unit_file(run, u, "features.npy") for u in part], f"c{j:03d}.npy")
        no_loss = gather_units(run, units[:per_ckpt], "noloss.npy") if per_ckpt else \
            np.zeros(0, dtype=bool)
        run.dir.save_array("no_loss.npy", no_loss)
        if self.rows is not None:
            run.dir.save_array("rows.npy", run.deps[self.rows].rows)
        infos = [unit_done(run, u) for u in units]
        seconds = sum(i["seconds"] for i in infos)
        proxy = run.deps[self.proxy]
        return {"rows": len(no_loss), "pool_rows": run.pool.n_rows,
                "checkpoints": [str(c) for c in ckpts],
                "steps": list(proxy.steps), "etas": checkpoint_etas(ckpts).tolist(),
                "mode": self.mode(), "d": self.d, "no_loss_rows": int(no_loss.sum()),
                "feature_seconds": round(seconds, 2),
                "seconds_per_row": round(seconds / max(1, len(no_loss) * len(ckpts)), 4),
                "project_seconds": round(sum(i.get("project_seconds", 0.0) for i in infos), 2)}

    def load(self, run: StageRun) -> GradFeatureSet:
        return GradFeatureSet(run.dir, run.dir.info())
