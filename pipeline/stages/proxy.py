"""Proxy runs: the bundled LoRA trainer on the pool (or a seeded part of it), checkpoints kept,
as a cached stage. S2L's and DEALRec's proxy, EL2N's early reference models and LESS's warm-up
are all `Proxy` stages; their shared parameter sets (`ProxyParams`, `EarlyParams`) live here so
no method imports another.

    run = train_proxy(pool, store, ProxySpec(epochs=3, checkpoints=12))   # cached, resumable
    run.checkpoints       # trainer checkpoint directories, in step order
    run.final             # the trained adapter

The proxy trains on the pool, or on a seeded random fraction of it (`fraction` < 1: each EL2N
seed its own, as Marion et al.'s reference models), with `TrainConfig`'s defaults unless set. The
training run is the stage's one unit: it lives in the stage's directory (`proxy/<key>/run`,
keyed by the pool and the settings) and a killed run resumes from its newest checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
from thresher.pipeline.artifacts import ArtifactStore
from thresher.pipeline.io.pool import Pool
from thresher.pipeline.models.resolve import DEFAULT_LM
from thresher.pipeline.stage import Resources, Stage, StageRun


@dataclass(frozen=True)
class ProxySpec:
    """How to train a proxy. `checkpoints` evenly spaced checkpoints over the run (the last at
    its final step) plus explicit `save_steps`; `stop_after` ends training after that step, and
    `stop_fraction` after that fraction of the run's steps, with a checkpoint there (EL2N needs
    only its early checkpoints; the learning-rate schedule is still the full run's)."""

    model: str = DEFAULT_LM
    fraction: float = 1.0          # the seeded fraction of the pool it trains on
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
        if not 0 < self.fraction <= 1:
            raise ValueError(f"proxy fraction must be in (0, 1], got {self.fraction}")
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
    seconds: float              # the training time it took
    key: str = ""               # the proxy's cache key

    @property
    def fingerprint(self) -> str:
        return f"proxy:{self.key}"

    @property
    def final(self) -> Path:
        """The trained adapter (the run's `adapter/` when it finished, else its last checkpoint)."""
        return self.dir if (self.dir / "adapter").is_dir() else self.checkpoints[-1]


def proxy_rows(pool: Pool, fraction: float, seed: int, keep: np.ndarray | None = None) -> list[dict]:
    """The proxy's training rows: the whole pool (or the pool positions `keep`), or a seeded
    uniform fraction of them (pool order)."""
    columns = ["id", "source", "kind", "messages", "text"]
    if keep is None:
        rows = list(pool.iter_rows(columns))
    else:      # only the kept rows become Python objects (a shortlist of a large pool)
        ids = pool.frame(["id"])["id"].gather(np.asarray(keep)).to_list()
        rows = [r for _, table in pool.iter_selected(ids) for r in table.select(columns).to_pylist()]
    if fraction >= 1:
        return rows
    n = max(1, round(fraction * len(rows)))
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


def train_proxy(pool: Pool, store: ArtifactStore, spec: ProxySpec, device: str | None = None) -> ProxyRun:
    """Train (or reuse) the proxy described by `spec` as a `Proxy` stage; returns its run."""
    from thresher.pipeline.models.resolve import pick_device
    from thresher.pipeline.plan import run_stage

    return run_stage(Proxy(**asdict(spec)), pool, store, pick_device(device))


def train_run(pool: Pool, spec: ProxySpec, run_dir: Path, device: str,
              keep: np.ndarray | None = None) -> dict:
    """Train the proxy into `run_dir` (a killed run resumes from its newest checkpoint) and
    return what its `ProxyRun` is loaded from; `keep`: train on these pool positions only."""
    from thresher.pipeline.models.resolve import load_tokenizer, resolve
    from thresher.pipeline.training.batches import make_examples
    from thresher.pipeline.training.train import TrainConfig, checkpoints, train

    rows = proxy_rows(pool, spec.fraction, spec.seed, keep)
    examples, _, _ = make_examples(load_tokenizer(resolve(spec.model)), rows, spec.max_tokens)
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
    summary = train(rows, run_dir, cfg, stop_after=stop, progress=False)
    found = {int(p.name.split("-")[1]): p for p in checkpoints(run_dir)}
    missing = [s for s in steps if s not in found]
    if missing:
        raise RuntimeError(f"proxy run {run_dir} lacks checkpoints {missing}")
    return {"checkpoints": [found[s].name for s in steps], "steps": list(steps),
            "total_steps": total, "rows": len(rows), "trained_rows": len(examples),
            "train_seconds": summary["seconds"], "final_loss": summary["final_loss"]}


def checkpoint_fingerprint(path: Path, with_state: bool = False) -> str:
    """Identity of a checkpoint: its adapter weights, its adapter config (canonical JSON: peft
    writes `target_modules` from a set, in an order that changes with the process's hash seed),
    its base model, and with `with_state` its optimizer state (`state.safetensors`)."""
    path = Path(path)
    adapter = path / "adapter" if (path / "adapter").is_dir() else path
    weights = sorted(adapter.glob("adapter_model.*"))
    config = adapter / "adapter_config.json"
    if not weights or not config.exists():
        raise FileNotFoundError(f"{path}: not a training checkpoint or run (no adapter files)")
    h = hashlib.sha256()
    for f in weights + ([adapter / "state.safetensors"] if with_state else []):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    h.update(json.dumps(_canonical(json.loads(config.read_text())), sort_keys=True).encode())
    meta = adapter / "checkpoint.json" if (adapter / "checkpoint.json").exists() else path / "train.json"
    if meta.exists():
        h.update(json.dumps(json.loads(meta.read_text()).get("model_identity")).encode())
    return h.hexdigest()[:32]


def _canonical(value):
    """Lists of strings sorted (they are sets in peft's config), recursively."""
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return sorted(value)
    return value


def _spec_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(ProxySpec)]


@dataclass(frozen=True)
class Proxy(Stage, ProxySpec):
    """A proxy LoRA run on the pool: one whole-pool unit, the training run (resumable from its
    checkpoints); loads a `ProxyRun`. Its fields are `ProxySpec`'s (validated there), plus
    `rows`: a stage whose `.rows` are the pool positions to train on (a `Shortlist`: LESS's
    warm-up in the two-stage selection); None, the pool."""

    kind: ClassVar[str] = "proxy"
    per_shard: ClassVar[bool] = False
    loads_model: ClassVar[bool] = True
    counts: ClassVar[str] = "rows"
    rows: Stage | None = None

    def spec(self) -> ProxySpec:
        return ProxySpec(**{n: getattr(self, n) for n in _spec_fields()})

    def deps(self) -> tuple[Stage, ...]:
        return (*super().deps(), *((self.rows,) if self.rows is not None else ()))

    def key_config(self) -> dict:
        """A whole-pool proxy keeps the key it had before `rows` existed (its cache stays valid)."""
        out = super().key_config()
        if self.rows is None:
            del out["rows"]
        return out

    def key_extra(self) -> dict:
        from thresher.pipeline.models.resolve import model_identity

        return {"model": model_identity(self.model)}

    def resources(self) -> Resources:
        return Resources(cpus=2, gpus=1, memory_gb=6)

    def run_whole(self, run: StageRun) -> dict:
        keep = None if self.rows is None else run.deps[self.rows].rows
        return train_run(run.pool, self.spec(), run.dir.path("run"), run.device, keep)

    def load(self, run: StageRun) -> ProxyRun:
        info, run_dir = run.dir.info(), run.dir.path("run")
        return ProxyRun(run_dir, [run_dir / c for c in info["checkpoints"]], info["steps"],
                        info["total_steps"], float(info["train_seconds"]), run.dir.key)


# ---------------------------------------------------------------- shared parameter sets

@dataclass(frozen=True)
class ProxyParams:
    """The proxy options S2L and DEALRec (its surrogate) share."""

    model: str = field(default=DEFAULT_LM, metadata={"help": "proxy causal LM (LoRA-trained)"})
    epochs: int = field(default=3, metadata={"help": "proxy epochs over the pool (S2L: 3)"})
    checkpoints: int = field(default=12, metadata={"help": "evenly spaced proxy checkpoints (S2L: 12)"})
    proxy_part: float = field(default=1.0, metadata={"help": "fraction of the pool the proxy trains on"})
    proxy_seed: int = field(default=0, metadata={"help": "proxy seed (init, order, part)"})
    proxy_lr: float = field(default=2e-4, metadata={"help": "proxy learning rate"})
    proxy_batch_size: int = field(default=8, metadata={"help": "proxy batch size"})
    proxy_dtype: str | None = field(default=None, metadata={
        "help": "proxy autocast: bf16 (fast on CPUs with native bf16) or fp32 (CPU default)"})
    max_tokens: int = field(default=512, metadata={"help": "truncate rows (training and passes)"})


def proxy_stage(p: ProxyParams, **over) -> Proxy:
    return Proxy(model=p.model, fraction=p.proxy_part, seed=p.proxy_seed, epochs=p.epochs, lr=p.proxy_lr,
                 batch_size=p.proxy_batch_size, max_tokens=p.max_tokens,
                 checkpoints=p.checkpoints, dtype=p.proxy_dtype, **over)


def seed_list(seeds: tuple[int, ...]) -> list[int]:
    """`seeds=10` -> 0..9; `seeds=3,7,11` -> those."""
    seeds = list(seeds)
    if len(seeds) == 1:
        if seeds[0] < 1:
            raise ValueError(f"seeds must be >= 1 (a count) or a list, got {seeds[0]}")
        return list(range(seeds[0]))
    return seeds


@dataclass(frozen=True)
class EarlyParams:
    """The early reference proxies EL2N trains (and GraNd's `at=early` reuses)."""

    model: str = field(default=DEFAULT_LM, metadata={"help": "reference causal LM (LoRA-trained)"})
    seeds: tuple[int, ...] = field(default=(10,), metadata={
        "help": "a count (10: seeds 0..9, as the paper) or a list of seeds"})
    proxy_part: float = field(default=0.5, metadata={"help": "seeded fraction of the pool each reference trains on"})
    early: float = field(default=0.55, metadata={"help": "checkpoint after this fraction of one epoch"})
    early_steps: int | None = field(default=None, metadata={"help": "checkpoint after this many steps instead"})
    proxy_lr: float = field(default=2e-4, metadata={"help": "reference learning rate"})
    proxy_batch_size: int = field(default=8, metadata={"help": "reference batch size"})
    proxy_dtype: str | None = field(default=None, metadata={"help": "reference autocast (bf16 / fp32)"})
    max_tokens: int = field(default=512, metadata={"help": "truncate rows"})


def early_proxies(p: EarlyParams) -> list[Proxy]:
    steps = p.early_steps
    return [Proxy(model=p.model, fraction=p.proxy_part, seed=s, epochs=1, lr=p.proxy_lr,
                  batch_size=p.proxy_batch_size, max_tokens=p.max_tokens,
                  save_steps=(steps,) if steps is not None else (), stop_after=steps,
                  stop_fraction=None if steps is not None else p.early, dtype=p.proxy_dtype)
            for s in seed_list(p.seeds)]


def warmup_proxy(n_rows: int, model: str | None = None, part: float = 0.05, min_rows: int = 32,
                 epochs: int = 4, seed: int = 0, lr: float = 2e-4, batch_size: int = 8,
                 max_tokens: int = 512, dtype: str | None = None, rows: Stage | None = None) -> Stage:
    """LESS's warm-up as a `Proxy` stage: LoRA on a seeded random `part` of the pool (at least
    `min_rows` rows), `epochs` epochs, a checkpoint at the end of each epoch. With `rows` (a
    stage keeping `n_rows` pool rows, e.g. a `Shortlist`) the part is of those rows."""
    from thresher.pipeline.models.resolve import DEFAULT_LM

    if not 0 < part <= 1 or min_rows < 1 or epochs < 1:
        raise ValueError(f"warm-up: need 0 < part <= 1, min_rows >= 1, epochs >= 1; got "
                         f"part={part}, min_rows={min_rows}, epochs={epochs}")
    share = min(1.0, max(part, min_rows / max(1, n_rows)))
    return Proxy(model=model or DEFAULT_LM, fraction=share, seed=seed, epochs=epochs, lr=lr,
                 batch_size=batch_size, max_tokens=max_tokens, checkpoints=epochs, dtype=dtype,
                 rows=rows)
