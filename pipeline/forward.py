"""The fused forward pass: one pass of a causal LM gives every per-sample signal the scorers need.

    out = run_forward(model, tok, rows, {"loss", "el2n", "rds"})   # in memory, any loaded model
    res = forward_signals(pool, store, "smollm2-135m-instruct", {"loss", "rds"})  # cached, resumable
    res.scores()      # DataFrame in pool order: id, n_tokens, n_loss_tokens, truncated, loss, ppl, ...
    res.rds()         # float16 [N, d] memory-mapped, aligned to pool order

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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from thresher.pipeline.artifacts import ArtifactStore, Stage
from thresher.pipeline.chat import Encoded, encode
from thresher.pipeline.pool import Pool

if TYPE_CHECKING:
    from thresher.pipeline.method import Context

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


def _forward_batch(model, parts, ids, am, lm, want: frozenset[str]) -> dict:
    """Signals of one padded batch. ids/am/lm: [B, T] (lm = loss mask)."""
    import torch
    import torch.nn.functional as F

    need_stats = bool(want & LOGIT_SIGNALS)
    sel = torch.zeros_like(lm)
    sel[:, :-1] = lm[:, 1:]                 # hidden state at t-1 predicts loss token t
    y = ids[:, 1:][lm[:, 1:]]
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
        out["counts"] = lm[:, 1:].sum(1).cpu().numpy()
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
                lm = np.zeros((len(batch), T), dtype=bool)
                for j, i in enumerate(batch):
                    L = lengths[i]
                    ids[j, :L], am[j, :L], lm[j, :L] = encoded[i].input_ids, 1, encoded[i].loss_mask
                res = _forward_batch(model, parts, torch.from_numpy(ids).to(device),
                                     torch.from_numpy(am).to(device),
                                     torch.from_numpy(lm).to(device), want)
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


# ----------------------------------------------------------------------------------------------
# Pool-level stage: cached per shard in the artifact store, resumable.

STATS_SIGNALS = frozenset({"loss", "entropy", "el2n", "token_loss", "token_entropy"})


@dataclass
class ForwardResult:
    """The finished `forward` stage of one pool: per-sample scores, per-token arrays, RDS+ vectors."""

    stage: Stage
    has_stats: bool
    has_rds: bool

    def scores(self) -> pl.DataFrame:
        """id, n_tokens, truncated (+ n_loss_tokens, loss, ppl, entropy, el2n), in pool order."""
        return pl.read_parquet(self.stage.path("scores.parquet"))

    def rds(self, mmap: bool = True) -> np.ndarray:
        if not self.has_rds:
            raise ValueError("this forward stage did not compute RDS+ representations")
        return np.load(self.stage.path("rds.npy"), mmap_mode="r" if mmap else None)

    def token_values(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(flat float32 values, int64 offsets [N+1]) of token_loss or token_entropy, pool order."""
        if not self.has_stats or name not in ("token_loss", "token_entropy"):
            raise ValueError(f"no per-token array {name!r} in this forward stage")
        values, offsets, base = [], [np.zeros(1, np.int64)], 0
        for shard in self.stage.info()["shards"]:
            col = pq.read_table(self.stage.path(f"{shard}.parquet"), columns=[name])[name].combine_chunks()
            offs = col.offsets.to_numpy().astype(np.int64)
            values.append(col.values.to_numpy(zero_copy_only=False)[offs[0]:offs[-1]])
            offsets.append(offs[1:] - offs[0] + base)
            base += int(offs[-1] - offs[0])
        return np.concatenate(values).astype(np.float32), np.concatenate(offsets)


def _shard_table(ids: list[str], out: dict, stats: bool) -> pa.Table:
    cols = {"id": pa.array(ids, pa.string()),
            "n_tokens": pa.array(out["n_tokens"], pa.int64()),
            "truncated": pa.array(out["truncated"], pa.bool_())}
    if stats:
        cols["n_loss_tokens"] = pa.array(out["n_loss_tokens"], pa.int64())
        for k in SCALARS:
            cols[k] = pa.array(out[k], pa.float64())
        for k in ("token_loss", "token_entropy"):
            cols[k] = pa.array([v.tolist() for v in out[k]], pa.list_(pa.float32()))
    return pa.table(cols)


def forward_stage(pool: Pool, store: ArtifactStore, identity: str, signals, max_tokens: int,
                  response_only: bool, dtype_name: str) -> tuple[Stage, bool, bool]:
    """The stage a request maps to. The logit statistics (loss, entropy, EL2N, per-token arrays)
    are always computed together (they cost about one pass) so perplexity, EL2N and the EU plane
    share one cache; RDS+ vectors are a separate switch (no LM head needed for them alone)."""
    want = check_signals(signals)
    stats, rds = bool(want & LOGIT_SIGNALS), "rds" in want
    config = {"model": identity, "stats": stats, "rds": rds, "max_tokens": int(max_tokens),
              "response_only": bool(response_only) if stats else None, "dtype": dtype_name,
              "engine": ENGINE_VERSION}
    return store.stage("forward", inputs=[pool.fingerprint], config=config), stats, rds


def forward_signals(pool: Pool, store: ArtifactStore, model_name: str, signals,
                    max_tokens: int = DEFAULT_MAX_TOKENS, token_budget: int | None = None,
                    response_only: bool = True, device: str | None = None,
                    dtype: str | None = None, threads: int | None = None,
                    trust_remote_code: bool = False, progress=None) -> ForwardResult:
    """Run (or reuse) the forward pass over every shard of `pool`; returns the finished stage.

    Each shard's output is written atomically (`{shard}.rds.npy` then `{shard}.parquet`, the
    latter marking the shard done), so a killed run resumes at the first unfinished shard. The
    model is loaded only if some shard still needs computing. `threads` sets torch's CPU thread
    count for the pass (restored afterwards; None keeps it)."""
    from thresher.pipeline.models import pick_device, resolve

    resolved = resolve(model_name) if isinstance(model_name, str | Path) else model_name
    dev = pick_device(device)
    torch_dtype = engine_dtype(dev, dtype)
    stage, stats, rds = forward_stage(pool, store, resolved.identity, signals, max_tokens,
                                      response_only, str(torch_dtype).removeprefix("torch."))
    result = ForwardResult(stage, stats, rds)
    if stage.done:
        return result
    import torch

    want = (STATS_SIGNALS if stats else frozenset()) | ({"rds"} if rds else frozenset())
    names: list[str] = []
    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        _run_shards(pool, stage, resolved, dev, torch_dtype, want, rds, stats, names, max_tokens,
                    token_budget, response_only, trust_remote_code, progress)
    finally:
        torch.set_num_threads(saved_threads)
    _assemble(stage, names, stats, rds)
    stage.complete({"rows": pool.n_rows, "shards": names, "stats": stats, "rds": rds})
    return result


def _run_shards(pool, stage, resolved, dev, torch_dtype, want, rds, stats, names, max_tokens,
                token_budget, response_only, trust_remote_code, progress) -> None:
    from thresher.pipeline.models import load_causal_lm, load_tokenizer

    model = tok = None
    for shard, rows in pool.iter_shards(["id", "kind", "messages", "text"]):
        names.append(shard)
        if stage.has(f"{shard}.parquet") and (not rds or stage.has(f"{shard}.rds.npy")):
            continue
        if model is None:
            tok = load_tokenizer(resolved, trust_remote_code=trust_remote_code)
            model = load_causal_lm(resolved, dev, torch_dtype, trust_remote_code=trust_remote_code)
        out = run_forward(model, tok, rows, want, max_tokens=max_tokens, token_budget=token_budget,
                          response_only=response_only)
        if rds:
            with stage.writing(f"{shard}.rds.npy") as tmp, open(tmp, "wb") as f:
                np.save(f, out["rds"].astype(np.float16))
        with stage.writing(f"{shard}.parquet") as tmp:
            pq.write_table(_shard_table([r["id"] for r in rows], out, stats), tmp)
        log.info("forward: %s done (%d rows)", shard, len(rows))
        if progress is not None:
            progress(len(rows))


def _assemble(stage: Stage, names: list[str], stats: bool, rds: bool) -> None:
    """Pool-order files: scores.parquet (per-sample columns) and rds.npy (float16 [N, d])."""
    scalar_cols = ["id", "n_tokens", "truncated"] + (["n_loss_tokens", *SCALARS] if stats else [])
    frames = [pl.read_parquet(stage.path(f"{s}.parquet"), columns=scalar_cols) for s in names]
    with stage.writing("scores.parquet") as tmp:
        pl.concat(frames).write_parquet(tmp)
    if rds:
        stage.concat_arrays([f"{s}.rds.npy" for s in names], "rds.npy")


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


def parse_flag(value) -> bool:
    if isinstance(value, str):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got {value!r}")
    return bool(value)


def forward_for(ctx, signals, pool: Pool | None = None) -> ForwardResult:
    """`forward_signals` with the settings a method's context carries (CLI --model, --device,
    --param max_tokens=, response_only=, token_budget=, dtype=, threads=), recorded in the
    manifest; the model identity goes to ctx.models["lm"]. `pool` defaults to ctx.pool (RDS+
    also runs it over its target sets)."""
    from thresher.pipeline.models import DEFAULT_LM, pick_device, resolve

    model = resolve(ctx.option("model", DEFAULT_LM))
    ctx.models["lm"] = model.identity
    device = pick_device(ctx.option("device", "auto"))
    dtype = engine_dtype(device, ctx.option("dtype", "auto"))
    ctx.config["dtype"] = str(dtype).removeprefix("torch.")
    settings = {
        "max_tokens": int(ctx.option("max_tokens", DEFAULT_MAX_TOKENS)),
        "token_budget": int(ctx.option("token_budget", default_token_budget(device))),
        "threads": ctx.option("threads", None),
    }
    if check_signals(signals) & LOGIT_SIGNALS:
        settings["response_only"] = parse_flag(ctx.option("response_only", True))
    if settings["max_tokens"] < 2 or settings["token_budget"] < 1:
        raise ValueError("max_tokens must be >= 2 and token_budget >= 1")
    with ctx.timed("forward"):
        return forward_signals(pool or ctx.pool, ctx.store, model, signals, device=device,
                               dtype=str(dtype).removeprefix("torch."), **settings)


def scored_candidates(ctx: Context, columns: list[str]) -> pl.DataFrame:
    """ctx.candidates joined with the forward-pass columns; rows without a score left out
    (and counted in the manifest)."""
    scores = forward_for(ctx, {"loss", "entropy", "el2n"}).scores()
    cand = ctx.candidates.join(scores.select("id", "n_loss_tokens", *columns), on="id",
                               how="left", maintain_order="left")
    ok = pl.all_horizontal([pl.col(c).is_not_null() & pl.col(c).is_not_nan() for c in columns])
    dropped = cand.height - cand.filter(ok).height
    ctx.config["unscored_rows"] = dropped
    if dropped:
        log.warning("%d rows have no loss tokens (response truncated away?) and are not ranked; "
                    "raise --param max_tokens to score them", dropped)
    cand = cand.filter(ok)
    if cand.height == 0:
        raise ValueError("no row has a loss token to score; check the pool and --param max_tokens")
    return cand
