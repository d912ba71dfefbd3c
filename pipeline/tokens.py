"""Token counts per pool row (whole sequence and loss-bearing tokens), cached per tokenizer."""

from __future__ import annotations

import polars as pl
from thresher.pipeline.artifacts import ArtifactStore
from thresher.pipeline.chat import encode
from thresher.pipeline.models import ResolvedModel, load_tokenizer
from thresher.pipeline.pool import Pool

NO_LIMIT = 1 << 30


def token_counts(pool: Pool, store: ArtifactStore, model: ResolvedModel) -> pl.DataFrame:
    """DataFrame[id, n_tokens, n_loss_tokens] in pool order; computed once per pool + tokenizer."""
    stage = store.stage("tokens", [pool.fingerprint], {"tokenizer": model.identity})
    tok = None
    for shard, rows in pool.iter_shards(["id", "kind", "messages", "text"]):
        name = f"{shard}.parquet"
        if stage.has(name):
            continue
        tok = tok or load_tokenizer(model)
        encs = [encode(tok, r, NO_LIMIT) for r in rows]
        frame = pl.DataFrame({"id": [r["id"] for r in rows],
                              "n_tokens": [len(e.input_ids) for e in encs],
                              "n_loss_tokens": [int(e.loss_mask.sum()) for e in encs]})
        with stage.writing(name) as tmp:
            frame.write_parquet(tmp)
    stage.complete({"rows": pool.n_rows})
    return pl.concat([pl.read_parquet(stage.path(f"{s.stem}.parquet")) for s in pool.shards])
