"""Per-sample Jensen-Shannon divergence between an original and a pruned causal LM (PASER's
capability-degradation score, methods-b.md §1.2 stage 2), cached and resumable per pool shard.

    worker = JsdWorker(original, pruned, tokenizer)     # both models loaded once
    out = worker(rows)            # n_tokens, n_loss_tokens, truncated, jsd_sum, jsd_mean per row
    Jsd(original="smollm2-135m-instruct", pruned="out/pruned")   # the per-shard stage (cached)
    res = jsd_signals(pool, store, "smollm2-135m-instruct", "out/pruned")   # that stage, run here
    res.scores()                  # DataFrame in pool order

For every response token t (the assistant turns, `chat.encode`; every token of a plain-text row):
    JSD_t = 1/2 KL(p_t || m_t) + 1/2 KL(q_t || m_t),   m_t = (p_t + q_t) / 2,
p_t / q_t the pruned / original next-token distributions, computed from log-softmax in float64
(log m = logaddexp(log p, log q) - log 2), so underflowing probabilities give 0, not NaN (the
released code's p*log(p/m) gives NaN there; methods-b.md §1.3). Per sample: jsd_sum (the code's
reduction) and jsd_mean = jsd_sum / n_loss_tokens.

Deviation from the released code: it scores the instruction text alone, without the chat template
or the output; here the divergence is over the response tokens of the rendered conversation (the
paper's "output distributions"), and both reductions are kept (`--param jsd_reduce=sum|mean`).

How it stays small: the forward engine's batching (`batching.length_batches`: length-sorted rows
under a token budget) feeds each batch through BOTH models; each runs its body once
(`engine._body_and_head`) and its LM head only on the positions that predict a response token,
in blocks of at most `engine.LOGIT_CHUNK` elements ([block, V]); per position only the scalar
JSD survives, so nothing vocabulary-sized outlives a block and nothing model-sized a batch.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import polars as pl
import pyarrow as pa
from thresher.pipeline.artifacts import ArtifactDir, ArtifactStore
from thresher.pipeline.io.pool import Pool
from thresher.pipeline.models.batching import length_batches, padded_batch
from thresher.pipeline.models.chat import encode
from thresher.pipeline.models.engine import (
    DEFAULT_MAX_TOKENS,
    LOGIT_CHUNK,
    _body_and_head,
    default_batch_tokens,
    engine_dtype,
)
from thresher.pipeline.models.resolve import DEFAULT_LM, model_identity
from thresher.pipeline.stage import (
    Resources,
    ShardResult,
    Stage,
    StageRun,
    concat_shard_tables,
)

log = logging.getLogger(__name__)

JSD_VERSION = 1
LOG2 = math.log(2.0)
COLUMNS = ("id", "n_tokens", "n_loss_tokens", "truncated", "jsd_sum", "jsd_mean")


def jsd_from_logits(a, b):
    """Per-row JSD (natural log) of two [n, V] blocks of logits.

    float64 math: for a mildly pruned model the divergence is ~1e-4 nats per token, a sum of
    cancelling terms over the vocabulary that float32 gets wrong in the third digit; the element-
    wise work is small next to the two models' bodies and heads."""
    import torch

    la = torch.log_softmax(a.double(), dim=-1)
    lb = torch.log_softmax(b.double(), dim=-1)
    lm = torch.logaddexp(la, lb) - LOG2
    kl_a = (la.exp() * (la - lm)).sum(-1)
    kl_b = (lb.exp() * (lb - lm)).sum(-1)
    return (0.5 * (kl_a + kl_b)).clamp_min(0.0)


def _selected_hidden(model, parts, ids, am, sel):
    """(hidden states or logits at the selected positions, head or None)."""
    if parts is not None:
        body, head = parts
        hidden = body(input_ids=ids, attention_mask=am, use_cache=False).last_hidden_state
        return hidden[sel], head
    return model(input_ids=ids, attention_mask=am, use_cache=False).logits[sel], None


def batch_jsd(models, parts, ids, am, lm) -> np.ndarray:
    """Per-position JSD (float64, flat, row-major) over one padded batch's loss positions."""
    import torch

    sel = torch.zeros_like(lm)
    sel[:, :-1] = lm[:, 1:]                    # hidden state at t-1 predicts loss token t
    (h_o, head_o), (h_p, head_p) = (_selected_hidden(m, p, ids, am, sel)
                                    for m, p in zip(models, parts))
    n = int(h_o.shape[0])
    vocab = models[0].config.vocab_size
    step = max(1, LOGIT_CHUNK // vocab)
    out = []
    for s in range(0, n, step):
        a = head_o(h_o[s:s + step]) if head_o is not None else h_o[s:s + step]
        b = head_p(h_p[s:s + step]) if head_p is not None else h_p[s:s + step]
        out.append(jsd_from_logits(a, b).cpu().numpy().astype(np.float64))
        del a, b
    return np.concatenate(out) if out else np.zeros(0, np.float64)


class JsdWorker:
    """Both models in memory (loaded once per process); `__call__(rows)` scores one shard."""

    def __init__(self, original, pruned, tokenizer, max_tokens: int = DEFAULT_MAX_TOKENS,
                 batch_tokens: int | None = None, response_only: bool = True):
        if original.config.vocab_size != pruned.config.vocab_size:
            raise ValueError(f"the original and pruned models have different vocabularies "
                             f"({original.config.vocab_size} vs {pruned.config.vocab_size})")
        self.models = (original.eval(), pruned.eval())
        self.parts = tuple(_body_and_head(m) for m in self.models)
        self.tok, self.max_tokens, self.response_only = tokenizer, max_tokens, response_only
        self.device = next(original.parameters()).device
        self.n_params = sum(p.numel() for m in self.models for p in m.parameters())
        self.batch_tokens = batch_tokens or default_batch_tokens(self.device.type)

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        enc = [encode(self.tok, r, self.max_tokens, self.response_only) for r in rows]
        lengths = np.array([len(e.input_ids) for e in enc], dtype=np.int64)
        n_loss = np.array([int(e.loss_mask[1:].sum()) for e in enc], dtype=np.int64)
        jsd_sum = np.zeros(len(rows), dtype=np.float64)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        with torch.inference_mode():
            for batch in length_batches(lengths, self.batch_tokens):
                t = [torch.from_numpy(a).to(self.device)
                     for a in padded_batch(enc, batch, lengths, pad)]
                flat = batch_jsd(self.models, self.parts, *t)
                bounds = np.concatenate([[0], np.cumsum(n_loss[batch])])
                for j, i in enumerate(batch):
                    jsd_sum[i] = float(flat[bounds[j]:bounds[j + 1]].sum())
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(n_loss > 0, jsd_sum / np.maximum(n_loss, 1), np.nan)
        return {"n_tokens": lengths, "n_loss_tokens": n_loss,
                "truncated": np.array([e.truncated for e in enc]), "jsd_sum": jsd_sum,
                "jsd_mean": mean}


@dataclass
class JsdResult:
    """The finished jsd stage of one pool."""

    dir: ArtifactDir

    @property
    def fingerprint(self) -> str:
        return f"jsd:{self.dir.key}"

    def scores(self) -> pl.DataFrame:
        """id, n_tokens, n_loss_tokens, truncated, jsd_sum, jsd_mean in pool order."""
        return pl.read_parquet(self.dir.path("scores.parquet"))


def _table(ids: list[str], out: dict) -> pa.Table:
    return pa.table({"id": pa.array(ids, pa.string()),
                     "n_tokens": pa.array(out["n_tokens"], pa.int64()),
                     "n_loss_tokens": pa.array(out["n_loss_tokens"], pa.int64()),
                     "truncated": pa.array(out["truncated"], pa.bool_()),
                     "jsd_sum": pa.array(out["jsd_sum"], pa.float64()),
                     "jsd_mean": pa.array(out["jsd_mean"], pa.float64())})


@dataclass(frozen=True)
class Jsd(Stage):
    """Per-sample JSD between an original and a pruned causal LM: each batch through both."""

    kind: ClassVar[str] = "jsd"
    loads_model: ClassVar[bool] = True
    original: str = DEFAULT_LM
    pruned: str = ""
    max_tokens: int = DEFAULT_MAX_TOKENS
    response_only: bool = True
    dtype: str = "auto"          # resolved per device when planned (bind)
    batch_tokens: int | None = field(default=None, compare=False, metadata={"key": False})
    threads: int | None = field(default=None, compare=False, metadata={"key": False})

    def __post_init__(self):
        if not self.pruned:
            raise ValueError("the jsd stage needs a pruned model")
        if self.max_tokens < 2:
            raise ValueError("max_tokens must be >= 2")

    def bind(self, device: str) -> Jsd:
        return dataclasses.replace(self, dtype=str(engine_dtype(device, self.dtype)).removeprefix("torch."))

    def key_extra(self) -> dict:
        return {"original": model_identity(self.original), "pruned": model_identity(self.pruned),
                "version": JSD_VERSION}

    def resources(self) -> Resources:
        return Resources(cpus=1, gpus=1, memory_gb=6)     # two models resident

    def open_worker(self, device: str) -> JsdWorker:
        import torch
        from thresher.pipeline.models.resolve import load_causal_lm, load_tokenizer, resolve

        if self.threads:
            torch.set_num_threads(int(self.threads))
        dtype = engine_dtype(device, self.dtype)
        o, p = resolve(self.original), resolve(self.pruned)
        return JsdWorker(load_causal_lm(o, device, dtype), load_causal_lm(p, device, dtype),
                         load_tokenizer(o), self.max_tokens, self.batch_tokens, self.response_only)

    def run_shard(self, worker: JsdWorker, rows: list[dict]) -> ShardResult:
        out = worker(rows)
        tokens = int(out["n_tokens"].sum())
        return ShardResult(tables={"jsd": _table([r["id"] for r in rows], out)}, tokens=tokens,
                           flops=2.0 * worker.n_params * tokens)

    def assemble(self, run: StageRun) -> dict:
        return {"rows": concat_shard_tables(run, "jsd.parquet", out="scores.parquet").height}

    def load(self, run: StageRun) -> JsdResult:
        return JsdResult(run.dir)


def jsd_signals(pool: Pool, store: ArtifactStore, original: str, pruned: str,
                max_tokens: int = DEFAULT_MAX_TOKENS, batch_tokens: int | None = None,
                response_only: bool = True, device: str | None = None, dtype: str | None = None,
                threads: int | None = None) -> JsdResult:
    """Run (or reuse) the jsd stage over every shard of `pool` in this process."""
    from thresher.pipeline.models.resolve import pick_device
    from thresher.pipeline.plan import run_stage

    stage = Jsd(original=str(original), pruned=str(pruned), max_tokens=max_tokens,
                response_only=response_only, dtype=dtype or "auto", batch_tokens=batch_tokens,
                threads=threads)
    return run_stage(stage, pool, store, pick_device(device))
