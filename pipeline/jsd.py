"""Per-sample Jensen-Shannon divergence between an original and a pruned causal LM (PASER's
capability-degradation score, methods-b.md §1.2 stage 2), cached and resumable per pool shard.

    worker = JsdWorker(original, pruned, tokenizer)     # both models loaded once
    out = worker(rows)            # n_tokens, n_loss_tokens, truncated, jsd_sum, jsd_mean per row
    res = jsd_signals(pool, store, "smollm2-135m-instruct", "out/pruned")   # whole pool, cached
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

How it stays small: the forward engine's batching (`engine.length_batches`: length-sorted rows
under a token budget) feeds each batch through BOTH models; each runs its body once
(`engine._body_and_head`) and its LM head only on the positions that predict a response token,
in blocks of at most `engine.LOGIT_CHUNK` elements ([block, V]); per position only the scalar
JSD survives, so nothing vocabulary-sized outlives a block and nothing model-sized a batch.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from thresher.pipeline.artifacts import ArtifactStore, Stage
from thresher.pipeline.chat import encode
from thresher.pipeline.engine import (
    DEFAULT_MAX_TOKENS,
    LOGIT_CHUNK,
    _body_and_head,
    default_token_budget,
    engine_dtype,
    length_batches,
)
from thresher.pipeline.pool import Pool

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
                 token_budget: int | None = None, response_only: bool = True):
        if original.config.vocab_size != pruned.config.vocab_size:
            raise ValueError(f"the original and pruned models have different vocabularies "
                             f"({original.config.vocab_size} vs {pruned.config.vocab_size})")
        self.models = (original.eval(), pruned.eval())
        self.parts = tuple(_body_and_head(m) for m in self.models)
        self.tok, self.max_tokens, self.response_only = tokenizer, max_tokens, response_only
        self.device = next(original.parameters()).device
        self.token_budget = token_budget or default_token_budget(self.device.type)

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        enc = [encode(self.tok, r, self.max_tokens, self.response_only) for r in rows]
        lengths = np.array([len(e.input_ids) for e in enc], dtype=np.int64)
        n_loss = np.array([int(e.loss_mask[1:].sum()) for e in enc], dtype=np.int64)
        jsd_sum = np.zeros(len(rows), dtype=np.float64)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        with torch.inference_mode():
            for batch in length_batches(lengths, self.token_budget):
                T = int(lengths[batch].max())
                ids = np.full((len(batch), T), pad, dtype=np.int64)
                am = np.zeros((len(batch), T), dtype=np.int64)
                lm = np.zeros((len(batch), T), dtype=bool)
                for j, i in enumerate(batch):
                    L = lengths[i]
                    ids[j, :L], am[j, :L], lm[j, :L] = enc[i].input_ids, 1, enc[i].loss_mask
                t = [torch.from_numpy(a).to(self.device) for a in (ids, am, lm)]
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
    stage: Stage

    def scores(self) -> pl.DataFrame:
        """id, n_tokens, n_loss_tokens, truncated, jsd_sum, jsd_mean in pool order."""
        return pl.read_parquet(self.stage.path("scores.parquet"))


def jsd_stage(store: ArtifactStore, pool: Pool, original: str, pruned: str, max_tokens: int,
              response_only: bool, dtype_name: str) -> Stage:
    config = {"original": original, "pruned": pruned, "max_tokens": int(max_tokens),
              "response_only": bool(response_only), "dtype": dtype_name, "version": JSD_VERSION}
    return store.stage("jsd", inputs=[pool.fingerprint], config=config)


def _table(ids: list[str], out: dict) -> pa.Table:
    return pa.table({"id": pa.array(ids, pa.string()),
                     "n_tokens": pa.array(out["n_tokens"], pa.int64()),
                     "n_loss_tokens": pa.array(out["n_loss_tokens"], pa.int64()),
                     "truncated": pa.array(out["truncated"], pa.bool_()),
                     "jsd_sum": pa.array(out["jsd_sum"], pa.float64()),
                     "jsd_mean": pa.array(out["jsd_mean"], pa.float64())})


def jsd_signals(pool: Pool, store: ArtifactStore, original, pruned,
                max_tokens: int = DEFAULT_MAX_TOKENS, token_budget: int | None = None,
                response_only: bool = True, device: str | None = None, dtype: str | None = None,
                threads: int | None = None, progress=None) -> JsdResult:
    """Run (or reuse) the JSD pass over every shard of `pool`. Each shard's parquet is written
    atomically, so a killed run resumes at the first unfinished shard; the models load only if a
    shard still needs them. `original` / `pruned`: names `models.resolve` accepts, or resolved."""
    import torch
    from thresher.pipeline.models import load_causal_lm, load_tokenizer, pick_device, resolve

    orig = resolve(original) if isinstance(original, str | Path) else original
    prun = resolve(pruned) if isinstance(pruned, str | Path) else pruned
    dev = pick_device(device)
    torch_dtype = engine_dtype(dev, dtype)
    stage = jsd_stage(store, pool, orig.identity, prun.identity, max_tokens, response_only,
                      str(torch_dtype).removeprefix("torch."))
    result = JsdResult(stage)
    if stage.done:
        return result
    names, worker = [], None
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        for shard, rows in pool.iter_shards(["id", "kind", "messages", "text"]):
            names.append(shard)
            if stage.has(f"{shard}.parquet"):
                continue
            if worker is None:
                worker = JsdWorker(load_causal_lm(orig, dev, torch_dtype),
                                   load_causal_lm(prun, dev, torch_dtype), load_tokenizer(orig),
                                   max_tokens, token_budget, response_only)
            out = worker(rows)
            with stage.writing(f"{shard}.parquet") as tmp:
                pq.write_table(_table([r["id"] for r in rows], out), tmp)
            log.info("jsd: %s done (%d rows)", shard, len(rows))
            if progress is not None:
                progress(len(rows))
    finally:
        torch.set_num_threads(saved)
    frames = [pl.read_parquet(stage.path(f"{s}.parquet")) for s in names]
    with stage.writing("scores.parquet") as tmp:
        pl.concat(frames).write_parquet(tmp)
    stage.complete({"rows": pool.n_rows, "shards": names})
    return result
