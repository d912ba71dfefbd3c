"""The forward-pass stage: the engine (`pipeline/engine.py`) run over every pool shard, cached and
resumable in the artifact store.

    res = forward_signals(pool, store, "smollm2-135m-instruct", {"loss", "rds"})  # cached, resumable
    res.scores()      # DataFrame in pool order: id, n_tokens, n_loss_tokens, truncated, loss, ppl, ...
    res.rds()         # float16 [N, d] memory-mapped, aligned to pool order
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
from thresher.pipeline.engine import (
    DEFAULT_MAX_TOKENS,
    ENGINE_VERSION,
    LOGIT_SIGNALS,
    SCALARS,
    check_signals,
    default_token_budget,
    engine_dtype,
    run_forward,
)
from thresher.pipeline.pool import Pool

if TYPE_CHECKING:
    from thresher.pipeline.method import Context

log = logging.getLogger(__name__)

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
