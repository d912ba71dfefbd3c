"""GraNd (Paul et al. 2021, Def. 2.1; methods-a.md §1): the expected per-sample gradient norm
E_r ||grad_theta loss(x; w^(r))||_2 over several seeds, on a chosen parameter subset.

`at=init` (default, the paper's GraNd): w^(r) is the pretrained `model` with a fresh LoRA
adapter initialised from seed r; `at=early`: the early reference proxies EL2N trains (the same
`seeds`, `part`, `early` options and cache). `params` picks the parameters (default `lora`:
every LoRA matrix; else fnmatch patterns over parameter names, `{last}` = the last layer).
Per-sample gradients are batched with torch.func (`pipeline/models/grads.py`); the loss is the mean
response-token NLL. Keep `top` (Data Diet: the largest norms) by default, `middle` or `bottom`.

Deviations (docs/training-dynamics.md): theta is a parameter subset (the paper: all weights of a network trained
from scratch); with peft's LoRA init (B = 0) the gradient at init reaches only the B matrices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import polars as pl
from thresher.pipeline.method import Inputs, Method, Request, seed_average
from thresher.pipeline.stage import Stage
from thresher.pipeline.stages.grad_scores import GradNorms
from thresher.pipeline.stages.proxy import EarlyParams, early_proxies, seed_list
from thresher.selectors.score_band import ScoreBand


@dataclass(frozen=True)
class GrandParams(EarlyParams):
    at: Literal["init", "early"] = field(default="init", metadata={
        "help": "init: fresh seeded LoRA on the model (the paper); early: EL2N's early references"})
    params: str = field(default="lora", metadata={
        "help": "parameters to differentiate: lora, all, or fnmatch patterns ({last} = last layer)"})
    response_only: bool = field(default=True, metadata={"help": "loss over the response tokens only"})
    keep: Literal["top", "middle", "bottom"] = field(default="top", metadata={"help": "which band to keep"})


class GrandMethod(Method):
    name = "grand"
    summary = ("GraNd: mean over seeds of the per-sample gradient norm (LoRA parameters, at init "
               "by default); keep top (default), middle or bottom")
    cost = "seeds x one batched per-sample-gradient pass over the pool (~3 forward passes)"
    Params = GrandParams
    score_column = "grand"

    def needs(self, p: GrandParams, req: Request) -> dict[str, Stage]:
        if p.at == "init":
            return {f"seed{s}": GradNorms(model=p.model, lora_seed=s, params=p.params,
                                          max_tokens=p.max_tokens, response_only=p.response_only)
                    for s in seed_list(p.seeds)}
        return {f"seed{pr.seed}": GradNorms(of=pr, params=p.params, max_tokens=p.max_tokens,
                                            response_only=p.response_only)
                for pr in early_proxies(p)}

    def score(self, p: GrandParams, inputs: Inputs) -> pl.DataFrame:
        runs = [inputs[n] for n in sorted(inputs.outputs) if n.startswith("seed")]
        norms = np.stack([r.values for r in runs])
        inputs.note("n_params", runs[0].info.get("n_params"))
        return seed_average(inputs.candidates, "grand", norms)

    def selector(self, p: GrandParams, inputs: Inputs, scores: pl.DataFrame) -> ScoreBand:
        return ScoreBand("grand", keep=p.keep)
