"""DEALRec (Lin et al., SIGIR 2024; methods-a.md §2): influence on a small surrogate plus the
target's effort, then coverage-enhanced stratified sampling.

1. Surrogate (`Proxy` stage): a proxy trained on the pool (by default the same cached run as
   S2L's: the bundled LoRA trainer, 3 epochs), its final adapter.
2. Influence on empirical risk (`Influence` stage) over `influence_params` (default the LoRA-B
   matrix of the last layer's attention output projection, 576 x 8 = 4,608 parameters: the
   analogue of the code's last attention output projection, 4,096): v = (1/n) sum_j grad L(s_j);
   ONE LiSSA estimate u ~ H^-1 v (`depth` 5000 steps, damp 0.01, scale 25, one random row per
   step: Alg. 1 and `influence_score.py`); IS_i = u . grad L(s_i), one batched pass.
3. Effort (`GradNorms` stage): ||grad_phi L_target(s_i)||_2 over the target model's LoRA
   parameters (`model` with a fresh seeded LoRA adapter, its pre-fine-tuning state;
   `effort_params`, default all LoRA matrices).
4. score = minmax(IS) + lam * minmax(effort), `lam` 0.5 (the code's default; 0.3-1.0 per dataset).
5. `selectors/stratified.py`: drop the top `hard_prune` (0.1, the released code) of the scores,
   `bins` (50) equal-width score bins, the budget over the bins smallest first.

Deviations (docs/training-dynamics.md): the surrogate is a LoRA proxy of the target family, not a separate small
architecture (SASRec), and its loss is the response-token cross-entropy (SASRec: BCE with one
random negative); the effort loss is response-only by default (the code includes prompt tokens:
`effort_response_only=false`) and not doubled; u is divided by scale (a constant); v is the mean
of per-sample gradients (the code: the mean of batch means, equal for equal batches).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl
from thresher.pipeline.method import Inputs, Method, Request
from thresher.pipeline.stage import Stage
from thresher.pipeline.stages.grad_scores import GradNorms, Influence
from thresher.pipeline.stages.proxy import ProxyParams, proxy_stage
from thresher.selectors.stratified import Stratified

INFLUENCE_PARAMS = "*layers.{last}.self_attn.o_proj.lora_B*"


def minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = np.nanmin(x), np.nanmax(x)
    return np.zeros_like(x) if hi == lo else (x - lo) / (hi - lo)


@dataclass(frozen=True)
class DealrecParams(ProxyParams):
    influence_params: str = field(default=INFLUENCE_PARAMS, metadata={
        "help": "surrogate parameters for the influence (fnmatch; {last} = last layer)"})
    depth: int = field(default=5000, metadata={"help": "LiSSA recursion depth (HVPs)"})
    damp: float = field(default=0.01, metadata={"help": "LiSSA damping"})
    scale: float = field(default=25.0, metadata={"help": "LiSSA scale (> top Hessian eigenvalue / 2)"})
    lissa_batch: int = field(default=1, metadata={"help": "rows per LiSSA step"})
    lissa_seed: int = field(default=0, metadata={"help": "seed of the LiSSA row draws"})
    effort_params: str = field(default="lora", metadata={"help": "target parameters for the effort"})
    effort_response_only: bool = field(default=True, metadata={
        "help": "effort loss over response tokens (false: the whole sequence, as the code)"})
    lora_seed: int = field(default=0, metadata={"help": "seed of the target's fresh LoRA adapter"})
    lam: float = field(default=0.5, metadata={"help": "weight of the effort score"})
    bins: int = field(default=50, metadata={"help": "equal-width score bins"})
    hard_prune: float = field(default=0.1, metadata={"help": "fraction of the highest scores dropped first"})


class DealrecMethod(Method):
    name = "dealrec"
    summary = ("DEALRec: min-max(influence on a surrogate) + lam * min-max(target gradient norm), "
               "stratified over 50 score bins after pruning the top 10%")
    cost = ("surrogate proxy training + depth HVPs + 2 batched per-sample-gradient passes on the "
            "surrogate + 1 on the target's LoRA parameters + O(N log N)")
    Params = DealrecParams
    score_column = "dealrec"

    def needs(self, p: DealrecParams, req: Request) -> dict[str, Stage]:
        return {"influence": Influence(surrogate=proxy_stage(p), params=p.influence_params,
                                       depth=p.depth, damp=p.damp, scale=p.scale,
                                       batch=p.lissa_batch, seed=p.lissa_seed,
                                       max_tokens=p.max_tokens),
                "effort": GradNorms(model=p.model, lora_seed=p.lora_seed, params=p.effort_params,
                                    max_tokens=p.max_tokens, response_only=p.effort_response_only)}

    def score(self, p: DealrecParams, inputs: Inputs) -> pl.DataFrame:
        infl, effort = inputs["influence"].values, inputs["effort"].values
        inputs.note("influence", {k: inputs["influence"].info.get(k) for k in
                                  ("n_params", "seconds_v", "seconds_lissa", "params")})
        inputs.note("effort_params", inputs["effort"].info.get("n_params"))
        score = minmax(infl) + p.lam * minmax(effort)
        out = inputs.candidates.select("id").with_columns(
            influence=pl.Series(infl), effort=pl.Series(effort), dealrec=pl.Series(score))
        out = out.filter(pl.col("dealrec").is_not_nan())
        if out.height == 0:
            raise ValueError("no row has a response token to score; check the pool and --param max_tokens")
        return out

    def selector(self, p: DealrecParams, inputs: Inputs, scores: pl.DataFrame) -> Stratified:
        return Stratified("dealrec", bins=p.bins, hard_prune=p.hard_prune)
