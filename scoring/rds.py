"""RDS+ (Ivison et al. 2025; methods-a.md §3): pick the pool rows whose representations are
closest to a target set's.

Representation (§3.2): the final-layer hidden state of a causal LM over the full example
(prompt and response, in the model's chat template), position-weighted mean over every token
(w_i = i / sum_j j), L2-normalised; computed for pool and targets by the same model in the
fused forward pass (`pipeline/stages/forward.py`), cached per shard. Similarity is cosine = dot.

Selection (§3.3, Alg. 1): one target file (task): round-robin over its examples, each taking
its best remaining pool row. Several `--target` files (tasks): a task scores a pool row by the
max over its examples, then round-robin over tasks. Duplicates consume the turn, as the RDS+
code does (`--param retry_duplicates=true` walks down to the best untaken row instead).

Scale: the pool vectors are never loaded whole: `pipeline/topk.BlockIndex` streams the
float16 matrix in blocks through FAISS's exact inner-product kernel and keeps a running top-k
per target example (the answers of an IndexFlatIP over all rows, in memory independent of the
pool size; on the CPU even with a GPU, whose indexes cap k at 2048 per search); each list is the
top-k of a batched search whose k doubles as rows get taken, so no |targets| x N similarity
matrix is ever built. For a task's max-aggregated list, an entry is final only when its score
beats every example's k-th score (rows outside all top-k lists cannot score higher).

Representations (`vectors`, issue 15): `hidden` is the paper's (above); `embed` uses the sentence
embedder's vectors of the whole conversation instead (the `Embed` stage, cached per shard; the
RDS+ paper's GTR-T5 / NV-Embed baselines are this kind); both are computed once per pool and
reused by every target set.

Diversity guard (`max_share`, issue 15; not in RDS+): no source gets more than that share of the
budget (`selectors/round_robin.py`); the manifest's `config.method.guard` reports the cap and the
rows each source got. `max_share=1` is the paper's selection. `guard_by=cluster` caps k-means
clusters of the pool's vectors instead (the same vectors the search uses; `guard_k` clusters,
default N/100 within [8, 1000]): the guard for a pool with one source, where a source cap
cannot bind.

Deviations: the paper renders examples in the Tulu chat format; here each model's own chat
template is used (`pipeline/chat.encode`), so pool and targets match whatever model is chosen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
from thresher.pipeline.method import Inputs, Method, Request
from thresher.pipeline.models.engine import DEFAULT_MAX_TOKENS
from thresher.pipeline.models.resolve import DEFAULT_EMBEDDER, DEFAULT_LM
from thresher.pipeline.params import Share
from thresher.pipeline.stage import Stage
from thresher.pipeline.stages.cluster import KMeans, default_k
from thresher.pipeline.stages.embed import Embed
from thresher.pipeline.stages.forward import Forward
from thresher.pipeline.stages.targets import TargetPool
from thresher.pipeline.stages.topk import BlockIndex, normalized_blocks
from thresher.selectors.round_robin import RoundRobin


class FaissRanking:
    """Lazily grown top-k lists of pool positions for a set of query vectors (one task)."""

    def __init__(self, index, queries: np.ndarray, k: int):
        import faiss

        self.index, self.queries = index, np.array(queries, dtype=np.float32, order="C")
        faiss.normalize_L2(self.queries)           # stored as float16: re-normalise
        self.k = 0
        self._search(min(index.ntotal, max(1, k)))

    def _search(self, k: int) -> None:
        self.k = k
        self.D, self.I = self.index.search(self.queries, k)

    def ranked(self, members: list[int], n: int) -> tuple[np.ndarray, np.ndarray]:
        """The first n positions by max score over the query rows `members`, best first."""
        while True:
            D, I = self.D[members], self.I[members]
            rows, scores = I.ravel(), D.ravel()
            valid = rows >= 0
            rows, scores = rows[valid], scores[valid]
            order = np.lexsort((-scores, rows))                  # per row, best score first
            rows, scores = rows[order], scores[order]
            first = np.ones(len(rows), dtype=bool)
            first[1:] = rows[1:] != rows[:-1]
            rows, scores = rows[first], scores[first]            # max over the members
            if self.k < self.index.ntotal:                       # only provably final entries
                final = scores > D[:, -1].max()
                rows, scores = rows[final], scores[final]
            order = np.lexsort((rows, -scores))
            if len(order) >= n or self.k >= self.index.ntotal:
                return rows[order[:n]].astype(np.int64), scores[order[:n]].astype(np.float64)
            self._search(min(self.index.ntotal, max(2 * self.k, n + 1)))


class _View:
    def __init__(self, ranking: FaissRanking, members: list[int]):
        self.ranking, self.members = ranking, members

    def head(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        return self.ranking.ranked(self.members, n)


def rds_lists(index, tasks: list[np.ndarray], names: list[str], n_budget: int):
    """Round-robin lists: one per target example (one task) or one per task (several)."""
    if len(tasks) == 1:
        q = tasks[0]
        ranking = FaissRanking(index, q, k=2 * -(-n_budget // len(q)) + 8)
        return [_View(ranking, [i]) for i in range(len(q))], [f"{names[0]}[{i}]" for i in range(len(q))], "target example"
    lists = []
    for q in tasks:
        ranking = FaissRanking(index, q, k=2 * -(-n_budget // len(tasks)) + 8)
        lists.append(_View(ranking, list(range(len(q)))))
    return lists, names, "task"


@dataclass(frozen=True)
class RdsParams:
    vectors: Literal["hidden", "embed"] = field(default="hidden", metadata={
        "help": "hidden: the LM's weighted-mean hidden states (RDS+); embed: sentence-embedder vectors"})
    model: str = field(default=DEFAULT_LM, metadata={"help": "causal LM whose hidden states represent rows"})
    embedder: str = field(default=DEFAULT_EMBEDDER, metadata={"help": "sentence embedder (vectors=embed)"})
    max_tokens: int = field(default=DEFAULT_MAX_TOKENS, metadata={"help": "truncate rows to this many tokens"})
    retry_duplicates: bool = field(default=False, metadata={
        "help": "a list whose best row is taken walks down instead of losing its turn"})
    max_share: Share = field(default=1.0, metadata={
        "help": "diversity guard: at most this share of the budget from one source (1 = off, as RDS+)"})
    guard_by: Literal["source", "cluster"] = field(default="source", metadata={
        "help": "what max_share caps: a pool source, or a k-means cluster of the pool's vectors"})
    guard_k: int | None = field(default=None, metadata={
        "help": "clusters for guard_by=cluster (default N/100, within [8, 1000])"})

    def __post_init__(self):
        if self.guard_k is not None and self.guard_k < 2:
            raise ValueError(f"guard_k must be at least 2, got {self.guard_k}")


class RdsMethod(Method):
    name = "rds"
    summary = "RDS+: round-robin over target examples (or tasks) by cosine of weighted-mean hidden states"
    cost = "one forward pass (vectors=hidden) or embedder pass (embed) over pool + targets (cached), FAISS top-k search"
    Params = RdsParams
    score_column = "rds_sim"
    needs_targets = True

    def needs(self, p: RdsParams, req: Request) -> dict[str, Stage]:

        def stage(over=None) -> Stage:
            if p.vectors == "embed":
                return Embed(model=p.embedder, part="conversation", over=over)
            return Forward(model=p.model, stats=False, rds=True, max_tokens=p.max_tokens,
                           over=over)

        need = {"pool_vectors": stage()}
        for i, t in enumerate(req.targets):
            need[f"target{i}"] = stage(TargetPool(path=str(t)))
        if p.guard_by == "cluster" and p.max_share < 1:
            k = p.guard_k or max(8, default_k(req.n_rows))
            need["guard_clusters"] = KMeans(of=need["pool_vectors"], k=min(k, max(1, req.n_rows)))
        return need

    def _tasks(self, inputs: Inputs) -> tuple[list[np.ndarray], list[str]]:
        tasks = [np.asarray(inputs[f"target{i}"].matrix(), dtype=np.float32)
                 for i in range(len(inputs.targets))]
        return tasks, [Path(t).stem for t in inputs.targets]

    def score(self, p: RdsParams, inputs: Inputs) -> pl.DataFrame:
        """Each row's best cosine to any target example, and that example's task."""
        import faiss

        tasks, names = self._tasks(inputs)
        inputs.note("target_rows", {n: len(q) for n, q in zip(names, tasks)})
        queries = np.concatenate(tasks)
        owner = np.concatenate([np.full(len(q), i) for i, q in enumerate(tasks)])
        faiss.normalize_L2(queries)
        index = faiss.IndexFlatIP(queries.shape[1])
        index.add(queries)
        rows = inputs.candidates["row"].to_numpy().astype(np.int64)
        sims, best = build_scores(index, inputs["pool_vectors"].matrix(), rows)
        return inputs.candidates.select("id").with_columns(
            rds_sim=pl.Series(sims, dtype=pl.Float64),
            best_task=pl.Series([names[owner[b]] for b in best], dtype=pl.String))

    def selector(self, p: RdsParams, inputs: Inputs, scored: pl.DataFrame) -> RoundRobin:
        tasks, names = self._tasks(inputs)
        index = BlockIndex(inputs["pool_vectors"].matrix(),
                            scored["row"].to_numpy().astype(np.int64))
        lists, list_names, what = rds_lists(index, tasks, names, 64)
        if "guard_clusters" in inputs.outputs:
            labels = inputs["guard_clusters"].labels[scored["row"].to_numpy()]
            groups = np.char.add("cluster ", labels.astype(str))
        else:
            groups = scored["source"].to_numpy()
        return RoundRobin(lists, list_names, retry_duplicates=p.retry_duplicates, what=what,
                          groups=groups, max_share=p.max_share, group_by=p.guard_by,
                          unbound_hint="; --param guard_by=cluster caps clusters instead")


def build_scores(index, vectors: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest target example (by inner product) of each pool row, in blocks."""
    sims = np.empty(len(rows), dtype=np.float32)
    best = np.empty(len(rows), dtype=np.int64)
    for s, block in normalized_blocks(vectors, rows, block=65536):   # 65536: as before, same floats
        D, I = index.search(block, 1)
        sims[s:s + len(block)], best[s:s + len(block)] = D[:, 0], I[:, 0]
    return sims, best
