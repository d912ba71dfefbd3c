"""LESS gradient features (Xia et al. 2024; methods-b.md §4.2) as a cached stage: per warm-up
checkpoint, every row's LoRA gradient, randomly projected to `d` dimensions and L2-normalised.

    warm = warmup_proxy(n_rows=pool.n_rows)                     # a `Proxy`: 5% of the pool, 4 epochs
    pool_feats = GradFeatures(proxy=warm, d=8192)               # Adam-preconditioned (pool rows)
    target_feats = GradFeatures(proxy=warm, d=8192, over=TargetPool(path="t.jsonl"))   # SGD
    fs = run_stage(pool_feats, pool, store)                     # -> GradFeatureSet
    fs.features(j)   # float16 [N, d] memmap for checkpoint j, pool order, unit rows (0: no loss token)
    fs.etas          # float64 [K]: each checkpoint's mean learning rate over its epoch, sum 1

Per checkpoint theta_j (base + adapter from the trainer's `checkpoint-<step>/`):
- g = per-sample gradient of the row's mean response-token loss over the LoRA matrices
  (`pipeline/models/grads.py`, batched with vmap; LESS: one backward call per row);
- pool rows (`grad="adam"`, the default without `over`): Gamma = m' / sqrt(v' + 1e-8) with
  m' = 0.9 m + 0.1 g and v' = 0.999 v + 0.001 g^2, m and v the checkpoint's AdamW moments
  (saved by the trainer in `state.safetensors`) (LESS `obtain_gradients_with_adam`); target rows
  (`grad="sgd"`, the default with an `over` target): g itself;
- x R with R a [P, d] Rademacher (+-1) matrix, seeded, never built whole: rows of R come in
  blocks of `ROW_BLOCK` parameters, block b drawn from numpy's `default_rng([seed, b])`
  (`rademacher_block`), so the same seed gives the same R for pool and targets on any machine;
  pending gradients are gathered to `project_rows` rows so each block is drawn once per group;
  the product runs in bf16 on CPUs with native bf16 (LESS/TRAK: fp16 input), else fp32;
- then each projected vector is L2-normalised and stored as float16.

Units: (checkpoint x `unit_rows` rows of a shard), each keyed by the checkpoint's adapter (and
optimizer state) bytes, the shard's content, the row range and the settings; the executor runs
them one checkpoint at a time (the model loaded once per worker), so a killed run resumes at the
first missing unit and a pool that gains a shard computes only that shard's units. The
checkpoints are known once the proxy stage (a dependency) has run; `assemble` concatenates the
units into one `c<j>.npy` matrix per checkpoint, in pool order.

Deviations from LESS (docs/target-aware.md, "LESS"): the trainer's LoRA (r=8, alpha 16, lr 2e-4, cosine) instead
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
from thresher.pipeline.artifacts import ArtifactDir
from thresher.pipeline.models.grads import DEFAULT_GRAD_TOKENS
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

FEATURES_VERSION = 2
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
    unit_rows: int = 256              # rows per unit of work (a progress line and a resume point)

    def __post_init__(self):
        if self.proxy is None:
            raise ValueError("grad_features need a warm-up proxy stage (proxy=Proxy(...))")
        if min(self.d, self.project_rows, self.token_budget, self.unit_rows) < 1:
            raise ValueError(f"grad_features: d, project_rows, token_budget and unit_rows must be "
                             f">= 1, got {self.d}, {self.project_rows}, {self.token_budget}, "
                             f"{self.unit_rows}")
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
        return self.grad if self.grad != "auto" else ("adam" if self.over is None else "sgd")

    def key_extra(self) -> dict:
        return {"mode": self.mode(), "version": FEATURES_VERSION, "row_block": ROW_BLOCK}

    def resources(self) -> Resources:
        return Resources(cpus=2, gpus=1, memory_gb=6)

    def checkpoints(self, run: StageRun) -> list[Path]:
        return [Path(c) for c in run.deps[self.proxy].checkpoints]


    def units(self, run: StageRun) -> list[Unit]:
        """(checkpoint x row chunk) units: `unit_rows` rows of one shard at one checkpoint."""
        out = []
        for j, ckpt in enumerate(self.checkpoints(run)):
            ck = checkpoint_fingerprint(ckpt, with_state=self.mode() == "adam")[:16]
            for shard in run.pool.shards:
                base, n = run.shard_unit(shard), run.pool.shard_rows(shard)
                for lo in range(0, n, self.unit_rows):
                    hi = min(n, lo + self.unit_rows)
                    out.append(Unit(f"{ck}-{base.key}-{lo}", base.shard, (lo, hi),
                                    ("checkpoint", str(ckpt)), hi - lo,
                                    f"checkpoint {j} {base.label}[{lo}:{hi}]"))
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
                          self.response_only, self.token_budget, self.project_rows)

    def run_shard(self, worker: FeatureJob, rows: list[dict]) -> ShardResult:
        worker.project_seconds = 0.0
        feats, no_loss, tokens = shard_features(worker, rows)
        return ShardResult(arrays={"features": feats, "noloss": no_loss}, tokens=tokens,
                           info={"project_seconds": round(worker.project_seconds, 4)})

    def assemble(self, run: StageRun) -> dict:
        """Per checkpoint one float16 [N, d] matrix (`c<j>.npy`, pool order), and `no_loss.npy`."""
        ckpts, units = self.checkpoints(run), self.units(run)
        per_ckpt = len(units) // max(1, len(ckpts))
        for j in range(len(ckpts)):
            part = units[j * per_ckpt:(j + 1) * per_ckpt]
            run.dir.concat_arrays([unit_file(run, u, "features.npy") for u in part], f"c{j:03d}.npy")
        no_loss = gather_units(run, units[:per_ckpt], "noloss.npy")
        run.dir.save_array("no_loss.npy", no_loss)
        infos = [unit_done(run, u) for u in units]
        seconds = sum(i["seconds"] for i in infos)
        proxy = run.deps[self.proxy]
        return {"rows": run.pool.n_rows, "checkpoints": [str(c) for c in ckpts],
                "steps": list(proxy.steps), "etas": checkpoint_etas(ckpts).tolist(),
                "mode": self.mode(), "d": self.d, "no_loss_rows": int(no_loss.sum()),
                "feature_seconds": round(seconds, 2),
                "seconds_per_row": round(seconds / max(1, len(no_loss) * len(ckpts)), 4),
                "project_seconds": round(sum(i.get("project_seconds", 0.0) for i in infos), 2)}

    def load(self, run: StageRun) -> GradFeatureSet:
        return GradFeatureSet(run.dir, run.dir.info())
