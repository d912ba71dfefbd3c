"""Token counts per pool row (whole sequence and loss-bearing tokens): the `TokenCounts` stage.

Needs the tokenizer only (no model weights): token budgets and the manifest's token totals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import polars as pl
import pyarrow as pa
from thresher.pipeline.artifacts import ArtifactDir, ArtifactStore
from thresher.pipeline.io.pool import Pool
from thresher.pipeline.models.chat import encode
from thresher.pipeline.models.resolve import (
    DEFAULT_LM,
    ResolvedModel,
    load_tokenizer,
    model_identity,
    resolve,
)
from thresher.pipeline.stage import ShardResult, Stage, StageRun, concat_shard_tables

NO_LIMIT = 1 << 30


@dataclass
class TokenCountsResult:
    dir: ArtifactDir

    @property
    def fingerprint(self) -> str:
        return f"tokens:{self.dir.key}"

    def frame(self) -> pl.DataFrame:
        """DataFrame[id, n_tokens, n_loss_tokens] in pool order."""
        return pl.read_parquet(self.dir.path("counts.parquet"))


@dataclass(frozen=True)
class TokenCounts(Stage):
    kind: ClassVar[str] = "tokens"
    tokenizer: str = DEFAULT_LM

    def key_extra(self) -> dict:
        return {"tokenizer": model_identity(self.tokenizer)}

    def open_worker(self, device: str):
        return load_tokenizer(resolve(self.tokenizer))

    def run_shard(self, worker, rows: list[dict]) -> ShardResult:
        encs = [encode(worker, r, NO_LIMIT) for r in rows]
        table = pa.table({"id": pa.array([r["id"] for r in rows], pa.string()),
                          "n_tokens": pa.array([len(e.input_ids) for e in encs], pa.int64()),
                          "n_loss_tokens": pa.array([int(e.loss_mask.sum()) for e in encs], pa.int64())})
        return ShardResult(tables={"counts": table}, tokens=sum(len(e.input_ids) for e in encs))

    def assemble(self, run: StageRun) -> dict:
        return {"rows": concat_shard_tables(run, "counts.parquet").height}

    def load(self, run: StageRun) -> TokenCountsResult:
        return TokenCountsResult(run.dir)


def token_counts(pool: Pool, store: ArtifactStore, model: ResolvedModel | str) -> pl.DataFrame:
    """DataFrame[id, n_tokens, n_loss_tokens] in pool order; computed once per shard + tokenizer."""
    from thresher.pipeline.plan import run_stage

    name = model.name if isinstance(model, ResolvedModel) else model
    return run_stage(TokenCounts(tokenizer=str(name)), pool, store).frame()
