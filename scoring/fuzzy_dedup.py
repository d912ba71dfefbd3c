"""Fuzzy dedup (MinHash + LSH, DataTrove's parameters): keep one row of each near-duplicate cluster.

    thresher select POOL --method fuzzy-dedup --budget 100% [--param keep=longest]
    thresher select POOL --method fuzzy-dedup --annotate-only --out clusters.parquet

1. Signatures (`MinHashSignatures`, per shard, cached): the row's key (text; a chat row's user
   and assistant turns), DataTrove's simplify_text, word 5-grams (`n_gram`), xxh64, `bands x
   rows` permutations seeded as DataTrove's (`seed`).
2. Clusters (`MinHashClusters`): rows whose keys agree on a whole band are candidates; a pair is
   kept when its estimated Jaccard is at least `threshold` (0.7: against chains of unrelated
   rows through one shared band); union-find. Rows under `n_gram` tokens are grouped by their
   exact normalised text; rows with no words left are never duplicates.
3. The keep rule (`keep`): `first` (pool order), `longest` (most characters, then first), or the
   name of a numeric field of the rows (a top-level key of the input records, e.g. a quality
   score): its highest value, then first (a missing or non-numeric value counts as lowest).
   Clusters span the whole pool; when the cut chooses among some rows only (a recipe's
   `from:`, e.g. the rows that passed the quality rules), each cluster keeps its best row among
   those, so a duplicate survives when the row it copies was filtered out before.

Score columns: dup_cluster_id, dup_cluster_size, dup_check, dup_kept (the id kept of the row's
cluster), keep and reason ("near-duplicate of <id> (cluster of N, keep=<rule>)"). The cut keeps
the rows with keep = true (the `keep` selector); the manifest notes the clusters, the pairs kept
and rejected by the check, and the rows removed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl
from thresher.pipeline.method import Inputs, Method, Request
from thresher.pipeline.stage import Stage
from thresher.pipeline.stages.lsh import MinHashClusters
from thresher.pipeline.stages.minhash import MinHashSignatures, check_shape
from thresher.selectors.keep_flag import KeepFlag


@dataclass(frozen=True)
class FuzzyDedupParams:
    bands: int = field(default=14, metadata={"help": "LSH bands (b)"})
    rows: int = field(default=8, metadata={"help": "hashes per band (r); P(s) = 1-(1-s^r)^b"})
    n_gram: int = field(default=5, metadata={"help": "words per shingle"})
    threshold: float = field(default=0.7, metadata={
        "help": "keep a candidate pair when its estimated Jaccard is at least this"})
    keep: str = field(default="first", metadata={
        "help": "first | longest | NAME: the highest value of the rows' numeric field NAME"})
    seed: int = field(default=1, metadata={"help": "permutation seed (DataTrove's is 1)"})
    cjk_chars: bool = field(default=True, metadata={
        "help": "character tokens for Chinese/Japanese text (over 30% Han or kana)"})

    def __post_init__(self):
        check_shape(self.n_gram, self.bands, self.rows)
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if not self.keep:
            raise ValueError("keep must be first, longest or the name of a numeric field")


def keep_values(keep: str, inputs: Inputs) -> np.ndarray:
    """What the keep rule ranks by, per candidate row (highest wins; ties: first)."""
    if keep == "first":
        return np.zeros(inputs.candidates.height)
    if keep == "longest":
        return inputs.candidates["n_chars"].to_numpy().astype(np.float64)
    field_values = inputs.pool.meta_field(keep)
    if field_values.is_null().all():
        raise ValueError(f"keep={keep!r}: no row has a field {keep!r} (expected first, longest "
                         "or the name of a numeric field of the input rows)")
    values = field_values.cast(pl.Float64, strict=False).fill_nan(None)
    return values.fill_null(-np.inf).to_numpy()


def kept_rows(cluster_root: np.ndarray, value: np.ndarray, eligible: np.ndarray | None = None
              ) -> np.ndarray:
    """The row each cluster keeps: an eligible row first (when only some rows compete), then
    the highest value, then the lowest row (pool order)."""
    rows = np.arange(len(cluster_root))
    outside = np.zeros(len(rows), bool) if eligible is None else ~eligible
    order = np.lexsort((rows, -value, outside, cluster_root))     # by cluster, best first
    first_of = np.r_[True, cluster_root[order][1:] != cluster_root[order][:-1]]
    keeper = np.empty(len(rows), np.int64)
    best = order[first_of]
    keeper[cluster_root[best]] = best
    return keeper[cluster_root]


class FuzzyDedupMethod(Method):
    name = "fuzzy-dedup"
    summary = "MinHash + LSH fuzzy dedup (DataTrove's word 5-grams, 14x8 bands): one row per cluster"
    cost = "signatures O(N x words x b*r), then one sort of N keys per band"
    Params = FuzzyDedupParams
    score_column = "dup_cluster_size"

    def needs(self, p: FuzzyDedupParams, req: Request) -> dict[str, Stage]:
        sigs = MinHashSignatures(n_gram=p.n_gram, bands=p.bands, rows=p.rows, seed=p.seed,
                                 cjk_chars=p.cjk_chars)
        return {"clusters": MinHashClusters(signatures=sigs, threshold=p.threshold)}

    def score(self, p: FuzzyDedupParams, inputs: Inputs) -> pl.DataFrame:
        frame = inputs["clusters"].frame()
        ids = inputs.candidates["id"]
        if not frame["id"].equals(ids):
            raise RuntimeError("cluster annotations are not in pool order")
        root = pl.DataFrame({"c": frame["dup_cluster_id"]}).join(
            pl.DataFrame({"c": ids}).with_row_index("row"), on="c", how="left",
            maintain_order="left")["row"].to_numpy().astype(np.int64)
        eligible = None if inputs.among is None else \
            ids.is_in(pl.Series(inputs.among, dtype=pl.String).implode()).to_numpy()
        keeper = kept_rows(root, keep_values(p.keep, inputs), eligible)
        kept_id = ids.gather(keeper)
        keep = keeper == np.arange(len(keeper))
        reason = pl.format("near-duplicate of {} (cluster of {}, keep={})", pl.col("dup_kept"),
                           pl.col("dup_cluster_size"), pl.lit(p.keep))
        out = frame.with_columns(dup_kept=kept_id, keep=pl.Series(keep)).with_columns(
            reason=pl.when(pl.col("keep")).then(pl.lit(None, pl.String)).otherwise(reason))
        info = inputs["clusters"].dir.info()
        inputs.note("clusters", {k: info.get(k) for k in (
            "clusters", "rows_in_clusters", "rows_duplicate", "candidate_pairs", "pairs_kept",
            "pairs_rejected", "rows_exact_checked", "rows_no_words")})
        inputs.note("removed", int((~keep).sum()))
        return out

    def selector(self, p: FuzzyDedupParams, inputs: Inputs, scored: pl.DataFrame) -> KeepFlag:
        return KeepFlag(kept=f"first of its near-duplicate cluster by keep={p.keep}, or unique")
