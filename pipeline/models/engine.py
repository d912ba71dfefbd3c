"""The fused forward-pass engine: one pass of a causal LM gives every per-sample signal the scorers need.

This module is the engine only (any loaded model, rows in memory); `pipeline/stages/forward.py` is the
cached, resumable pool stage built on it.

    out = run_forward(model, tok, rows, {"loss", "el2n", "rds"})   # in memory, any loaded model

Signals (ask only for what you need; the rest is not computed):
    loss           mean token NLL over the loss tokens, and ppl = exp(loss)
    entropy        mean predictive entropy  -sum_v p_v log p_v  over the loss tokens
    el2n           mean over loss tokens of ||p - e_y||_2, from ||p - e_y||^2 = 1 - 2 p_y + sum_v p_v^2
                   (Marion et al. 2023; methods-a.md §1.6): no vocabulary-sized error tensor
    token_loss     per-token NLL of every loss token (ragged: a list of arrays in memory,
    token_entropy  per-token entropy                  a Parquet list column on disk)
    rds            RDS+ representation (methods-a.md §3.2): final-layer hidden state (after the
                   final norm), position-weighted mean over ALL non-padding tokens of the full
                   example (prompt and response), w_i = i / sum_{j=1..L} j, L2-normalised

Loss tokens are the assistant turns (chat template, `pipeline/chat.encode`), or every token of a
plain-text row, or every token when `response_only=False`. Position t's loss scores the prediction
of token t from the hidden state at t-1.

How it stays cheap: rows are sorted by length and packed under a token budget into one
sequence each (`batching.pack_rows`: no padding at all; position ids restart at every row and
attention is causal within each row only, `_packed_attention`), or, for models whose attention
does not go through transformers' attention interface and on GPUs, into padded batches
(`batching.length_batches`: padding only to the longest row of the batch), several batches at
once on worker threads on a CPU (`batching._in_workers`); the transformer body runs once; the
LM head runs only on the positions that predict a loss token (prompt positions never reach the
vocabulary projection), in chunks of at most HEAD_CHUNK logits, whose statistics are taken in
float32 blocks of STATS_CHUNK (one chunk of logits and two small float32 blocks exist at a
time); hidden states are pooled straight from the body's output (no `output_hidden_states` copy
of every layer).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging

import numpy as np
from thresher.pipeline.models.batching import (
    _in_workers,
    length_batches,
    pack_rows,
    padded_batch,
)
from thresher.pipeline.models.chat import Encoded, encode

log = logging.getLogger(__name__)

SIGNALS = frozenset({"loss", "entropy", "el2n", "token_loss", "token_entropy", "rds"})
LOGIT_SIGNALS = SIGNALS - {"rds"}
DEFAULT_MAX_TOKENS = 2048        # RDS+ truncates the pool at 2048 tokens (methods-a.md §3.2)
DEFAULT_TOKEN_BUDGET = 1024      # padded tokens per batch on CPU: 512-1024 ran 1.3-1.8x faster than
                                 # 4096 here (less padding, cache-resident); bench/RESULTS.md
GPU_TOKEN_BUDGET = 16384         # on a GPU, bigger batches fill the device
HEAD_CHUNK = 1 << 23             # logits one LM-head GEMM computes (170 positions of SmolLM2's
                                 # 49,152: a faster GEMM than 42 positions; bench/RESULTS.md)
STATS_CHUNK = 1 << 19            # logits whose statistics are taken at once (a 2 MiB float32
                                 # block: cache-resident)
LOGIT_CHUNK = 1 << 21            # float32 logits a caller holds at once (pipeline/stages/jsd.py)
ENGINE_VERSION = 3               # bump when the numbers an unchanged configuration gives change
                                 # (2: packed rows on CPU; bf16 sums differ from padded batches;
                                 # 3: CPU batches on one intra-op thread each, `_in_workers`;
                                 # lse from softmax's arg max)
PACKED_ATTENTION = "thresher_packed"   # name under transformers' AttentionInterface
SCALARS = ("loss", "ppl", "entropy", "el2n")


def default_batch_tokens(device) -> int:
    return GPU_TOKEN_BUDGET if str(device).startswith("cuda") else DEFAULT_TOKEN_BUDGET


def check_signals(signals) -> frozenset[str]:
    signals = frozenset(signals)
    unknown = signals - SIGNALS
    if unknown:
        raise ValueError(f"unknown forward signals {sorted(unknown)}; expected some of {sorted(SIGNALS)}")
    if not signals:
        raise ValueError("no forward signals requested")
    return signals


def _packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      **kwargs):
    """Causal attention inside each row of a packed sequence (block-diagonal causal mask).

    query [1, H, T, D], key/value [1, Hkv, T, D]; `thresher_bounds` (row start offsets plus the
    end) comes through the model's keyword arguments. One SDPA call per row with is_causal=True:
    no [T, T] mask is built, and the fused kernel skips the blocks above the diagonal."""
    import torch
    import torch.nn.functional as F

    bounds = kwargs["thresher_bounds"]
    gqa = query.shape[1] != key.shape[1]
    out = torch.empty_like(query)
    for s, e in itertools.pairwise(bounds):
        out[:, :, s:e] = F.scaled_dot_product_attention(
            query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True, scale=scaling,
            enable_gqa=gqa)
    return out.transpose(1, 2).contiguous(), None


def packing_supported(body) -> bool:
    """True when the decoder's attention dispatches through transformers' AttentionInterface
    (so `_packed_attention` can stand in for it) and it takes position ids (rotary restart)."""
    import inspect

    cfg = getattr(body, "config", None)
    if cfg is None or not getattr(body, "_supports_attention_backend", False):
        return False
    return "position_ids" in inspect.signature(body.forward).parameters


class _PackedAttention:
    """Context: the body's config uses `_packed_attention` inside, its own attention after."""

    def __init__(self, body):
        self.cfg = body.config

    def __enter__(self):
        from transformers import AttentionInterface

        if PACKED_ATTENTION not in AttentionInterface._global_mapping:
            AttentionInterface.register(PACKED_ATTENTION, _packed_attention)
        self.saved = self.cfg._attn_implementation
        self.cfg._attn_implementation = PACKED_ATTENTION

    def __exit__(self, *exc):
        self.cfg._attn_implementation = self.saved


def _body_and_head(model):
    """(decoder body, LM head) when logits are exactly head(final hidden state), else None."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
        return None
    try:
        body, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    if body is None or head is None:
        return None
    return body, head


def _logit_stats(logits, y, want: frozenset[str]) -> dict:
    """Per-position statistics of one [n, V] float32 block of logits z.

    p = softmax(z) (one fused pass); log-sum-exp from the arg max, where p_max = exp(z_max - lse)
    and p_max >= 1/V, so lse = z_max - log p_max loses nothing; loss = lse - z_y; entropy =
    lse - p.z; ||p - e_y||^2 = 1 - 2 p_y + p.p. One extra [n, V] block (p), one exp per logit."""
    import torch

    p = torch.softmax(logits, dim=-1)
    lse = logits.amax(dim=-1) - p.amax(dim=-1).log()
    out = {"loss": lse - logits.gather(1, y[:, None])[:, 0]}
    if want & {"entropy", "token_entropy"}:
        out["entropy"] = lse - torch.linalg.vecdot(p, logits)
    if "el2n" in want:
        sq = 1.0 - 2.0 * out["loss"].neg().exp() + torch.linalg.vecdot(p, p)   # ||p - e_y||^2
        out["el2n"] = sq.clamp_min(0.0).sqrt()
    return out


def _head_stats(model, head, h_sel, logits_all, y, want: frozenset[str]) -> dict:
    """Per-position loss / entropy / EL2N of the selected positions: head(h_sel) HEAD_CHUNK
    logits at a time (or slices of already computed `logits_all`), their statistics in float32
    blocks of STATS_CHUNK logits."""
    n = int(y.shape[0])
    vocab = getattr(head, "out_features", None) if logits_all is None else logits_all.shape[-1]
    vocab = vocab or model.config.vocab_size
    step, sub = max(1, HEAD_CHUNK // vocab), max(1, STATS_CHUNK // vocab)
    pieces: dict[str, list] = {"loss": [], "entropy": [], "el2n": []}
    for s in range(0, n, step):
        block = head(h_sel[s:s + step]) if logits_all is None else logits_all[s:s + step]
        for b in range(0, block.shape[0], sub):
            for k, v in _logit_stats(block[b:b + sub].float(), y[s + b:s + b + sub], want).items():
                pieces[k].append(v.cpu().numpy().astype(np.float32))
        del block
    return {k: np.concatenate(v) if v else np.zeros(0, np.float32) for k, v in pieces.items()}


def _forward_batch(model, parts, ids, am, loss_mask, want: frozenset[str]) -> dict:
    """Signals of one padded batch; ids, am (attention mask) and loss_mask are [B, T]."""
    import torch
    import torch.nn.functional as F

    need_stats = bool(want & LOGIT_SIGNALS)
    sel = torch.zeros_like(loss_mask)
    sel[:, :-1] = loss_mask[:, 1:]                 # hidden state at t-1 predicts loss token t
    y = ids[:, 1:][loss_mask[:, 1:]]
    logits_all, head, h_sel = None, None, None
    if parts is not None:
        body, head = parts
        hidden = body(input_ids=ids, attention_mask=am, use_cache=False).last_hidden_state
        h_sel = hidden[sel] if need_stats else None
    else:                                   # architectures whose logits are not head(hidden)
        res = model(input_ids=ids, attention_mask=am, use_cache=False,
                    output_hidden_states="rds" in want)
        hidden = res.hidden_states[-1] if "rds" in want else None
        logits_all = res.logits[sel] if need_stats else None
    out: dict = {}
    if need_stats:
        out["token"] = _head_stats(model, head, h_sel, logits_all, y, want)
        out["counts"] = loss_mask[:, 1:].sum(1).cpu().numpy()
    if "rds" in want:
        lengths = am.sum(1, keepdim=True).float()                             # L per row
        pos = torch.arange(1, am.shape[1] + 1, device=am.device).float()[None, :] * am
        w = pos / (lengths * (lengths + 1) / 2)                               # i / sum_j j
        e = torch.einsum("bt,btd->bd", w, hidden.float())
        out["rds"] = F.normalize(e, dim=-1).cpu().numpy()
    return out


def _forward_packed(model, parts, ids, loss_mask, lengths, want: frozenset[str]) -> dict:
    """Signals of one packed sequence: ids / loss_mask [T] (rows back to back), lengths [rows].

    Position ids restart at every row and attention stays inside each row (`_packed_attention`),
    so every row sees exactly what it would see alone (the caller holds `_PackedAttention`). A
    row's first token is never a loss token (`chat.encode`), so no prediction crosses a row
    boundary."""
    import torch
    import torch.nn.functional as F

    body, head = parts
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    starts = torch.from_numpy(np.repeat(bounds[:-1], lengths)).to(ids.device)
    pos = torch.arange(len(ids), device=ids.device) - starts                # 0.. per row
    hidden = body(input_ids=ids[None], position_ids=pos[None], use_cache=False,
                  thresher_bounds=bounds.tolist()).last_hidden_state[0]     # in _PackedAttention
    out: dict = {}
    if want & LOGIT_SIGNALS:
        sel = torch.zeros_like(loss_mask)
        sel[:-1] = loss_mask[1:]
        out["token"] = _head_stats(model, head, hidden[sel], None, ids[1:][loss_mask[1:]], want)
        out["counts"] = np.add.reduceat(loss_mask.cpu().numpy(), bounds[:-1]).astype(np.int64)
    if "rds" in want:
        L = torch.from_numpy(np.repeat(lengths, lengths)).to(ids.device).float()
        w = (pos + 1).float() / (L * (L + 1) / 2)                             # i / sum_j j
        seg = torch.from_numpy(np.repeat(np.arange(len(lengths)), lengths)).to(ids.device)
        e = torch.zeros(len(lengths), hidden.shape[-1], device=ids.device)
        e.index_add_(0, seg, hidden.float() * w[:, None])
        out["rds"] = F.normalize(e, dim=-1).cpu().numpy()
    return out


def _model_device(model):
    return next(model.parameters()).device


def _run_padded(model, parts, encoded, batch, lengths, pad, device, want):
    import torch

    ids, am, loss_mask = (torch.from_numpy(a).to(device)
                          for a in padded_batch(encoded, batch, lengths, pad))
    return _forward_batch(model, parts, ids, am, loss_mask, want)


def _run_pack(model, parts, encoded, batch, lengths, pad, device, want):
    import torch

    ids = np.concatenate([encoded[i].input_ids for i in batch])
    loss_mask = np.concatenate([encoded[i].loss_mask for i in batch])
    loss_mask[np.concatenate([[0], np.cumsum(lengths[batch])[:-1]])] = False   # a row's first token
    return _forward_packed(model, parts, torch.from_numpy(ids).to(device),
                           torch.from_numpy(loss_mask).to(device), lengths[batch], want)


def run_forward(model, tokenizer, rows: list[dict], signals, max_tokens: int = DEFAULT_MAX_TOKENS,
                batch_tokens: int | None = None, response_only: bool = True,
                encoded: list[Encoded] | None = None, pack: bool | None = None,
                workers: int | None = None) -> dict:
    """Signals for `rows` (canonical rows) from an already loaded causal LM, in row order.

    Works with any model whose forward takes input_ids + attention_mask (a peft model too); the
    model is put in eval mode for the pass and its previous mode restored. `encoded` skips
    tokenisation when the caller already has `chat.encode` results. `pack` (default: on a CPU,
    when the model supports it) runs rows packed into unpadded sequences, else padded batches.
    `workers` (default: torch's intra-op thread count on a CPU, 1 on a GPU) runs that many
    batches at once, each on its own share of the threads (`batching._in_workers`).

    Returns numpy arrays of length len(rows): n_tokens, n_loss_tokens, truncated, plus per
    signal: loss and ppl (NaN where a row has no loss token), entropy, el2n, rds [N, d] float32;
    token_loss / token_entropy as lists of float32 arrays (one per row, n_loss_tokens long).
    """
    import torch

    want = check_signals(signals)
    if encoded is None:
        encoded = [encode(tokenizer, r, max_tokens, response_only) for r in rows]
    if len(encoded) != len(rows):
        raise ValueError(f"{len(encoded)} encodings for {len(rows)} rows")
    n = len(encoded)
    lengths = np.array([len(e.input_ids) for e in encoded], dtype=np.int64)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = _model_device(model)
    batch_tokens = batch_tokens or default_batch_tokens(device.type)
    parts = _body_and_head(model)
    stats = bool(want & LOGIT_SIGNALS)

    n_loss = np.zeros(n, dtype=np.int64)
    tok: dict[str, list] = {k: [None] * n for k in ("loss", "entropy", "el2n")}
    rds = None
    if pack is None:
        pack = device.type == "cpu"
    pack = bool(pack and parts is not None and packing_supported(parts[0]))
    batches = (pack_rows if pack else length_batches)(lengths, batch_tokens)
    run = functools.partial(_run_pack if pack else _run_padded, model, parts, encoded,
                            lengths=lengths, pad=pad, device=device, want=want)
    if workers is None:
        workers = torch.get_num_threads() if device.type == "cpu" else 1
    was_training = model.training
    model.eval()
    try:
        with _PackedAttention(parts[0]) if pack else contextlib.nullcontext():
            for batch, res in _in_workers(run, batches, workers):
                if stats:
                    counts = res["counts"]
                    bounds = np.concatenate([[0], np.cumsum(counts)])
                    for j, i in enumerate(batch):
                        n_loss[i] = counts[j]
                        for k, flat in res["token"].items():
                            tok[k][i] = flat[bounds[j]:bounds[j + 1]]
                if "rds" in want:
                    if rds is None:
                        rds = np.zeros((n, res["rds"].shape[1]), dtype=np.float32)
                    rds[batch] = res["rds"]
    finally:
        model.train(was_training)
    return _results(want, encoded, lengths, n_loss, tok, rds)


def _results(want: frozenset[str], encoded: list[Encoded], lengths: np.ndarray,
             n_loss: np.ndarray, tok: dict[str, list], rds: np.ndarray | None) -> dict:
    """`run_forward`'s return value from the per-row loss-token counts, the per-token statistics
    `tok` (one array per row and statistic) and the RDS+ matrix."""
    out: dict = {"n_tokens": lengths,
                 "truncated": np.array([e.truncated for e in encoded], dtype=bool)}
    if want & LOGIT_SIGNALS:
        out["n_loss_tokens"] = n_loss

        def mean(k):
            return np.array([float(v.astype(np.float64).mean()) if len(v) else np.nan for v in tok[k]])

        if "loss" in want:
            out["loss"] = mean("loss")
            out["ppl"] = np.exp(out["loss"])
        if "entropy" in want:
            out["entropy"] = mean("entropy")
        if "el2n" in want:
            out["el2n"] = mean("el2n")
        if "token_loss" in want:
            out["token_loss"] = tok["loss"]
        if "token_entropy" in want:
            out["token_entropy"] = tok["entropy"]
    if "rds" in want:
        out["rds"] = rds if rds is not None else np.zeros((0, 0), dtype=np.float32)
    return out


def _cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16", "bf16"))


def engine_dtype(device: str, requested: str | None = None):
    """The dtype the engine runs in: `pick_dtype` on GPU or when asked; on a CPU with native
    bf16 instructions (AVX512-BF16, AMX, Arm BF16) bfloat16, else float32.

    Measured here (bench/RESULTS.md): on an AVX512-BF16 EPYC a bf16 matmul runs ~5x faster than
    fp32 and the transformer body ~3x; without the instructions bf16 is emulated and slower."""
    from thresher.pipeline.models.resolve import pick_dtype

    if (requested and requested != "auto") or not device.startswith("cpu"):
        return pick_dtype(device, requested)
    import torch

    return torch.bfloat16 if _cpu_has_native_bf16() else torch.float32
