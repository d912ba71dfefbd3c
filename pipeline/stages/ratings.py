"""The LM-ratings stage: a causal LM rates every row (or a seeded sample) on a rubric, per shard.

    LmRatings(model="smollm2-135m-instruct", rubric="edu")           # the stage, as methods declare it
    res = run_stage(LmRatings(rubric="deita", sample=0.1), pool, store)
    res.frame()      # id, rating (+ complexity, quality), n_tokens, truncated, reason; pool order

`sample` < 1 rates only the rows whose id hash (with `seed`) falls below it: a deterministic
sample that does not depend on shard boundaries or order, so a training set for a classifier can
be rated at a fraction of the pool's cost (the FineWeb-Edu recipe). Rows outside the sample get
the reason "not in the rating sample"; rows the rubric cannot rate get theirs
(`pipeline/models/rating.py`). Both are counted in the stage's statistics (`reasons`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field
from typing import ClassVar

import polars as pl
import pyarrow as pa
from thresher.pipeline.artifacts import ArtifactDir, config_key
from thresher.pipeline.models.engine import engine_dtype
from thresher.pipeline.models.rating import RATING_VERSION, Rater
from thresher.pipeline.models.resolve import DEFAULT_LM, model_identity
from thresher.pipeline.models.rubrics import load_rubric
from thresher.pipeline.stage import (
    Resources,
    ShardResult,
    Stage,
    StageRun,
    concat_shard_tables,
    reason_counts,
)

NOT_SAMPLED = "not in the rating sample"
PARTS = ("first_user", "conversation", "response")


def in_sample(row_id: str, fraction: float, seed: int) -> bool:
    """Whether a row is in a `fraction` sample: a stable hash of (seed, id), not Python's hash."""
    if fraction >= 1.0:
        return True
    h = hashlib.blake2b(f"{seed}:{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64 < fraction


@dataclass
class Ratings:
    dir: ArtifactDir
    columns: tuple[str, ...]

    @property
    def fingerprint(self) -> str:
        return f"ratings:{self.dir.key}"

    def frame(self) -> pl.DataFrame:
        """id, rating (+ the rubric's per-question means), n_tokens, truncated, reason."""
        return pl.read_parquet(self.dir.path("ratings.parquet"))


@dataclass(frozen=True)
class LmRatings(Stage):
    """Expected rating of a causal LM on a rubric, read from one forward pass per prompt."""

    kind: ClassVar[str] = "ratings"
    loads_model: ClassVar[bool] = True
    requires = (("transformers", "transformers>=4.46"),)
    model: str = DEFAULT_LM
    rubric: str = "edu"
    part: str = "conversation"       # what a text rubric reads of a chat row
    sample: float = 1.0
    seed: int = 0
    max_tokens: int = 1024
    dtype: str = "auto"
    batch_tokens: int | None = field(default=None, compare=False, metadata={"key": False})

    def __post_init__(self):
        if not 0 < self.sample <= 1:
            raise ValueError(f"sample must be in (0, 1], got {self.sample}")
        if self.part not in PARTS:
            raise ValueError(f"unknown text part {self.part!r}; expected one of {', '.join(PARTS)}")
        if self.max_tokens < 16:
            raise ValueError(f"max_tokens must be >= 16, got {self.max_tokens}")
        load_rubric(self.rubric)          # a bad rubric fails before any work

    def bind(self, device: str) -> LmRatings:
        return dataclasses.replace(self, dtype=str(engine_dtype(device, self.dtype)).removeprefix("torch."))

    def key_extra(self) -> dict:
        return {"model": model_identity(self.model), "version": RATING_VERSION,
                "rubric": config_key(load_rubric(self.rubric).as_dict())}

    def resources(self) -> Resources:
        return Resources(cpus=1, gpus=1, memory_gb=4)

    def open_worker(self, device: str) -> Rater:
        from thresher.pipeline.models.resolve import load_causal_lm, load_tokenizer, resolve

        resolved = resolve(self.model)
        model = load_causal_lm(resolved, device, engine_dtype(device, self.dtype))
        return Rater(model, load_tokenizer(resolved), load_rubric(self.rubric), self.max_tokens,
                     self.part, self.batch_tokens)

    def run_shard(self, worker: Rater, rows: list[dict]) -> ShardResult:
        picked = [i for i, r in enumerate(rows) if in_sample(r["id"], self.sample, self.seed)]
        out = worker([rows[i] for i in picked])
        n = len(rows)
        cols = {k: [None] * n for k in out if k != "truncated"}
        truncated = [False] * n
        reason = [NOT_SAMPLED] * n
        for j, i in enumerate(picked):
            for k, col in cols.items():
                v = out[k][j]
                col[i] = None if k != "reason" and math.isnan(v) else v     # NaN -> null
            truncated[i] = bool(out["truncated"][j])
            reason[i] = out["reason"][j]
        table = {"id": pa.array([r["id"] for r in rows], pa.string())}
        for k, v in cols.items():
            if k in ("reason", "n_tokens"):
                continue
            table[k] = pa.array(v, pa.float64())
        table["n_tokens"] = pa.array([int(v or 0) for v in cols["n_tokens"]], pa.int64())
        table["truncated"] = pa.array(truncated, pa.bool_())
        table["reason"] = pa.array(reason, pa.string())
        tokens = int(sum(int(v or 0) for v in cols["n_tokens"]))
        return ShardResult(tables={"ratings": pa.table(table)}, tokens=tokens,
                           flops=2.0 * worker.n_params * tokens)

    def assemble(self, run: StageRun) -> dict:
        frame = concat_shard_tables(run, "ratings.parquet")
        return {"rows": frame.height, "rated": int(frame["rating"].is_not_null().sum()),
                "reasons": reason_counts(frame),
                "columns": [c for c in frame.columns if c not in ("id", "reason")]}

    def load(self, run: StageRun) -> Ratings:
        return Ratings(run.dir, tuple(run.dir.info().get("columns", ())))
