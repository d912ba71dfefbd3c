"""DEITA-style diversity filter: greedy in score order, skip rows too similar to those chosen.

    DiversityFilter(embeddings, threshold=0.9, score="quality").select(candidates, budget, seed)

Candidates carry `row`, the row index into `embeddings` (float, any scale: rows are
L2-normalised here). Rows are visited by `score` descending (ties by id), or in a seeded random
order when `score` is None. A row is rejected when its cosine similarity to any row already
chosen is > `threshold` (DEITA's `IterativeFilter`, tau = 0.9); the scan stops when the budget is
full (rows, or tokens: it stops at the first row that would overflow). Chosen rows live in a
FAISS inner-product index; rows are checked a chunk at a time (index search, then the few
in-chunk comparisons in order), which gives exactly the one-by-one result.
"""

from __future__ import annotations

import numpy as np
import polars as pl
from thresher.pipeline.budget import Budget


class DiversityFilter:
    def __init__(self, embeddings: np.ndarray, threshold: float = 0.9, score: str | None = None,
                 chunk: int = 256):
        if not -1 <= threshold <= 1:
            raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {threshold}")
        self.emb, self.threshold, self.score, self.chunk = embeddings, threshold, score, chunk

    def _order(self, candidates: pl.DataFrame, seed: int) -> pl.DataFrame:
        if self.score is None:
            base = candidates.sort("id")       # input order never matters
            return base[np.random.default_rng(seed).permutation(base.height)]
        if self.score not in candidates.columns:
            raise ValueError(f"candidates have no score column {self.score!r}")
        if candidates[self.score].null_count():
            raise ValueError(f"{candidates[self.score].null_count()} candidates have no {self.score} score")
        return candidates.sort([self.score, "id"], descending=[True, False])

    def select(self, candidates: pl.DataFrame, budget: Budget, seed: int = 0) -> pl.DataFrame:
        import faiss

        if "row" not in candidates.columns:
            raise ValueError("diversity filter needs a `row` column indexing the embeddings")
        ordered = self._order(candidates, seed)
        rows = ordered["row"].to_numpy()
        by_tokens = budget.kind == "tokens"
        if by_tokens:
            if "n_tokens" not in ordered.columns:
                raise ValueError("a token budget needs token counts (n_tokens) for the candidates")
            tokens = ordered["n_tokens"].to_numpy()
            room = float(budget.value)
        else:
            want = budget.rows(candidates)
        index = faiss.IndexFlatIP(self.emb.shape[1])
        chosen: list[int] = []          # positions in `ordered`
        sims: list[float] = []
        full = False
        for start in range(0, len(rows), self.chunk):
            pos = np.arange(start, min(len(rows), start + self.chunk))
            x = np.asarray(self.emb[rows[pos]], dtype=np.float32)
            x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
            prior = index.search(x, 1)[0][:, 0] if index.ntotal else np.full(len(pos), -np.inf)
            local = x @ x.T
            picked: list[int] = []
            for i in range(len(pos)):
                best = prior[i]
                if picked:
                    best = max(best, float(local[i, picked].max()))
                if best > self.threshold:
                    continue
                if by_tokens:
                    if tokens[pos[i]] > room:
                        full = True
                        break
                    room -= tokens[pos[i]]
                picked.append(i)
                chosen.append(int(pos[i]))
                sims.append(float(best))
                if not by_tokens and len(chosen) >= want:
                    full = True
                    break
            if picked:
                index.add(x[picked])
            if full:
                break
        order_txt = (f"{self.score} rank {{}}" if self.score else f"random order (seed {seed}) position {{}}")
        out = ordered[chosen].with_columns(
            max_sim=pl.Series(sims, dtype=pl.Float64).replace(-np.inf, None),
            _pos=pl.Series(chosen) + 1)
        return out.with_columns(reason=pl.format(
            order_txt + "; max cos sim to rows chosen before {} <= {}", "_pos",
            pl.col("max_sim").round(4).cast(pl.String).fill_null("(none)"),
            pl.lit(self.threshold))).drop("_pos")
