"""The forward-pass stage: the engine (`pipeline/models/engine.py`) run over every pool shard, cached and
resumable in the artifact store.

    Forward(model="smollm2-135m-instruct", stats=True, rds=True)    # the stage, as methods declare it
    res = forward_signals(pool, store, "smollm2-135m-instruct", {"loss", "rds"})  # run it directly
    res.scores()      # DataFrame in pool order: id, n_tokens, n_loss_tokens, truncated, loss, ppl, ...
    res.rds()         # float16 [N, d] memory-mapped, aligned to pool order

The logit statistics (loss, entropy, EL2N, per-token arrays) are always computed together (they
cost about one pass), so perplexity, EL2N and the EU plane share one cache; RDS+ vectors are a
separate switch (no LM head is needed for them alone). Per shard: `<hash>.scores.parquet` (+
`<hash>.rds.npy`), then the pool-level `scores.parquet` and `rds.npy` in pool order.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from thresher.pipeline.artifacts import ArtifactDir, ArtifactStore
from thresher.pipeline.io.pool import Pool
from thresher.pipeline.models.engine import (
    DEFAULT_MAX_TOKENS,
    ENGINE_VERSION,
    LOGIT_SIGNALS,
    SCALARS,
    check_signals,
    engine_dtype,
    run_forward,
)
from thresher.pipeline.models.resolve import DEFAULT_LM, model_identity
from thresher.pipeline.stage import (
    Resources,
    ShardResult,
    Stage,
    StageRun,
    concat_shard_tables,
    shard_file,
)

log = logging.getLogger(__name__)

STATS_SIGNALS = frozenset({"loss", "entropy", "el2n", "token_loss", "token_entropy"})


@dataclass
class ForwardResult:
    """The finished forward stage of one pool: per-sample scores, per-token arrays, RDS+ vectors."""

    dir: ArtifactDir
    shard_tables: list[Path]
    has_stats: bool
    has_rds: bool

    @property
    def fingerprint(self) -> str:
        return f"forward:{self.dir.key}"

    def scores(self) -> pl.DataFrame:
        """id, n_tokens, truncated (+ n_loss_tokens, loss, ppl, entropy, el2n), in pool order."""
        return pl.read_parquet(self.dir.path("scores.parquet"))

    def rds(self, mmap: bool = True) -> np.ndarray:
        if not self.has_rds:
            raise ValueError("this forward stage did not compute RDS+ representations")
        return np.load(self.dir.path("rds.npy"), mmap_mode="r" if mmap else None)

    def matrix(self) -> np.ndarray:
        """The row vectors this stage made (the RDS+ representations), for KMeans and search."""
        return self.rds()

    def token_values(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(flat float32 values, int64 offsets [N+1]) of token_loss or token_entropy, pool order."""
        if not self.has_stats or name not in ("token_loss", "token_entropy"):
            raise ValueError(f"no per-token array {name!r} in this forward stage")
        values, offsets, base = [], [np.zeros(1, np.int64)], 0
        for path in self.shard_tables:
            col = pq.read_table(path, columns=[name])[name].combine_chunks()
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


@dataclass
class ForwardWorker:
    model: object
    tokenizer: object
    n_params: int


@dataclass(frozen=True)
class Forward(Stage):
    """One fused forward pass of a causal LM over every row (pipeline/models/engine.py)."""

    kind: ClassVar[str] = "forward"
    loads_model: ClassVar[bool] = True
    requires = (("transformers", "transformers>=4.46"),)
    model: str = DEFAULT_LM
    stats: bool = True           # loss, ppl, entropy, EL2N, per-token loss and entropy
    rds: bool = False            # RDS+ position-weighted mean-pooled final hidden states
    max_tokens: int = DEFAULT_MAX_TOKENS
    response_only: bool = True
    dtype: str = "auto"          # resolved per device when planned (bind)
    batch_tokens: int | None = field(default=None, compare=False, metadata={"key": False})
    threads: int | None = field(default=None, compare=False, metadata={"key": False})

    def __post_init__(self):
        if not (self.stats or self.rds):
            raise ValueError("a forward stage needs stats or rds")
        if self.max_tokens < 2 or (self.batch_tokens is not None and self.batch_tokens < 1):
            raise ValueError("max_tokens must be >= 2 and batch_tokens >= 1")

    def bind(self, device: str) -> Forward:
        dtype = str(engine_dtype(device, self.dtype)).removeprefix("torch.")
        return dataclasses.replace(self, dtype=dtype)

    def key_extra(self) -> dict:
        return {"model": model_identity(self.model), "engine": ENGINE_VERSION,
                "response_only": self.response_only if self.stats else None}

    def resources(self) -> Resources:
        return Resources(cpus=1, gpus=1, memory_gb=4)

    def signals(self) -> frozenset[str]:
        return (STATS_SIGNALS if self.stats else frozenset()) | ({"rds"} if self.rds else frozenset())

    def open_worker(self, device: str) -> ForwardWorker:
        import torch
        from thresher.pipeline.models.resolve import load_causal_lm, load_tokenizer, resolve

        if self.threads:
            torch.set_num_threads(int(self.threads))
        resolved = resolve(self.model)
        dtype = engine_dtype(device, self.dtype)
        model = load_causal_lm(resolved, device, dtype)
        return ForwardWorker(model, load_tokenizer(resolved),
                             sum(p.numel() for p in model.parameters()))

    def run_shard(self, worker: ForwardWorker, rows: list[dict]) -> ShardResult:
        out = run_forward(worker.model, worker.tokenizer, rows, self.signals(),
                          max_tokens=self.max_tokens, batch_tokens=self.batch_tokens,
                          response_only=self.response_only)
        tokens = int(out["n_tokens"].sum())
        arrays = {"rds": out["rds"].astype(np.float16)} if self.rds else {}
        return ShardResult(arrays=arrays,
                           tables={"scores": _shard_table([r["id"] for r in rows], out, self.stats)},
                           tokens=tokens, flops=2.0 * worker.n_params * tokens)

    def assemble(self, run: StageRun) -> dict:
        scalar_cols = ["id", "n_tokens", "truncated"] + (
            ["n_loss_tokens", *SCALARS] if self.stats else [])
        frame = concat_shard_tables(run, "scores.parquet", columns=scalar_cols)
        if self.rds:
            run.dir.concat_arrays([shard_file(run, s, "rds.npy") for s in run.pool.shards], "rds.npy")
        return {"rows": frame.height}

    def load(self, run: StageRun) -> ForwardResult:
        return ForwardResult(run.dir, [shard_file(run, s, "scores.parquet") for s in run.pool.shards],
                             self.stats, self.rds)


def forward_signals(pool: Pool, store: ArtifactStore, model_name: str, signals,
                    max_tokens: int = DEFAULT_MAX_TOKENS, batch_tokens: int | None = None,
                    response_only: bool = True, device: str | None = None,
                    dtype: str | None = None, threads: int | None = None) -> ForwardResult:
    """Run (or reuse) the forward stage over every shard of `pool` in this process."""
    from thresher.pipeline.models.resolve import pick_device
    from thresher.pipeline.plan import run_stage

    want = check_signals(signals)
    stage = Forward(model=str(model_name), stats=bool(want & LOGIT_SIGNALS), rds="rds" in want,
                    max_tokens=max_tokens, response_only=response_only, dtype=dtype or "auto",
                    batch_tokens=batch_tokens, threads=threads)
    return run_stage(stage, pool, store, pick_device(device))


def scored_rows(result: ForwardResult, columns: list[str]) -> pl.DataFrame:
    """id + `columns` for the rows that have a score: a row with no loss token (its response
    truncated away) has none and is left out (the selection counts it as unscored)."""
    frame = result.scores().select("id", "n_loss_tokens", *columns)
    ok = pl.all_horizontal([pl.col(c).is_not_null() & pl.col(c).is_not_nan() for c in columns])
    frame = frame.filter(ok)
    if frame.height == 0:
        raise ValueError("no row has a loss token to score; check the pool and --param max_tokens")
    return frame
