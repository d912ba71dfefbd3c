"""Embedding stage: one float16 row per pool row, cached per shard, memory-mapped from disk.

    emb = embed_pool(pool, store)                 # all-MiniLM-L6-v2 over the whole conversation
    x = emb.matrix()                              # np.memmap float16 (n_rows, dim), pool row order
    emb.path                                      # .../embed/<key>/embeddings.npy

Layout of the stage directory (`store.stage("embed", [pool.fingerprint], config)`):

    part-00000.npy ...     float16 (rows of that shard, dim), written atomically per shard
    embeddings.npy         every shard concatenated once, in pool order (what `matrix()` maps)
    _COMPLETE.json         rows, dim, model identity

A killed run keeps its finished shards; the rerun embeds only the missing ones. Texts are sorted
by token length into batches (little padding); on a GPU the model runs in bf16 (fp16 where bf16
is not supported), on a CPU with native bf16 instructions (AVX512-BF16, AMX) in bf16 too. Vectors are L2-normalised in float32 before the cast to float16 (unless
`normalize=False`).

Scale-out hook: `embed_shard(stage, shard, embedder)` embeds one pool shard into the stage
directory, and `ShardEmbedder` holds the model (one per GPU). A Ray actor pool (one actor per
GPU, each with a `ShardEmbedder`, mapping `embed_shard` over `pool.shards`) or any other executor
can fill the stage; `embed_pool` then finds every shard done and only concatenates. Ray is not
required here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from thresher.pipeline.artifacts import ArtifactStore, Stage
from thresher.pipeline.models import (
    DEFAULT_EMBEDDER,
    ResolvedModel,
    pick_device,
    resolve,
)
from thresher.pipeline.pool import Pool
from thresher.pipeline.schema import row_text

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
        from thresher.pipeline.models import load_embedder

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
        from thresher.pipeline.engine import engine_dtype

        self.dtype = engine_dtype(self.device, dtype)
        if self.dtype != torch.float32:
            self.st.to(self.dtype)
        dim_of = getattr(self.st, "get_embedding_dimension", None) or \
            self.st.get_sentence_embedding_dimension   # renamed in sentence-transformers 6
        self.dim = dim_of()

    def __call__(self, rows: list[dict]) -> np.ndarray:
        return self.encode([row_text(r, self.part) for r in rows])

    def encode(self, texts: list[str]) -> np.ndarray:
        """float16 (len(texts), dim); batches hold texts of similar token length."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float16)
        tok = self.st.tokenizer
        lengths = [len(ids) for ids in tok(texts, add_special_tokens=False, truncation=True,
                                             max_length=self.st.max_seq_length)["input_ids"]]
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
    stage: Stage
    model: str          # identity
    part: str
    rows: int
    dim: int

    @property
    def path(self) -> Path:
        return self.stage.path(MATRIX)

    @property
    def fingerprint(self) -> str:
        """Identifies the matrix for downstream cache keys (the embed stage key)."""
        return f"embed:{self.stage.key}"

    def matrix(self) -> np.ndarray:
        """The float16 (rows, dim) matrix, memory-mapped read-only, aligned to pool row order."""
        return np.load(self.path, mmap_mode="r")


def embed_shard(stage: Stage, shard: Path, embedder: ShardEmbedder) -> int:
    """Embed one pool shard into `<stage>/<shard>.npy` (atomic); the unit of work and of resume.

    A multi-GPU executor calls this from one worker per GPU, each holding its own
    `ShardEmbedder` (e.g. a Ray actor pool over `pool.shards`); `embed_pool` then finds every
    shard done and only concatenates.
    """
    rows = pq.read_table(shard, columns=["kind", "messages", "text"]).to_pylist()
    vec = embedder(rows)
    with stage.writing(f"{shard.stem}.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, vec)
    return len(rows)


def embed_config(model: ResolvedModel, part: str, max_seq_length: int | None,
                 normalize: bool) -> dict:
    return {"model": model.identity, "part": part, "max_seq_length": max_seq_length,
            "normalize": normalize}


def embed_pool(pool: Pool, store: ArtifactStore, model: str | ResolvedModel = DEFAULT_EMBEDDER,
               part: str = "conversation", device: str | None = None, dtype: str | None = None,
               batch_size: int = 64, max_seq_length: int | None = None, normalize: bool = True,
               progress: Callable[[str, int], None] | None = None) -> Embeddings:
    """Embed every pool row (resuming from finished shards) and return the mapped matrix."""
    if part not in PARTS:
        raise ValueError(f"unknown text part {part!r}; expected one of {', '.join(PARTS)}")
    resolved = resolve(model) if isinstance(model, str) else model
    stage = store.stage("embed", [pool.fingerprint],
                        embed_config(resolved, part, max_seq_length, normalize))
    if stage.done and stage.has(MATRIX):
        info = stage.info()
        return Embeddings(stage, resolved.identity, part, info["rows"], info["dim"])

    embedder: ShardEmbedder | None = None   # loaded only if some shard is missing
    names = []
    for shard in pool.shards:
        names.append(f"{shard.stem}.npy")
        if stage.has(names[-1]):
            continue
        if embedder is None:
            embedder = ShardEmbedder(resolved, part, device, dtype, batch_size, max_seq_length,
                                     normalize)
        n = embed_shard(stage, shard, embedder)
        log.info("embedded %s (%d rows)", shard.name, n)
        if progress is not None:
            progress(shard.stem, n)

    n = sum(np.load(stage.path(name), mmap_mode="r").shape[0] for name in names)
    if n != pool.n_rows:
        raise ValueError(f"embedding shards hold {n} rows but the pool has {pool.n_rows}; "
                         f"remove {stage.dir} and rerun")
    n, dim = stage.concat_arrays(names, MATRIX)
    stage.complete({"rows": n, "dim": dim, "model": resolved.identity, "part": part})
    return Embeddings(stage, resolved.identity, part, n, dim)


def embed_for(ctx) -> Embeddings:
    """The embeddings a method asked for through its context: `--embedder`, `--param part=`,
    `--device`, `--param batch_size=`; records the embedder identity and the time taken."""
    model = resolve(ctx.option("embedder") or DEFAULT_EMBEDDER)
    ctx.models["embedder"] = model.identity
    with ctx.timed("embed"):
        return embed_pool(ctx.pool, ctx.store, model, part=ctx.option("part", "conversation"),
                          device=ctx.option("device"),
                          batch_size=int(ctx.option("batch_size", 64)))
