"""LESS gradient features (Xia et al. 2024; methods-b.md §4.2) as a cached stage: per warm-up
checkpoint, every row's LoRA gradient, randomly projected to `d` dimensions and L2-normalised.

    warm = warmup_proxy(n_rows=pool.n_rows)                     # a `Proxy`: 5% of the pool, 4 epochs
    pool_feats = GradFeatures(proxy=warm, d=8192)               # Adam-preconditioned (pool rows)
    target_feats = GradFeatures(proxy=warm, d=8192, source=TargetPool(path="t.jsonl"))   # SGD
    fs = run_stage(pool_feats, pool, store)                     # -> GradFeatureSet
    fs.features(j)   # float16 [N, d] memmap for checkpoint j, pool order, unit rows (0: no loss token)
    fs.etas          # float64 [K]: each checkpoint's mean learning rate over its epoch, sum 1

Per checkpoint theta_j (base + adapter from the trainer's `checkpoint-<step>/`):
- g = per-sample gradient of the row's mean response-token loss over the LoRA matrices
  (`pipeline/models/grads.py`, batched with vmap; LESS: one backward call per row);
- pool rows (`grad="adam"`, the default without `source`): Gamma = m' / sqrt(v' + 1e-8) with
  m' = 0.9 m + 0.1 g and v' = 0.999 v + 0.001 g^2, m and v the checkpoint's AdamW moments
  (saved by the trainer in `state.safetensors`) (LESS `obtain_gradients_with_adam`); target rows
  (`grad="sgd"`, the default with a `source`): g itself;
- x R with R a [P, d] Rademacher (+-1) matrix, seeded, never built whole: rows of R come in
  blocks of `ROW_BLOCK` parameters, block b drawn from numpy's `default_rng([seed, b])`
  (`rademacher_block`), so the same seed gives the same R for pool and targets on any machine;
  pending gradients are gathered to `project_rows` rows so each block is drawn once per group;
  the product runs in bf16 on CPUs with native bf16 (LESS/TRAK: fp16 input), else fp32;
- then each projected vector is L2-normalised and stored as float16.

Caching: one float16 file per (checkpoint, pool shard), keyed by the checkpoint's adapter (and
optimizer state) bytes, the shard's content and the settings, so a killed run resumes at the
first missing shard and a pool that gains a shard computes only that one; the pool-level
`c<j>.npy` matrices are then concatenated in pool order. This is a whole-pool stage (the
checkpoints are known only once the proxy stage has run), with per-shard files inside.

Deviations from LESS (README "LESS"): the trainer's LoRA (r=8, alpha 16, lr 2e-4, cosine) instead
of r=128, alpha 512, lr 2e-5, linear; vmap batches instead of batch size 1 (the same gradients);
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
from thresher.pipeline.io.memmap import reserved_memmap
from thresher.pipeline.models.grads import DEFAULT_GRAD_TOKENS
from thresher.pipeline.stage import Resources, Stage, StageRun

log = logging.getLogger(__name__)

FEATURES_VERSION = 1
ROW_BLOCK = 1024                 # parameters per block of R (part of R's definition)
BETA1, BETA2, ADAM_EPS = 0.9, 0.999, 1e-8     # LESS obtain_gradients_with_adam


# ---------------------------------------------------------------- the random projection

def rademacher_block(seed: int, block: int, rows: int, d: int, dtype=None):
    """Rows [block*ROW_BLOCK, block*ROW_BLOCK + rows) of R: +-1 entries as a torch tensor
    [rows, d] (bit 1 of `default_rng([seed, block])`'s bytes, most significant first, is -1)."""
    import torch

    n = ROW_BLOCK * d
    raw = np.random.default_rng([seed, block]).bytes((n + 7) // 8)
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8))[:rows * d]
    if dtype in (None, torch.float32):            # the sign bit on 1.0 (no float arithmetic)
        words = bits.astype(np.uint32) << 31
        words |= np.uint32(0x3F800000)
        return torch.from_numpy(words.view(np.float32)).view(rows, d)
    if dtype == torch.bfloat16:
        words = bits.astype(np.uint16) << 15
        words |= np.uint16(0x3F80)
        return torch.from_numpy(words.view(np.int16)).view(torch.bfloat16).view(rows, d)
    raise ValueError(f"rademacher_block: unsupported dtype {dtype}")


def rademacher_matrix(n_params: int, d: int, seed: int = 0):
    """R whole, float32 [n_params, d]: for tests and small P only."""
    import torch

    blocks = [rademacher_block(seed, b, min(ROW_BLOCK, n_params - b * ROW_BLOCK), d)
              for b in range(-(-n_params // ROW_BLOCK))]
    return torch.cat(blocks)


def project(grads, d: int, seed: int = 0, dtype=None):
    """grads [B, P] @ R -> float32 [B, d], block by block (R is never held whole); `dtype` is
    the product's dtype (float32 or bfloat16; accumulation in float32 either way)."""
    import torch

    dtype = dtype or torch.float32
    n_params = grads.shape[1]
    out = torch.zeros(grads.shape[0], d, dtype=torch.float32, device=grads.device)
    for b in range(-(-n_params // ROW_BLOCK)):
        lo = b * ROW_BLOCK
        hi = min(n_params, lo + ROW_BLOCK)
        r = rademacher_block(seed, b, hi - lo, d, dtype).to(grads.device)
        out += (grads[:, lo:hi].to(dtype) @ r).float()
    return out


def normalize_rows(x):
    """Each row / its L2 norm (zero rows stay zero)."""
    import torch

    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-12)


# ---------------------------------------------------------------- Adam state and LRs

def adam_moments(checkpoint: Path, params: dict):
    """(m, v): the checkpoint's AdamW exp_avg / exp_avg_sq, flat float32 [P] in `params` order.

    The trainer's optimizer holds exactly the LoRA parameters in model order, which is the order
    `select_params(model, "lora")` gives for the reloaded model; shapes are checked."""
    import torch
    from thresher.pipeline.io.safestate import load_state

    opt = load_state(checkpoint, "state")["optimizer"]
    order = [i for g in opt["param_groups"] for i in g["params"]]
    if len(order) != len(params):
        raise ValueError(f"{checkpoint}: optimizer state has {len(order)} parameters, the model "
                         f"{len(params)} LoRA parameters; LESS needs the trainer's own checkpoints")
    m, v = [], []
    for i, (name, p) in zip(order, params.items()):
        st = opt["state"].get(i)
        if st is None or st["exp_avg"].shape != p.shape:
            raise ValueError(f"{checkpoint}: no matching Adam state for {name}")
        m.append(st["exp_avg"].reshape(-1).float())
        v.append(st["exp_avg_sq"].reshape(-1).float())
    return torch.cat(m), torch.cat(v)


def adam_precondition(g, m, v):
    """LESS's Adam direction for per-sample gradients g [B, P]: m' / sqrt(v' + eps)."""
    m2 = BETA1 * m + (1 - BETA1) * g
    v2 = BETA2 * v + (1 - BETA2) * g * g
    return m2 / (v2 + ADAM_EPS).sqrt()


def checkpoint_etas(checkpoints: list[Path]) -> np.ndarray:
    """eta_j: the mean learning rate over the steps after checkpoint j-1 up to checkpoint j
    (an epoch with one checkpoint per epoch), renormalised to sum 1 (LESS matching.py)."""
    from thresher.pipeline.io.safestate import load_state

    history = load_state(checkpoints[-1], "state")["history"]
    lr = {int(r["step"]): float(r["lr"]) for r in history}
    steps = [int(Path(c).name.split("-")[1]) for c in checkpoints]
    means, prev = [], 0
    for s in steps:
        window = [lr[k] for k in range(prev + 1, s + 1) if k in lr]
        if not window:
            raise ValueError(f"{checkpoints[-1]}: no learning rate logged for steps {prev + 1}..{s}")
        means.append(np.mean(window))
        prev = s
    etas = np.asarray(means, dtype=np.float64)
    return etas / etas.sum()


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

    for batch_idx, g in iter_grads(job.model, enc, job.params, token_budget=job.token_budget):
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
    d: int = 8192
    seed: int = 0
    grad: Literal["auto", "adam", "sgd"] = "auto"
    params: str = "lora"
    max_tokens: int = 512
    response_only: bool = True
    dtype: str | None = None          # the projection's: bf16 | fp32 (None: by device, `bind`)
    token_budget: int = field(default=DEFAULT_GRAD_TOKENS, compare=False, metadata={"key": False})
    project_rows: int = field(default=64, compare=False, metadata={"key": False})

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

    def deps(self) -> tuple[Stage, ...]:
        return (*super().deps(), self.proxy)

    def bind(self, device: str) -> GradFeatures:
        if self.dtype is not None:
            return self
        import torch
        from thresher.pipeline.models.engine import engine_dtype

        return dataclasses.replace(self, dtype="bf16" if engine_dtype(device) == torch.bfloat16 else "fp32")

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
                          self.response_only, self.token_budget, self.project_rows)

    def _checkpoint(self, run: StageRun, ckpt: Path, stats: dict) -> list[Path]:
        """Fill the missing shard files of one checkpoint; returns them in pool order."""
        from thresher.pipeline.executors import read_shard

        folder, files, job = self._shard_dir(run, ckpt), [], None
        for shard in run.pool.shards:
            path = folder / f"{run.pool.shard_fingerprint(shard)[:32]}.npy"
            files.append(path)
            if path.exists():
                stats["shards_cached"] += 1
                continue
            job = job or self._job(ckpt, run.device)
            feats, no_loss, tokens = shard_features(job, read_shard(shard, self.columns()))
            with atomic_path(path.with_suffix(".noloss.npy")) as tmp, open(tmp, "wb") as f:
                np.save(f, no_loss)
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.save(f, feats)
            stats["shards_computed"] += 1
            stats["rows_computed"] += len(feats)
            stats["tokens"] += tokens
            stats["project_seconds"] += job.project_seconds
            job.project_seconds = 0.0
            log.info("grad_features: %s, shard %s done", ckpt.name, shard.stem)
        return files

    def run_whole(self, run: StageRun) -> dict:
        proxy = run.deps[self.proxy]
        ckpts = [Path(c) for c in proxy.checkpoints]
        stats = {"shards_computed": 0, "shards_cached": 0, "rows_computed": 0, "tokens": 0,
                 "project_seconds": 0.0}
        t0 = time.perf_counter()
        for j, ckpt in enumerate(ckpts):
            files = self._checkpoint(run, ckpt, stats)
            _concat(files, run.dir, f"c{j:03d}.npy", self.d)
        no_loss = np.concatenate([np.load(f.with_suffix(".noloss.npy")) for f in files])
        with run.dir.writing("no_loss.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, no_loss)
        seconds = time.perf_counter() - t0
        return {"rows": run.pool.n_rows, "checkpoints": [str(c) for c in ckpts],
                "steps": list(proxy.steps), "etas": checkpoint_etas(ckpts).tolist(),
                "mode": self.mode(), "d": self.d, "no_loss_rows": int(no_loss.sum()),
                "feature_seconds": round(seconds, 2),
                "seconds_per_row": round(seconds / max(1, stats["rows_computed"]), 4),
                **stats, "project_seconds": round(stats["project_seconds"], 2)}

    def load(self, run: StageRun) -> GradFeatureSet:
        return GradFeatureSet(run.dir, run.dir.info())


def _concat(files: list[Path], out: ArtifactDir, name: str, d: int) -> None:
    """Shard matrices -> one float16 [N, d] .npy in pool order, streamed (never all in memory)."""
    n = sum(np.load(f, mmap_mode="r").shape[0] for f in files)
    with out.writing(name) as tmp:
        dest = reserved_memmap(tmp, np.float16, (n, d))
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
