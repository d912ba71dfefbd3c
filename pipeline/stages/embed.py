"""Embedding stage: one float16 row per pool row, cached per shard, memory-mapped from disk.

    emb = embed_pool(pool, store)                 # all-MiniLM-L6-v2 over the whole conversation
    x = emb.matrix()                              # np.memmap float16 (n_rows, dim), pool row order
    emb.path                                      # .../embed/<key>/embeddings.npy

`Embed` is the stage (pipeline/stage.py): per shard, `ShardEmbedder` (the model, loaded once per
process or Ray actor) embeds the shard's rows into `<workdir>/embed/<config>/units/<shard hash>
.vectors.npy`; the pool-level `embeddings.npy` concatenates them in pool order. A killed run keeps
its finished shards; the rerun embeds only the missing ones, and a pool that shares shards with
an earlier one (a folder that grew) embeds only its new shards. Texts are sorted by token length
into batches (little padding); on a GPU the model runs in bf16 (fp16 where bf16 is not
supported), on a CPU with native bf16 instructions (AVX512-BF16, AMX) in bf16 too. Vectors are L2-normalised in float32 before the cast to float16 (unless
`normalize=False`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from thresher.pipeline.artifacts import ArtifactDir, ArtifactStore
from thresher.pipeline.io.pool import Pool
from thresher.pipeline.io.schema import row_text
from thresher.pipeline.models.resolve import (
    DEFAULT_EMBEDDER,
    ResolvedModel,
    model_identity,
    pick_device,
    resolve,
)
from thresher.pipeline.stage import Resources, ShardResult, Stage, StageRun, shard_file

log = logging.getLogger(__name__)

PARTS = ("first_user", "conversation", "response")
MATRIX = "embeddings.npy"


class ShardEmbedder:
    """Holds a sentence-transformers model; `__call__(rows)` embeds one shard's canonical rows.

    This is the unit a multi-GPU executor parallelises (one instance per GPU / Ray actor).
    """

    def __init__(self, model: ResolvedModel | str = DEFAULT_EMBEDDER, part: str = "conversation",
                 device: str | None = None, dtype: str | None = None, batch_size: int = 64,
                 max_seq_length: int | None = None, normalize: bool = True):
        import torch
        from thresher.pipeline.models.resolve import load_embedder

        if part not in PARTS:
            raise ValueError(f"unknown text part {part!r}; expected one of {', '.join(PARTS)}")
        self.model = resolve(model) if isinstance(model, str) else model
        self.part, self.batch_size, self.normalize = part, batch_size, normalize
        self.device = pick_device(device)
        self.st = load_embedder(self.model, device=self.device)
        if max_seq_length:
            self.st.max_seq_length = max_seq_length
        # GPU: bf16 where supported, else fp16 (pick_dtype). CPU: bf16 where the CPU has native
        # bf16 instructions (engine_dtype): 2.5-2.9x the float32 encode here at cosine >= 0.9998
        # to the float32 vectors (bench/RESULTS.md); else float32.
        from thresher.pipeline.models.engine import engine_dtype

        self.dtype = engine_dtype(self.device, dtype)
        if self.dtype != torch.float32:
            self.st.to(self.dtype)
        dim_of = getattr(self.st, "get_embedding_dimension", None) or \
            self.st.get_sentence_embedding_dimension   # renamed in sentence-transformers 6
        self.dim = dim_of()
        self.n_params = sum(p.numel() for p in self.st.parameters())
        self.tokens_seen = 0      # tokens embedded so far (stage statistics, FLOPs)

    def __call__(self, rows: list[dict]) -> np.ndarray:
        return self.encode([row_text(r, self.part) for r in rows])

    def encode(self, texts: list[str]) -> np.ndarray:
        """float16 (len(texts), dim); batches hold texts of similar token length."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float16)
        tok = self.st.tokenizer
        lengths = [len(ids) for ids in tok(texts, add_special_tokens=False, truncation=True,
                                             max_length=self.st.max_seq_length)["input_ids"]]
        self.tokens_seen += int(sum(lengths))
        order = np.argsort(-np.asarray(lengths), kind="stable")
        out = np.empty((len(texts), self.dim), dtype=np.float16)
        import torch

        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                vec = self.st.encode([texts[i] for i in idx], batch_size=len(idx),
                                     convert_to_tensor=True, show_progress_bar=False).float()
                if self.normalize:
                    vec = torch.nn.functional.normalize(vec, dim=1)
                out[idx] = vec.cpu().numpy().astype(np.float16)
        return out


@dataclass
class Embeddings:
    dir: ArtifactDir
    model: str          # identity
    part: str
    rows: int
    dim: int

    @property
    def path(self) -> Path:
        return self.dir.path(MATRIX)

    @property
    def fingerprint(self) -> str:
        """Identifies the matrix for downstream cache keys (the embed output's key)."""
        return f"embed:{self.dir.key}"

    def matrix(self) -> np.ndarray:
        """The float16 (rows, dim) matrix, memory-mapped read-only, aligned to pool row order."""
        return np.load(self.path, mmap_mode="r")


@dataclass(frozen=True)
class Embed(Stage):
    """Sentence embeddings of one text part of every row (float16, L2-normalised)."""

    kind: ClassVar[str] = "embed"
    loads_model: ClassVar[bool] = True
    requires = (("sentence_transformers", "sentence-transformers>=3.0"),)
    model: str = DEFAULT_EMBEDDER
    part: Literal["first_user", "conversation", "response"] = "conversation"
    max_seq_length: int | None = None
    normalize: bool = True
    dtype: str = "auto"          # resolved per device when planned (bind): part of the cache key
    batch_size: int = field(default=64, compare=False, metadata={"key": False})

    def __post_init__(self):
        if self.part not in PARTS:
            raise ValueError(f"unknown text part {self.part!r}; expected one of {', '.join(PARTS)}")

    def bind(self, device: str) -> Embed:
        from thresher.pipeline.models.engine import engine_dtype

        dtype = str(engine_dtype(device, self.dtype)).removeprefix("torch.")
        return dataclasses.replace(self, dtype=dtype)

    def key_extra(self) -> dict:
        return {"model": model_identity(self.model)}

    def resources(self) -> Resources:
        return Resources(cpus=1, gpus=0.25, memory_gb=2)   # small embedders share a GPU

    def open_worker(self, device: str) -> ShardEmbedder:
        return ShardEmbedder(self.model, self.part, device, self.dtype, self.batch_size,
                             self.max_seq_length, self.normalize)

    def run_shard(self, worker: ShardEmbedder, rows: list[dict]) -> ShardResult:
        before = worker.tokens_seen
        vec = worker(rows)
        tokens = worker.tokens_seen - before
        return ShardResult(arrays={"vectors": vec}, tokens=tokens, flops=2.0 * worker.n_params * tokens)

    def assemble(self, run: StageRun) -> dict:
        parts = [shard_file(run, s, "vectors.npy") for s in run.pool.shards]
        n, dim = run.dir.concat_arrays(parts, MATRIX)
        if n != run.pool.n_rows:
            raise RuntimeError(f"embedding shards hold {n} rows but the pool has {run.pool.n_rows}")
        return {"rows": n, "dim": dim, "model": model_identity(self.model), "part": self.part}

    def load(self, run: StageRun) -> Embeddings:
        info = run.dir.info()
        return Embeddings(run.dir, info["model"], info["part"], info["rows"], info["dim"])


def embed_pool(pool: Pool, store: ArtifactStore, model: str | ResolvedModel = DEFAULT_EMBEDDER,
               part: str = "conversation", device: str | None = None, batch_size: int = 64,
               max_seq_length: int | None = None, normalize: bool = True,
               dtype: str = "auto") -> Embeddings:
    """Embed every pool row (resuming from finished shards) and return the mapped matrix."""
    from thresher.pipeline.plan import run_stage

    name = model.name if isinstance(model, ResolvedModel) else model
    stage = Embed(model=str(name), part=part, max_seq_length=max_seq_length, normalize=normalize,
                  dtype=dtype, batch_size=batch_size)
    return run_stage(stage, pool, store, pick_device(device))
