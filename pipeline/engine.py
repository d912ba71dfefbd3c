"""The fused forward-pass engine: one pass of a causal LM gives every per-sample signal the scorers need.

This module is the engine only (any loaded model, rows in memory); `pipeline/forward.py` is the
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

How it stays cheap: rows are sorted by length and packed into batches under a token budget
(padding only to the longest row of the batch); the transformer body runs once; the LM head runs
only on the positions that predict a loss token (prompt positions never reach the vocabulary
projection), in chunks of at most LOGIT_CHUNK elements, so at most one [chunk, V] float32
tensor of logits and one of probabilities exist at a time; hidden states are pooled
straight from the body's output (no `output_hidden_states` copy of every layer).
"""

from __future__ import annotations

import logging

import numpy as np
from thresher.pipeline.chat import Encoded, encode

log = logging.getLogger(__name__)

SIGNALS = frozenset({"loss", "entropy", "el2n", "token_loss", "token_entropy", "rds"})
LOGIT_SIGNALS = SIGNALS - {"rds"}
DEFAULT_MAX_TOKENS = 2048        # RDS+ truncates the pool at 2048 tokens (methods-a.md §3.2)
DEFAULT_TOKEN_BUDGET = 1024      # padded tokens per batch on CPU: 512-1024 ran 1.3-1.8x faster than
                                 # 4096 here (less padding, cache-resident); bench/RESULTS.md
GPU_TOKEN_BUDGET = 16384         # on a GPU, bigger batches fill the device
LOGIT_CHUNK = 1 << 21            # elements of one [positions, V] float32 block (8 MiB: stays in
                                 # cache; 4x larger blocks ran the statistics 2x slower here)
ENGINE_VERSION = 1               # bump when the numbers an unchanged configuration gives change
SCALARS = ("loss", "ppl", "entropy", "el2n")


def default_token_budget(device) -> int:
    return GPU_TOKEN_BUDGET if str(device).startswith("cuda") else DEFAULT_TOKEN_BUDGET


def check_signals(signals) -> frozenset[str]:
    signals = frozenset(signals)
    unknown = signals - SIGNALS
    if unknown:
        raise ValueError(f"unknown forward signals {sorted(unknown)}; expected some of {sorted(SIGNALS)}")
    if not signals:
        raise ValueError("no forward signals requested")
    return signals


def length_batches(lengths: np.ndarray, token_budget: int) -> list[np.ndarray]:
    """Row indices grouped into batches, longest first, each padded size <= token_budget.

    A row longer than the budget forms a batch of its own."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches, cur, longest = [], [], 0
    for i in order:
        n = int(lengths[i])
        if cur and max(longest, n) * (len(cur) + 1) > token_budget:
            batches.append(np.asarray(cur))
            cur, longest = [], 0
        cur.append(int(i))
        longest = max(longest, n)
    if cur:
        batches.append(np.asarray(cur))
    return batches


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

    loss = lse - z_y; with p = softmax(z): entropy = lse - p.z, ||p - e_y||^2 = 1 - 2 p_y + p.p.
    One extra [n, V] block (p) at most; blocks are sized to stay in cache (LOGIT_CHUNK)."""
    import torch

    out = {}
    lse = torch.logsumexp(logits, dim=-1)
    out["loss"] = lse - logits.gather(1, y[:, None])[:, 0]
    if want & {"entropy", "token_entropy", "el2n"}:
        p = torch.softmax(logits, dim=-1)
        if want & {"entropy", "token_entropy"}:
            out["entropy"] = lse - torch.linalg.vecdot(p, logits)
        if "el2n" in want:
            sq = 1.0 - 2.0 * out["loss"].neg().exp() + torch.linalg.vecdot(p, p)   # ||p - e_y||^2
            out["el2n"] = sq.clamp_min(0.0).sqrt()
    return out


def _forward_batch(model, parts, ids, am, loss_mask, want: frozenset[str]) -> dict:
    """Signals of one padded batch; ids, am (attention mask) and loss_mask are [B, T]."""
    import torch
    import torch.nn.functional as F

    need_stats = bool(want & LOGIT_SIGNALS)
    sel = torch.zeros_like(loss_mask)
    sel[:, :-1] = loss_mask[:, 1:]                 # hidden state at t-1 predicts loss token t
    y = ids[:, 1:][loss_mask[:, 1:]]
    logits_all = None
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
        n = int(y.shape[0])
        vocab = head.out_features if parts is not None and hasattr(head, "out_features") else None
        step = max(1, LOGIT_CHUNK // (vocab or model.config.vocab_size))
        pieces: dict[str, list] = {"loss": [], "entropy": [], "el2n": []}
        for s in range(0, n, step):
            block = head(h_sel[s:s + step]) if logits_all is None else logits_all[s:s + step]
            for k, v in _logit_stats(block.float(), y[s:s + step], want).items():
                pieces[k].append(v.cpu().numpy().astype(np.float32))
            del block
        out["token"] = {k: np.concatenate(v) if v else np.zeros(0, np.float32)
                        for k, v in pieces.items()}
        out["counts"] = loss_mask[:, 1:].sum(1).cpu().numpy()
    if "rds" in want:
        lengths = am.sum(1, keepdim=True).float()                             # L per row
        pos = torch.arange(1, am.shape[1] + 1, device=am.device).float()[None, :] * am
        w = pos / (lengths * (lengths + 1) / 2)                               # i / sum_j j
        e = torch.einsum("bt,btd->bd", w, hidden.float())
        out["rds"] = F.normalize(e, dim=-1).cpu().numpy()
    return out


def _model_device(model):
    return next(model.parameters()).device


def run_forward(model, tokenizer, rows: list[dict], signals, max_tokens: int = DEFAULT_MAX_TOKENS,
                token_budget: int | None = None, response_only: bool = True,
                encoded: list[Encoded] | None = None) -> dict:
    """Signals for `rows` (canonical rows) from an already loaded causal LM, in row order.

    Works with any model whose forward takes input_ids + attention_mask (a peft model too); the
    model is put in eval mode for the pass and its previous mode restored. `encoded` skips
    tokenisation when the caller already has `chat.encode` results.

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
    token_budget = token_budget or default_token_budget(device.type)
    parts = _body_and_head(model)
    stats = bool(want & LOGIT_SIGNALS)

    n_loss = np.zeros(n, dtype=np.int64)
    tok: dict[str, list] = {k: [None] * n for k in ("loss", "entropy", "el2n")}
    rds = None
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in length_batches(lengths, token_budget):
                T = int(lengths[batch].max())
                ids = np.full((len(batch), T), pad, dtype=np.int64)
                am = np.zeros((len(batch), T), dtype=np.int64)
                loss_mask = np.zeros((len(batch), T), dtype=bool)
                for j, i in enumerate(batch):
                    L = lengths[i]
                    ids[j, :L], am[j, :L], loss_mask[j, :L] = encoded[i].input_ids, 1, encoded[i].loss_mask
                res = _forward_batch(model, parts, torch.from_numpy(ids).to(device),
                                     torch.from_numpy(am).to(device),
                                     torch.from_numpy(loss_mask).to(device), want)
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

    out: dict = {"n_tokens": lengths,
                 "truncated": np.array([e.truncated for e in encoded], dtype=bool)}
    if stats:
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
    from thresher.pipeline.models import pick_dtype

    if (requested and requested != "auto") or not device.startswith("cpu"):
        return pick_dtype(device, requested)
    import torch

    return torch.bfloat16 if _cpu_has_native_bf16() else torch.float32
