"""Gradient stages on top of `pipeline/models/grads.py`, their work units the executor runs:

    GradNorms(model="smollm2-135m-instruct", lora_seed=3)      # base + a fresh seeded LoRA
    GradNorms(of=Proxy(...))                                    # the proxy's trained adapter
    Influence(surrogate=Proxy(...), params="*layers.{last}.self_attn.o_proj.lora_B*", depth=5000)

`GradNorms` is GraNd's per-seed score and DEALRec's effort score: ||grad loss(x_i)|| per row,
one unit per pool shard. `Influence` is DEALRec's influence on empirical risk, in three phases
that are stages of their own (a composite: its deps are its phases): `InfluenceGrad` sums the
per-sample gradients per shard (v = their sum over the pool's count), `InfluenceLissa` is the
one sequential unit (u = LiSSA estimate of (H + damp*scale I)^-1 v), and `Influence` itself
takes IS_i = u . g_i per shard. Units are keyed by the model's identity (a checkpoint's adapter
bytes, or the base model and LoRA seed) and the shard's content. Gradients are taken in float32
with the model in eval mode (no dropout).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from thresher.pipeline.artifacts import config_key
from thresher.pipeline.models.chat import encode
from thresher.pipeline.models.resolve import DEFAULT_LM
from thresher.pipeline.stage import (
    Resources,
    ShardResult,
    Stage,
    StageRun,
    Unit,
    gather_units,
    unit_done,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelRef:
    """A model to differentiate: `checkpoint` (a trainer checkpoint or run, base + adapter) or
    `model` with a fresh LoRA adapter (the trainer's LoRA settings) initialised from `lora_seed`
    (peft's init: A random, B = 0, so gradients reach the B matrices only)."""

    model: str | None = None
    lora_seed: int = 0
    checkpoint: str | None = None
    lora_r: int = 8
    lora_alpha: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def identity(self) -> str:
        """A short content key of the model (for unit keys)."""
        return config_key(self.key())[:16]

    def key(self) -> dict:
        from thresher.pipeline.models.resolve import resolve
        from thresher.pipeline.stages.proxy import checkpoint_fingerprint

        if self.checkpoint:
            return {"checkpoint": checkpoint_fingerprint(self.checkpoint)}
        return {**asdict(self), "model": resolve(self.model).identity}

    def load(self, device: str):
        """(model, tokenizer) in float32, eval mode, LoRA parameters present."""
        import torch
        from thresher.pipeline.models.resolve import load_causal_lm, load_tokenizer, resolve
        from thresher.pipeline.training.train import load_trained

        if self.checkpoint:
            return load_trained(self.checkpoint, device)
        from peft import LoraConfig, get_peft_model

        resolved = resolve(self.model)
        base = load_causal_lm(resolved, device, dtype=torch.float32)
        torch.manual_seed(self.lora_seed)
        model = get_peft_model(base, LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha,
                                                lora_dropout=0.0, task_type="CAUSAL_LM",
                                                target_modules=list(self.target_modules)))
        return model.eval(), load_tokenizer(resolved)


GRAD_VERSION = 2


@dataclass
class GradWorker:
    model: object
    tok: object
    params: dict           # the parameters differentiated


@dataclass(frozen=True)
class GradStage(Stage):
    """Shared by the gradient stages: units per pool shard keyed by the model's identity, a
    worker holding the model (`ModelRef`) and its chosen parameters."""

    loads_model: ClassVar[bool] = True
    params: str = "lora"
    max_tokens: int = 512
    response_only: bool = True

    def model_ref(self, run: StageRun) -> ModelRef:
        raise NotImplementedError

    def worker_key(self, run: StageRun) -> tuple:
        """What a unit's worker loads: ("model", ModelRef, ...)."""
        return ("model", self.model_ref(run))

    def identity(self, run: StageRun) -> list:
        """What the units' outputs depend on beyond the config and the shard (no paths)."""
        return [self.model_ref(run).key()]

    def key_extra(self) -> dict:
        return {"version": GRAD_VERSION}

    def resources(self) -> Resources:
        return Resources(cpus=2, gpus=1, memory_gb=6)

    def units(self, run: StageRun) -> list[Unit]:
        if not self.per_shard:           # one whole-pool unit, keyed with the stage's inputs
            return super().units(run)
        key, ident = self.worker_key(run), config_key(self.identity(run))[:16]
        return [dataclasses.replace(u, key=f"{ident}-{u.key}", worker=key)
                for u in super().units(run)]

    def open_worker(self, device: str, key: tuple = ()) -> GradWorker:
        from thresher.pipeline.models.grads import select_params

        model, tok = key[1].load(device)
        return GradWorker(model, tok, select_params(model, self.params))

    def encode(self, worker: GradWorker, rows: list[dict]) -> tuple[list, np.ndarray]:
        """(encodings, bool [n] has a loss token)."""
        enc = [encode(worker.tok, r, self.max_tokens, self.response_only) for r in rows]
        return enc, np.array([bool(e.loss_mask.any()) for e in enc], dtype=bool)



@dataclass
class RowValues:
    """A per-row score of a gradient stage (norms, influence) and the stage's statistics."""

    values: np.ndarray          # float64 [N], pool order; NaN: no loss token
    info: dict
    fingerprint: str


@dataclass(frozen=True)
class GradNorms(GradStage):
    """Per-row gradient norm over `params` of `model` + a fresh LoRA (seed `lora_seed`), or of
    the final adapter of the `of` proxy stage."""

    kind: ClassVar[str] = "grad_norms"
    model: str = DEFAULT_LM
    lora_seed: int = 0
    of: Stage | None = None

    def deps(self) -> tuple[Stage, ...]:
        return (*super().deps(), *((self.of,) if self.of is not None else ()))

    def model_ref(self, run: StageRun) -> ModelRef:
        if self.of is not None:
            return ModelRef(checkpoint=str(run.deps[self.of].final))
        return ModelRef(model=self.model, lora_seed=self.lora_seed)

    def run_shard(self, worker: GradWorker, rows: list[dict]) -> ShardResult:
        from thresher.pipeline.models.grads import grad_norms, n_params

        enc, has_loss = self.encode(worker, rows)
        norms = grad_norms(worker.model, enc, worker.params)
        norms[~has_loss] = np.nan
        return ShardResult(arrays={"norms": norms}, tokens=sum(len(e.input_ids) for e in enc),
                           info={"n_params": n_params(worker.params)})

    def assemble(self, run: StageRun) -> dict:
        values = gather_units(run, self.units(run), "norms.npy")
        run.dir.save_array("norms.npy", values)
        first = unit_done(run, self.units(run)[0]) if run.pool.shards else {}
        return {"rows": len(values), "n_params": (first or {}).get("n_params")}

    def load(self, run: StageRun) -> RowValues:
        return RowValues(np.load(run.dir.path("norms.npy")), run.dir.info(),
                         f"grad_norms:{run.dir.key}")


# ---------------------------------------------------------------- DEALRec's influence, in phases

@dataclass(frozen=True)
class InfluenceGrad(GradStage):
    """Phase 1: per shard, the sum of its rows' gradients over `params` of the surrogate's
    adapter and how many rows have a loss token; assembled into v = sum / count."""

    kind: ClassVar[str] = "influence_grad"
    surrogate: Stage = None

    def deps(self) -> tuple[Stage, ...]:
        return (*super().deps(), self.surrogate)

    def model_ref(self, run: StageRun) -> ModelRef:
        return ModelRef(checkpoint=str(run.deps[self.surrogate].final))

    def run_shard(self, worker: GradWorker, rows: list[dict]) -> ShardResult:
        import torch
        from thresher.pipeline.models.grads import n_params, sum_grad

        enc, has_loss = self.encode(worker, rows)
        scored = [e for e, ok in zip(enc, has_loss) if ok]
        total = sum_grad(worker.model, scored, worker.params) if scored else \
            torch.zeros(n_params(worker.params))
        return ShardResult(arrays={"grad_sum": total.cpu().numpy()[None, :].astype(np.float32)},
                           rows=len(rows), tokens=sum(len(e.input_ids) for e in enc),
                           info={"with_loss": len(scored)})

    def assemble(self, run: StageRun) -> dict:
        units = self.units(run)
        total = gather_units(run, units, "grad_sum.npy").astype(np.float64).sum(axis=0)
        count = sum(int(unit_done(run, u)["with_loss"]) for u in units)
        if count == 0:
            raise ValueError("no pool row has a response token to compute influence on")
        run.dir.save_array("v.npy", (total / count).astype(np.float32))
        return {"rows": run.pool.n_rows, "with_loss": count,
                "seconds_v": round(sum(unit_done(run, u)["seconds"] for u in units), 2)}

    def load(self, run: StageRun) -> VectorFile:
        return VectorFile(run.dir.path("v.npy"), run.dir.info(), f"influence_grad:{run.dir.key}")


@dataclass
class VectorFile:
    """A flat parameter-space vector saved by a phase (v, u) and that phase's statistics."""

    path: Path
    info: dict
    fingerprint: str


@dataclass(frozen=True)
class InfluenceLissa(GradStage):
    """Phase 2, one sequential unit: u, the LiSSA estimate of (H + damp*scale I)^-1 v over
    uniformly drawn pool rows (`pipeline/models/grads.lissa`)."""

    kind: ClassVar[str] = "influence_lissa"
    per_shard: ClassVar[bool] = False
    surrogate: Stage = None
    depth: int = 5000
    damp: float = 0.01
    scale: float = 25.0
    batch: int = 1
    seed: int = 0

    def grad_phase(self) -> InfluenceGrad:
        return InfluenceGrad(surrogate=self.surrogate, params=self.params,
                             max_tokens=self.max_tokens, response_only=self.response_only)

    def deps(self) -> tuple[Stage, ...]:
        return (*super().deps(), self.surrogate, self.grad_phase())

    def model_ref(self, run: StageRun) -> ModelRef:
        return ModelRef(checkpoint=str(run.deps[self.surrogate].final))

    def run_whole(self, run: StageRun) -> dict:
        import torch
        from thresher.pipeline.models.grads import hvp, lissa, n_params

        worker = self.open_worker(run.device, self.worker_key(run))
        enc, has_loss = self.encode(worker, list(run.pool.iter_rows(self.columns())))
        scored = [e for e, ok in zip(enc, has_loss) if ok]
        v = torch.from_numpy(np.load(run.deps[self.grad_phase()].path))
        t0 = time.perf_counter()
        u = lissa(lambda h, idx: hvp(worker.model, [scored[i] for i in idx], worker.params, h), v,
                  n=len(scored), depth=self.depth, damp=self.damp, scale=self.scale,
                  batch=self.batch, seed=self.seed)
        run.dir.save_array("u.npy", u.cpu().numpy().astype(np.float32))
        return {"rows": run.pool.n_rows, "seconds_lissa": round(time.perf_counter() - t0, 2),
                "v_norm": float(v.norm()), "u_norm": float(u.norm()),
                "n_params": n_params(worker.params), "params": sorted(worker.params)}

    def load(self, run: StageRun) -> VectorFile:
        return VectorFile(run.dir.path("u.npy"), run.dir.info(), f"influence_lissa:{run.dir.key}")


@dataclass(frozen=True)
class Influence(InfluenceLissa):
    """DEALRec's influence on empirical risk of every row on the `surrogate` proxy's final
    adapter; phase 3: IS_i = u . g_i per shard (its phases are its deps)."""

    kind: ClassVar[str] = "influence"
    per_shard: ClassVar[bool] = True
    params: str = "*layers.{last}.self_attn.o_proj.lora_B*"

    def lissa_phase(self) -> InfluenceLissa:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(InfluenceLissa)}
        return InfluenceLissa(**fields)

    def deps(self) -> tuple[Stage, ...]:
        return (*Stage.deps(self), self.surrogate, self.grad_phase(), self.lissa_phase())

    def worker_key(self, run: StageRun) -> tuple:
        return ("model", self.model_ref(run), str(run.deps[self.lissa_phase()].path))

    def identity(self, run: StageRun) -> list:
        return [*super().identity(run), run.deps[self.lissa_phase()].fingerprint]

    def open_worker(self, device: str, key: tuple = ()) -> GradWorker:
        import torch

        worker = super().open_worker(device, key)
        worker.u = torch.from_numpy(np.load(key[2]))
        return worker

    def run_shard(self, worker: GradWorker, rows: list[dict]) -> ShardResult:
        from thresher.pipeline.models.grads import grad_dots

        enc, has_loss = self.encode(worker, rows)
        dots = np.full(len(rows), np.nan)
        scored = [e for e, ok in zip(enc, has_loss) if ok]
        if scored:
            dots[has_loss] = grad_dots(worker.model, scored, worker.params, worker.u)
        return ShardResult(arrays={"influence": dots}, tokens=sum(len(e.input_ids) for e in enc))

    def assemble(self, run: StageRun) -> dict:
        values = gather_units(run, self.units(run), "influence.npy")
        run.dir.save_array("influence.npy", values)
        lissa_info = run.deps[self.lissa_phase()].info
        return {"rows": len(values), "seconds_v": run.deps[self.grad_phase()].info["seconds_v"],
                **{k: lissa_info.get(k) for k in ("n_params", "seconds_lissa", "params")}}

    def load(self, run: StageRun) -> RowValues:
        return RowValues(np.load(run.dir.path("influence.npy")), run.dir.info(),
                         f"influence:{run.dir.key}")
