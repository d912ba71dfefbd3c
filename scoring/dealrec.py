"""DEALRec (Lin et al., SIGIR 2024; methods-a.md §2): influence on a small surrogate plus the
target's effort, then coverage-enhanced stratified sampling.

1. Surrogate: a proxy trained on the pool (the same cached run as S2L's by default: the bundled
   LoRA trainer, 3 epochs, `--param proxy_part/proxy_seed/epochs`), its final adapter.
2. Influence on empirical risk over `influence_params` (default the LoRA-B matrix of the last
   layer's attention output projection, 576 x 8 = 4,608 parameters: the analogue of the code's
   last attention output projection, 4,096): v = (1/n) sum_j grad L(s_j); ONE LiSSA estimate
   u ~ H^-1 v (`depth` 5000 steps, damp 0.01, scale 25, one random row per step: Alg. 1 and
   `influence_score.py`); IS_i = u . grad L(s_i), one batched per-sample gradient pass.
3. Effort: ||grad_phi L_target(s_i)||_2 over the target model's LoRA parameters (`--model` with
   a fresh seeded LoRA adapter: its pre-fine-tuning state; `effort_params`, default all LoRA).
4. score = minmax(IS) + lambda * minmax(effort), `lam` 0.5 (the code's default; per dataset 0.3-1.0).
5. `selectors/stratified.py`: drop the top `hard_prune` (0.1, the released code) of the scores,
   `bins` (50) equal-width score bins, the budget over the bins smallest first.

Deviations (README): the surrogate is a LoRA proxy of the target family, not a separate small
architecture (SASRec); its loss is the response-token cross-entropy (SASRec: BCE with one
random negative); the effort loss is response-only by default (the code includes prompt tokens:
`--param effort_response_only=false`) and not doubled; u is divided by scale (a constant);
v is the mean of per-sample gradients (the code: mean of batch means, equal for equal batches).
"""

from __future__ import annotations

import numpy as np
import polars as pl
from thresher.pipeline.forward import parse_flag
from thresher.pipeline.grad_stages import ModelRef, grad_norm_stage, influence_stage
from thresher.pipeline.method import Context, Method
from thresher.pipeline.models import DEFAULT_LM
from thresher.pipeline.trajectories import train_proxy
from thresher.scoring.s2l import proxy_spec
from thresher.selectors.stratified import Stratified

INFLUENCE_PARAMS = "*layers.{last}.self_attn.o_proj.lora_B*"


def minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = np.nanmin(x), np.nanmax(x)
    return np.zeros_like(x) if hi == lo else (x - lo) / (hi - lo)


class DealrecMethod(Method):
    name = "dealrec"
    needs = ("a surrogate LoRA proxy on the pool (shared with s2l), one LiSSA estimate (depth "
             "HVPs), two per-sample-gradient passes on it, one on the target's LoRA parameters")
    cost = "proxy training + depth HVPs + 3 per-sample-gradient passes over the pool + O(N log N)"
    summary = ("DEALRec: min-max(influence on a surrogate) + lam * min-max(target gradient norm), "
               "stratified over 50 score bins after pruning the top 10%")

    def select(self, ctx: Context) -> pl.DataFrame:
        device = ctx.option("device", None)
        max_tokens = int(ctx.option("max_tokens", 512))
        with ctx.timed("proxy"):
            run = train_proxy(ctx.pool, ctx.store, proxy_spec(ctx, epochs=3, checkpoints=12),
                              device=device)
        ctx.config["surrogate"] = {"dir": str(run.final), "train_seconds": run.seconds,
                                   "cached": run.cached}
        with ctx.timed("influence"):
            infl, info = influence_stage(
                ctx.pool, ctx.store, ModelRef(checkpoint=str(run.final)),
                str(ctx.option("influence_params", INFLUENCE_PARAMS)),
                depth=int(ctx.option("depth", 5000)), damp=float(ctx.option("damp", 0.01)),
                scale=float(ctx.option("scale", 25.0)), batch=int(ctx.option("lissa_batch", 1)),
                seed=int(ctx.option("lissa_seed", 0)), max_tokens=max_tokens, device=device)
        ctx.config["influence"] = {k: info[k] for k in ("n_params", "seconds", "seconds_lissa", "params")}
        with ctx.timed("effort"):
            ref = ModelRef(model=ctx.option("model", DEFAULT_LM) or DEFAULT_LM,
                           lora_seed=int(ctx.option("lora_seed", 0)))
            effort, einfo = grad_norm_stage(
                ctx.pool, ctx.store, ref, str(ctx.option("effort_params", "lora")),
                max_tokens=max_tokens, device=device,
                response_only=parse_flag(ctx.option("effort_response_only", True)))
        ctx.config["effort"] = {"n_params": einfo["n_params"], "seconds": einfo["seconds"]}
        lam = float(ctx.option("lam", 0.5))
        score = minmax(infl) + lam * minmax(effort)
        cand = ctx.candidates.with_columns(influence=pl.Series(infl), effort=pl.Series(effort),
                                           dealrec=pl.Series(score))
        ok = cand["dealrec"].is_not_nan()
        ctx.config["unscored_rows"] = int((~ok).sum())
        cand = cand.filter(ok)
        if cand.height == 0:
            raise ValueError("no row has a response token to score; check the pool and --param max_tokens")
        sel = Stratified("dealrec", bins=int(ctx.option("bins", 50)),
                         hard_prune=float(ctx.option("hard_prune", 0.1)))
        return sel.select(cand, ctx.budget, ctx.seed)
