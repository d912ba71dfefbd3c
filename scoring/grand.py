"""GraNd (Paul et al. 2021, Def. 2.1; methods-a.md §1): the expected per-sample gradient norm
E_r ||grad_theta loss(x; w^(r))||_2 over several seeds, on a chosen parameter subset.

`--param at=init` (default, as the paper's GraNd): w^(r) is the pretrained `--model` with a fresh
LoRA adapter initialised from seed r; `at=early`: the early checkpoints EL2N trains (the same
`seeds`, `part`, `early` options and cache). `params` picks the parameters (default `lora`: every
LoRA matrix; fnmatch patterns over parameter names otherwise, `{last}` = the last layer). Per-sample
gradients are batched with torch.func (`pipeline/grads.py`). Loss: mean response-token NLL.
Keep `top` (Data Diet: the largest norms) by default, `middle` or `bottom`.

Deviations (README): theta is a parameter subset (the paper: all weights of a network trained
from scratch); with peft's LoRA init (B = 0) the gradient at init reaches only the B matrices;
the seeds default to 10 as in the paper but the README's measured run used fewer.
"""

from __future__ import annotations

import numpy as np
import polars as pl
from thresher.pipeline.forward import parse_flag
from thresher.pipeline.grad_stages import ModelRef, grad_norm_stage
from thresher.pipeline.method import Context, Method
from thresher.pipeline.models import DEFAULT_LM
from thresher.scoring.el2n import DEFAULT_SEEDS, early_checkpoints, seed_list
from thresher.selectors.score_band import ScoreBand


class GrandMethod(Method):
    name = "grand"
    needs = ("per seed: one forward + backward per row over the LoRA parameters (batched "
             "per-sample gradients); at=early also EL2N's early proxies")
    cost = "seeds x (one per-sample-gradient pass over the pool, ~3x a forward pass)"
    summary = ("GraNd: mean over seeds of the per-sample gradient norm (LoRA parameters, at "
               "init by default); keep top (default), middle or bottom")

    def select(self, ctx: Context) -> pl.DataFrame:
        keep = ctx.option("keep", "top")
        at = ctx.option("at", "init")
        if at not in ("init", "early"):
            raise ValueError(f"--param at must be init or early, got {at!r}")
        params = str(ctx.option("params", "lora"))
        if at == "init":
            model = ctx.option("model", DEFAULT_LM) or DEFAULT_LM
            refs = [ModelRef(model=model, lora_seed=s)
                    for s in seed_list(ctx.option("seeds", DEFAULT_SEEDS))]
        else:
            refs = [ModelRef(checkpoint=str(c)) for c in early_checkpoints(ctx)]
        norms, infos = [], []
        with ctx.timed("grads"):
            for ref in refs:
                v, info = grad_norm_stage(ctx.pool, ctx.store, ref, params,
                                          max_tokens=int(ctx.option("max_tokens", 512)),
                                          response_only=parse_flag(ctx.option("response_only", True)),
                                          device=ctx.option("device", None))
                norms.append(v)
                infos.append({"seconds": info["seconds"], "n_params": info["n_params"]})
        ctx.config["grad_runs"] = infos
        cand = ctx.candidates.with_columns(grand=pl.Series(np.mean(norms, axis=0)),
                                           grand_seed_std=pl.Series(np.std(norms, axis=0)))
        ok = cand["grand"].is_not_nan()
        ctx.config["unscored_rows"] = int((~ok).sum())
        cand = cand.filter(ok)
        if cand.height == 0:
            raise ValueError("no row has a response token to score; check the pool and --param max_tokens")
        return ScoreBand("grand", keep=keep).select(cand, ctx.budget, ctx.seed)
