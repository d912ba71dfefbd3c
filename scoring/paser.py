"""PASER (He et al. 2025; methods-b.md §1): recovery data for a pruned model.

    thresher prune smollm2-135m-instruct --ratio 0.25 --out pruned/
    thresher select POOL --method paser --param pruned_model=pruned/ --budget 1000 --out paser.jsonl

Declared needs: Embed (the first user turn) -> CapabilityClusters (whole pool) and Jsd (per
shard, both models); `score` joins them into id, cluster, jsd, ies; PaserSelector makes the cut
(budgets, order, concept filter) and leaves the cluster table in the manifest's notes.

Three stages, as in the paper and its code:
  S2RIC  capability clusters of the instructions (`pipeline/stages/spectral.py`: MiniLM embeddings of the
         first user turn, sparse kNN graph, symmetric normalised Laplacian, spectral embedding,
         NMF; K by the reconstruction-error rule or `--param k=`, `--param cluster_algo=kmeans|umap`).
  CDAIS  per-sample degradation = Jensen-Shannon divergence between the original (`--param
         model`, else the source in the pruned directory's prune.json, else SmolLM2) and the
         pruned model over the response tokens (`pipeline/stages/jsd.py`, cached per shard); cluster degradation
         CDS_k = mean JSD of its rows; budget n_k proportional to CDS_k.
  NTEM   within each cluster rows in descending IES = JSD / log(cost), cost = n_tokens^2; a row is
         accepted unless two of its concepts were already accepted but never together (the
         Concept Consistency Graph); concepts = the top `max_concepts` key phrases (YAKE).

Deviations from the released code (also in docs/paser.md):
  - JSD over the response tokens of the chat-rendered row, not the bare instruction; per-token
    mean by default (`--param jsd_reduce=sum` is the code's sum, which grows with length);
  - cost = (tokens of the whole row)^2, not (instruction tokens + output characters)^2;
  - the budget's remainder is handed out by largest fractional part, clusters smaller than their
    share pass the surplus on, and a cluster whose candidates the concept filter exhausts hands
    its shortfall to the others (the code floors, drops the remainder and leaves budgets unfilled);
  - concepts: YAKE (maintained, ships its stopword lists; rake_nltk needs NLTK data downloads),
    lower-cased, capped at `max_concepts` (5) per row, extracted from the first `concept_chars`
    (2000) characters of the row's text, only for rows the filter visits;
  - clusters: sparse graph, not the dense kernel (see pipeline/stages/spectral.py).
Rows without a response token within max_tokens have no JSD; they are left out and counted.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import polars as pl
from thresher.pipeline.method import Inputs, Method, Request
from thresher.pipeline.models.engine import DEFAULT_MAX_TOKENS
from thresher.pipeline.models.resolve import DEFAULT_EMBEDDER, DEFAULT_LM
from thresher.pipeline.stage import Stage
from thresher.pipeline.stages.capability import (
    EMBED_MAX_SEQ,
    EMBED_PART,
    CapabilityClusters,
    cluster_table,
)
from thresher.pipeline.stages.embed import Embed
from thresher.pipeline.stages.jsd import Jsd

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- CDAIS: budgets and order

def allocate(weights: np.ndarray, capacity: np.ndarray, budget: int) -> np.ndarray:
    """Split `budget` over clusters in proportion to `weights`, at most `capacity` each.

    Largest-remainder rounding (so the parts add up to the budget), and whatever a full cluster
    cannot take is split again over the clusters with room, until the budget or the room runs out.
    Clusters of weight 0 get rows only when the others are full."""
    weights = np.maximum(np.asarray(weights, dtype=np.float64), 0.0)
    capacity = np.asarray(capacity, dtype=np.int64)
    alloc = np.zeros(len(weights), dtype=np.int64)
    remaining = min(int(budget), int(capacity.sum()))
    while remaining > 0:
        room = alloc < capacity
        w = np.where(room, weights, 0.0)
        if w.sum() <= 0:
            w = room.astype(np.float64)
        share = remaining * w / w.sum()
        base = np.floor(share).astype(np.int64)
        extra = remaining - int(base.sum())
        order = np.lexsort((np.arange(len(w)), -w, -(share - base)))   # biggest fraction first
        base[order[:extra]] += 1
        new = np.minimum(alloc + base, capacity)
        remaining -= int((new - alloc).sum())
        alloc = new
    return alloc


def efficiency(jsd: np.ndarray, n_tokens: np.ndarray) -> np.ndarray:
    """IES = JSD / log(cost), cost = n_tokens^2 (quadratic attention cost; at least 2 tokens)."""
    return jsd / np.log(np.maximum(n_tokens, 2).astype(np.float64) ** 2)


# ---------------------------------------------------------------- NTEM: concept consistency

class ConceptGraph:
    """PASER's Concept Consistency Graph: a row is consistent unless two of its concepts are
    already in the graph but never co-occurred in an accepted row."""

    def __init__(self):
        self.adj: dict[str, set[str]] = {}

    def consistent(self, concepts: set[str]) -> bool:
        seen = [c for c in concepts if c in self.adj]
        return all(b in self.adj[a] for a, b in itertools.combinations(seen, 2))

    def add(self, concepts: set[str]) -> None:
        for c in concepts:
            self.adj.setdefault(c, set())
        for a, b in itertools.combinations(concepts, 2):
            self.adj[a].add(b)
            self.adj[b].add(a)


class ConceptExtractor:
    """Top key phrases of a text by YAKE, lower-cased, at most `max_concepts`."""

    def __init__(self, max_concepts: int = 5, max_chars: int = 2000, ngram: int = 2):
        import yake

        self.kw = yake.KeywordExtractor(lan="en", n=ngram, top=max_concepts)
        self.max_chars = max_chars

    def __call__(self, text: str) -> set[str]:
        return {k.lower().strip() for k, _ in self.kw.extract_keywords(text[:self.max_chars]) if k.strip()}


def concept_filter(order: dict[int, list[int]], alloc: dict[int, int], weights: dict[int, float],
                   concepts_of, graph: ConceptGraph | None = None) -> tuple[dict[int, list[int]], int]:
    """Walk each cluster's rows in order (clusters by weight, highest first), accepting consistent
    rows until the cluster's allocation is met. A cluster that runs out hands its shortfall to
    the clusters with rows left (in proportion to weight); returns (accepted per cluster, rejected)."""
    graph = graph or ConceptGraph()
    accepted = {c: [] for c in order}
    pos = dict.fromkeys(order, 0)
    rejected = 0
    target = dict(alloc)
    clusters = sorted(order, key=lambda c: (-weights[c], c))
    while True:
        for c in clusters:
            rows = order[c]
            while len(accepted[c]) < target[c] and pos[c] < len(rows):
                r = rows[pos[c]]
                pos[c] += 1
                concepts = concepts_of(r)
                if graph.consistent(concepts):
                    graph.add(concepts)
                    accepted[c].append(r)
                else:
                    rejected += 1
        short = sum(target[c] - len(accepted[c]) for c in clusters)
        left = np.array([len(order[c]) - pos[c] for c in clusters])
        if short == 0 or left.sum() == 0:
            return accepted, rejected
        more = allocate(np.array([weights[c] for c in clusters]), left, short)
        for c, m in zip(clusters, more):
            target[c] = len(accepted[c]) + int(m)


# ---------------------------------------------------------------- the method

def original_model(pruned: str) -> str:
    """The source recorded in the pruned directory's prune.json, else SmolLM2."""
    from thresher.pipeline.training.prune import prune_info

    return ((prune_info(pruned) if pruned else None) or {}).get("source") or DEFAULT_LM


@dataclass(frozen=True)
class PaserParams:
    pruned_model: str = field(default="", metadata={
        "help": "the pruned model to recover (`thresher prune` output or any HF directory); required"})
    model: str = field(default="", metadata={
        "help": "the original model (default: the pruned dir's prune.json source, else SmolLM2)"})
    embedder: str = field(default=DEFAULT_EMBEDDER, metadata={"help": "sentence encoder of the instructions"})
    k: int | None = field(default=None, metadata={
        "help": "capability clusters (default: the reconstruction-error knee over 4..24)"})
    cluster_algo: Literal["nmf", "kmeans", "umap"] = field(default="nmf", metadata={
        "help": "nmf (the paper's), kmeans (on the spectral embedding) or umap (+ k-means)"})
    neighbours: int = field(default=15, metadata={"help": "kNN graph neighbours per row"})
    cluster_seed: int = field(default=0, metadata={"help": "seed of the eigensolver, NMF, k-means"})
    jsd_reduce: Literal["mean", "sum"] = field(default="mean", metadata={
        "help": "per-row JSD: mean over response tokens, or the released code's sum"})
    max_concepts: int = field(default=5, metadata={"help": "key phrases (concepts) per row"})
    concept_chars: int = field(default=2000, metadata={"help": "characters of a row read for concepts"})
    max_tokens: int = field(default=DEFAULT_MAX_TOKENS, metadata={"help": "truncate rows to this many tokens"})
    response_only: bool = field(default=True, metadata={"help": "JSD over the assistant turns only"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads for the JSD pass"})

    def __post_init__(self):
        if not self.model:    # also the tokenizer select counts tokens with
            object.__setattr__(self, "model", original_model(self.pruned_model))


class PaserMethod(Method):
    name = "paser"
    summary = ("PASER: recover a pruned model; capability clusters get budget by JSD degradation, "
               "rows by JSD/log(cost), concept-consistency filter")
    cost = ("embed O(N) + sparse kNN graph/eigsh/NMF O(N k K) + 2 LM forward passes per row "
            "(cached per shard) + concept filter O(sum C^2)")
    Params = PaserParams
    score_column = "ies"

    example: ClassVar[dict] = {"pruned_model": "PRUNED_MODEL_DIR"}

    def needs(self, p: PaserParams, req: Request) -> dict[str, Stage]:
        if not p.pruned_model:
            raise ValueError("--method paser needs --param pruned_model=DIR (make one with `thresher prune`)")
        emb = Embed(model=p.embedder, part=EMBED_PART, max_seq_length=EMBED_MAX_SEQ)
        return {"clusters": CapabilityClusters(of=emb, k=p.k, algo=p.cluster_algo,
                                               neighbours=p.neighbours, seed=p.cluster_seed),
                "jsd": Jsd(original=p.model, pruned=p.pruned_model,
                           max_tokens=p.max_tokens, response_only=p.response_only,
                           threads=p.threads)}

    def score(self, p: PaserParams, inputs: Inputs) -> pl.DataFrame:
        cl = inputs["clusters"]
        cands = inputs.candidates
        jsd = inputs["jsd"].scores().select("id", pl.col("n_tokens").alias("jsd_tokens"),
                                            pl.col(f"jsd_{p.jsd_reduce}").alias("jsd"))
        frame = (cands.select("id", "row")
                 .with_columns(pl.Series("cluster", cl.labels[cands["row"].to_numpy()]))
                 .join(jsd, on="id", how="left", maintain_order="left"))
        ok = pl.col("jsd").is_not_null() & pl.col("jsd").is_not_nan()
        inputs.note("unscored_rows", frame.height - frame.filter(ok).height)
        inputs.note("k_chosen", cl.k)
        inputs.note("k_errors", cl.info.get("k_errors"))
        inputs.note("original_model", p.model)
        frame = frame.filter(ok)
        if frame.height == 0:
            raise ValueError("no row has a response token to score; check --param max_tokens")
        return frame.with_columns(pl.Series("ies", efficiency(frame["jsd"].to_numpy(),
                                                              frame["jsd_tokens"].to_numpy()))) \
                    .select("id", "cluster", "jsd", "jsd_tokens", "ies")

    def selector(self, p: PaserParams, inputs: Inputs, scores: pl.DataFrame) -> PaserSelector:
        return PaserSelector(inputs.pool, inputs["clusters"].labels, p.max_concepts, p.concept_chars)


class PaserSelector:
    """CDAIS budgets + NTEM: allocation by cluster degradation, IES order, concept filter.

    Not a dataclass on purpose: it holds the pool (for concept texts and the cluster table), and
    the manifest records its `notes` (the cluster table, AMI, rejected rows)."""

    def __init__(self, pool, labels: np.ndarray, max_concepts: int = 5, concept_chars: int = 2000):
        self.pool, self.labels = pool, labels
        self.max_concepts, self.concept_chars = max_concepts, concept_chars
        self.notes: dict = {}

    def select(self, cand: pl.DataFrame, budget, seed: int) -> pl.DataFrame:
        stats = cand.group_by("cluster").agg(pl.len().alias("size"),
                                             pl.col("jsd").mean().alias("cds")).sort("cluster")
        clusters = stats["cluster"].to_list()
        cds = dict(zip(clusters, stats["cds"].to_list()))
        n = budget.rows(cand)
        alloc = allocate(stats["cds"].to_numpy(), stats["size"].to_numpy(), n)
        order = {c: part.sort(["ies", "id"], descending=[True, False])["row"].to_list()
                 for c, part in ((c, cand.filter(pl.col("cluster") == c)) for c in clusters)}
        extractor = ConceptExtractor(self.max_concepts, self.concept_chars)
        text = _row_texts(self.pool)
        accepted, rejected = concept_filter(order, dict(zip(clusters, alloc.tolist())), cds,
                                            lambda r: extractor(text(r)))
        picked = [(c, r) for c in sorted(clusters, key=lambda c: (-cds[c], c)) for r in accepted[c]]
        extra = {c: {"degradation": cds[c], "budget": int(a), "selected": len(accepted[c])}
                 for c, a in zip(clusters, alloc)}
        self._note(cand, extra, rejected, n - len(picked))
        index = {r["row"]: r for r in cand.select("row", "id", "jsd", "ies").to_dicts()}
        out = [{"id": index[r]["id"], "cluster": c, "jsd": index[r]["jsd"], "ies": index[r]["ies"],
                "reason": f"paser: cluster {c} (degradation {cds[c]:.4g}, budget "
                          f"{extra[c]['budget']}), IES {index[r]['ies']:.4g}, concept-consistent"}
               for c, r in picked]
        chosen = pl.DataFrame(out, schema={"id": pl.String, "cluster": pl.Int64, "jsd": pl.Float64,
                                           "ies": pl.Float64, "reason": pl.String})
        return budget.cut(chosen, cand) if budget.kind == "tokens" else chosen

    def _note(self, cand, extra: dict, rejected: int, unfilled: int) -> None:
        table = cluster_table(self.pool, self.labels, extra=extra)
        ami = f"{table['ami']:.3f}" if table["ami"] is not None else "n/a (no capability field)"
        self.notes.update({
            "clusters": table["rows"], "ami_capability": table["ami"],
            "concept_rejected_rows": rejected, "unfilled": unfilled,
            "report_lines": table["lines"] + [
                f"paser: {len(extra)} capability clusters, adjusted mutual information with "
                f"capability {ami}; concept filter rejected {rejected} rows"
                + (f"; {unfilled} of the budget unfilled (no consistent rows left)" if unfilled else "")]})


def _row_texts(pool):
    """row index -> the row's text for concept extraction (instruction, input and output)."""
    frame = pool.frame(["kind", "messages", "text"])

    def text(r: int) -> str:
        row = frame.row(int(r), named=True)
        if row["kind"] == "text" or row["messages"] is None:
            return row["text"] or ""
        return "\n".join(m["content"] for m in row["messages"])
    return text
