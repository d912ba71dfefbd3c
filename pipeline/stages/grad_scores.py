"""Pool-level gradient stages on top of `pipeline/models/grads.py`, cached in the artifact store:

    ref = ModelRef(model="smollm2-135m-instruct", lora_seed=3)        # base + a fresh seeded LoRA
    ref = ModelRef(checkpoint="proxy/.../checkpoint-40")              # a trained adapter
    norms = grad_norm_stage(pool, store, ref, "lora")                  # float64 [N], pool order
    inf = influence_stage(pool, store, ref, "*layers.{last}.self_attn.o_proj.lora_B*", depth=5000)

`grad_norm_stage` is GraNd's per-seed score and DEALRec's effort score (one file per pool shard,
so a killed run resumes); `influence_stage` is DEALRec's influence on empirical risk: v = mean
per-sample gradient over the pool, u = LiSSA estimate of H^-1 v (one, shared), IS_i = u . g_i.
Gradients are taken in float32 with the model in eval mode (no dropout).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np
from thresher.pipeline.artifacts import ArtifactStore, config_key
from thresher.pipeline.io.pool import Pool
from thresher.pipeline.models.chat import encode
from thresher.pipeline.models.resolve import DEFAULT_LM
from thresher.pipeline.stage import Resources, Stage, StageRun

log = logging.getLogger(__name__)

GRAD_VERSION = 1


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

    def key(self) -> dict:
        from thresher.pipeline.models.resolve import resolve
        from thresher.pipeline.stages.trajectories import checkpoint_fingerprint

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


def _settings(max_tokens, response_only, params) -> dict:
    return {"max_tokens": int(max_tokens), "response_only": bool(response_only),
            "params": params if isinstance(params, str) else ",".join(params), "version": GRAD_VERSION}


def grad_norm_stage(pool: Pool, store: ArtifactStore, ref: ModelRef, params: str = "lora",
                    max_tokens: int = 512, response_only: bool = True, how: str = "auto",
                    device: str | None = None, progress=None) -> tuple[np.ndarray, dict]:
    """||grad_theta loss(x_i)||_2 over the chosen parameters for every pool row (float64 [N]);
    NaN where a row has no loss token. Returns (norms, info with seconds and parameter count)."""
    from thresher.pipeline.models.grads import grad_norms, n_params, select_params
    from thresher.pipeline.models.resolve import pick_device

    stage = store.dir("grad_norms", [pool.fingerprint], {"ref": ref.key(),
                                                           **_settings(max_tokens, response_only, params)})
    if not stage.done:
        t0, dev = time.perf_counter(), pick_device(device)
        model = tok = chosen = None
        names = []
        for shard, rows in pool.iter_shards(["id", "kind", "messages", "text"]):
            names.append(shard)
            if stage.has(f"{shard}.npy"):
                continue
            if model is None:
                model, tok = ref.load(dev)
                chosen = select_params(model, params)
            enc = [encode(tok, r, max_tokens, response_only) for r in rows]
            norms = grad_norms(model, enc, chosen, how=how, progress=progress)
            norms[[not e.loss_mask.any() for e in enc]] = np.nan
            with stage.writing(f"{shard}.npy") as tmp, open(tmp, "wb") as f:
                np.save(f, norms)
        stage.complete({"shards": names, "seconds": round(time.perf_counter() - t0, 2),
                        "n_params": n_params(chosen) if chosen else None})
    info = stage.info()
    return np.concatenate([np.load(stage.path(f"{s}.npy")) for s in info["shards"]]), info


def influence_stage(pool: Pool, store: ArtifactStore, ref: ModelRef, params: str,
                    depth: int = 5000, damp: float = 0.01, scale: float = 25.0, batch: int = 1,
                    seed: int = 0, max_tokens: int = 512, response_only: bool = True,
                    how: str = "auto", device: str | None = None,
                    progress=None) -> tuple[np.ndarray, dict]:
    """DEALRec's influence score IS_i = u . grad loss(x_i), u ~ (H + damp*scale I)^-1 v with
    v = (1/n) sum_j grad loss(x_j), by LiSSA over uniformly drawn pool rows (float64 [N]; NaN
    where a row has no loss token)."""
    from thresher.pipeline.models.grads import (
        grad_dots,
        hvp,
        lissa,
        mean_grad,
        n_params,
        select_params,
    )
    from thresher.pipeline.models.resolve import pick_device

    cfg = {"ref": ref.key(), "depth": depth, "damp": damp, "scale": scale, "batch": batch,
           "seed": seed, **_settings(max_tokens, response_only, params)}
    stage = store.dir("influence", [pool.fingerprint], cfg)
    if not stage.done:
        dev = pick_device(device)
        model, tok = ref.load(dev)
        chosen = select_params(model, params)
        rows = list(pool.iter_rows(["id", "kind", "messages", "text"]))
        enc = [encode(tok, r, max_tokens, response_only) for r in rows]
        has_loss = np.array([e.loss_mask.any() for e in enc])
        scored = [e for e, ok in zip(enc, has_loss) if ok]
        if not scored:
            raise ValueError("no pool row has a response token to compute influence on")
        t0 = time.perf_counter()
        v = mean_grad(model, scored, chosen, how=how)
        t_v = time.perf_counter() - t0
        u = lissa(lambda h, idx: hvp(model, [scored[i] for i in idx], chosen, h), v, n=len(scored),
                  depth=depth, damp=damp, scale=scale, batch=batch, seed=seed, progress=progress)
        t_lissa = time.perf_counter() - t0 - t_v
        dots = np.full(len(enc), np.nan)
        dots[has_loss] = grad_dots(model, scored, chosen, u, how=how)
        with stage.writing("influence.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, dots)
        stage.complete({"n_params": n_params(chosen), "seconds_v": round(t_v, 2),
                        "seconds_lissa": round(t_lissa, 2),
                        "seconds": round(time.perf_counter() - t0, 2),
                        "v_norm": float(v.norm()), "u_norm": float(u.norm()),
                        "params": sorted(chosen)})
        del model
    return np.load(stage.path("influence.npy")), stage.info()


# ---------------------------------------------------------------- as declared stages

@dataclass
class GradNormResult:
    values: np.ndarray          # float64 [N], pool order; NaN: no loss token
    info: dict
    key: str

    @property
    def fingerprint(self) -> str:
        return f"grad_norms:{self.key}"


@dataclass(frozen=True)
class GradNorms(Stage):
    """Per-row gradient norm over `params` of `model` + a fresh LoRA (seed `lora_seed`), or of
    the final adapter of the `of` proxy stage."""

    kind: ClassVar[str] = "grad_norms"
    per_shard: ClassVar[bool] = False
    loads_model: ClassVar[bool] = True
    model: str = DEFAULT_LM
    lora_seed: int = 0
    of: Stage | None = None
    params: str = "lora"
    max_tokens: int = 512
    response_only: bool = True

    def deps(self) -> tuple[Stage, ...]:
        return (*super().deps(), *((self.of,) if self.of is not None else ()))

    def resources(self) -> Resources:
        return Resources(cpus=2, gpus=1, memory_gb=6)

    def _ref(self, run: StageRun) -> ModelRef:
        if self.of is not None:
            return ModelRef(checkpoint=str(run.deps[self.of].final))
        return ModelRef(model=self.model, lora_seed=self.lora_seed)

    def _compute(self, run: StageRun) -> GradNormResult:
        values, info = grad_norm_stage(run.pool, run.store, self._ref(run), self.params,
                                       self.max_tokens, self.response_only, device=run.device)
        return GradNormResult(values, info, config_key(self.key_config(), info.get("shards")))

    def run_whole(self, run: StageRun) -> dict:
        r = self._compute(run)
        return {"rows": run.pool.n_rows, "n_params": r.info["n_params"], "grad_seconds": r.info["seconds"]}

    def load(self, run: StageRun) -> GradNormResult:
        return self._compute(run)


@dataclass(frozen=True)
class Influence(Stage):
    """DEALRec's influence on empirical risk of every row on the `surrogate` proxy's final adapter."""

    kind: ClassVar[str] = "influence"
    per_shard: ClassVar[bool] = False
    loads_model: ClassVar[bool] = True
    surrogate: Stage = None
    params: str = "*layers.{last}.self_attn.o_proj.lora_B*"
    depth: int = 5000
    damp: float = 0.01
    scale: float = 25.0
    batch: int = 1
    seed: int = 0
    max_tokens: int = 512
    response_only: bool = True

    def deps(self) -> tuple[Stage, ...]:
        return (*super().deps(), self.surrogate)

    def resources(self) -> Resources:
        return Resources(cpus=2, gpus=1, memory_gb=6)

    def _compute(self, run: StageRun) -> GradNormResult:
        ref = ModelRef(checkpoint=str(run.deps[self.surrogate].final))
        values, info = influence_stage(run.pool, run.store, ref, self.params, self.depth, self.damp,
                                       self.scale, self.batch, self.seed, self.max_tokens,
                                       self.response_only, device=run.device)
        return GradNormResult(values, info, config_key(self.key_config(), info.get("u_norm")))

    def run_whole(self, run: StageRun) -> dict:
        r = self._compute(run)
        return {"rows": run.pool.n_rows, **{k: r.info[k] for k in ("n_params", "seconds_v", "seconds_lissa")}}

    def load(self, run: StageRun) -> GradNormResult:
        return self._compute(run)
