"""PASER (He et al. 2025; methods-b.md §1): recovery data for a pruned model.

    thresher prune smollm2-135m-instruct --ratio 0.25 --out pruned/
    thresher select POOL --method paser --pruned-model pruned/ --budget 1000 --out paser.jsonl

Three stages, as in the paper and its code:
  S2RIC  capability clusters of the instructions (`pipeline/spectral.py`: MiniLM embeddings of the
         first user turn, sparse kNN graph, symmetric normalised Laplacian, spectral embedding,
         NMF; K by the reconstruction-error rule or `--param k=`; `--param cluster_algo=kmeans|umap`).
  CDAIS  per-sample degradation = Jensen-Shannon divergence between the original (`--model`, else
         the source recorded in the pruned directory's prune.json, else SmolLM2) and the pruned
         model over the response tokens (`pipeline/jsd.py`, cached per shard); cluster degradation
         CDS_k = mean JSD of its rows; budget n_k proportional to CDS_k.
  NTEM   within each cluster rows in descending IES = JSD / log(cost), cost = n_tokens^2; a row is
         accepted unless two of its concepts were already accepted but never together (the
         Concept Consistency Graph); concepts = the top `max_concepts` key phrases (YAKE).

Deviations from the released code (also in the README):
  - JSD over the response tokens of the chat-rendered row, not the bare instruction; per-token
    mean by default (`--param jsd_reduce=sum` is the code's sum, which grows with length);
  - cost = (tokens of the whole row)^2, not (instruction tokens + output characters)^2;
  - the budget's remainder is handed out by largest fractional part, clusters smaller than their
    share pass the surplus on, and a cluster whose candidates the concept filter exhausts hands
    its shortfall to the others (the code floors, drops the remainder and leaves budgets unfilled);
  - concepts: YAKE (maintained, ships its stopword lists; rake_nltk needs NLTK data downloads),
    lower-cased, capped at `max_concepts` (5) per row, extracted from the first `concept_chars`
    (2000) characters of the row's text, only for rows the filter visits;
  - clusters: sparse graph, not the dense kernel (see pipeline/spectral.py).
Rows without a response token within max_tokens have no JSD; they are left out and counted.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import numpy as np
import polars as pl
from thresher.pipeline.method import Context, Method

log = logging.getLogger(__name__)

CLUSTER_VERSION = 1
EMBED_PART = "first_user"          # the instruction (PASER embeds the instruction field)
EMBED_MAX_SEQ = 128


# ---------------------------------------------------------------- S2RIC: capability clusters

@dataclass
class PoolClusters:
    labels: np.ndarray
    k: int
    info: dict


def pool_clusters(pool, store, k: int | None = None, algo: str = "nmf", neighbours: int = 15,
                  seed: int = 0, device: str | None = None, embedder: str | None = None) -> PoolClusters:
    """Capability clusters of the pool's instructions, cached by the embeddings and the settings."""
    from thresher.pipeline.embed import embed_pool
    from thresher.pipeline.models import DEFAULT_EMBEDDER
    from thresher.pipeline.spectral import capability_clusters

    emb = embed_pool(pool, store, embedder or DEFAULT_EMBEDDER, part=EMBED_PART, device=device,
                     max_seq_length=EMBED_MAX_SEQ)
    stage = store.stage("capability_clusters", [emb.fingerprint],
                        {"k": k, "algo": algo, "neighbours": neighbours, "seed": seed,
                         "version": CLUSTER_VERSION})
    if not stage.done:
        res = capability_clusters(np.asarray(emb.matrix(), dtype=np.float32), k=k, algo=algo,
                                  neighbours=neighbours, seed=seed)
        with stage.writing("labels.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, res.labels)
        stage.complete({"k": res.k, "algo": algo, "k_errors": res.k_errors,
                        "graph_nnz": res.graph_nnz, "embedder": emb.model})
    info = stage.info()
    return PoolClusters(np.load(stage.path("labels.npy")), info["k"], info)


def _top(values: list, n: int = 1) -> str:
    counts = pl.Series(values).drop_nulls().value_counts(sort=True)
    if counts.height == 0:
        return "-"
    total = int(counts["count"].sum())
    return ", ".join(f"{v} {c / total:.0%}" for v, c in counts.head(n).iter_rows())


def cluster_table(pool, labels: np.ndarray, label: str = "capability", extra: dict | None = None) -> dict:
    """Per cluster: size, top label and source (+ any `extra` per-cluster columns); the AMI of
    the clusters with the original field `label` over the rows that have it (None if no row)."""
    from sklearn.metrics import adjusted_mutual_info_score

    frame = pool.frame(["source"]).with_columns(pool.meta_field(label).alias("label"),
                                                pl.Series("cluster", labels))
    has = frame.filter(pl.col("label").is_not_null())
    ami = (float(adjusted_mutual_info_score(has["label"].to_list(), has["cluster"].to_list()))
           if has.height else None)
    rows = []
    for c in sorted(set(labels.tolist())):
        part = frame.filter(pl.col("cluster") == c)
        row = {"cluster": c, "size": part.height, f"top_{label}": _top(part["label"].to_list(), 2),
               "top_source": _top(part["source"].to_list(), 2)}
        row.update((extra or {}).get(c, {}))
        rows.append(row)
    head = list(rows[0]) if rows else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v)
                                       for v in r.values()) + " |")
    return {"rows": rows, "ami": ami, "label": label, "lines": lines}


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

def _original_model(ctx: Context, pruned: str) -> str:
    from thresher.pipeline.models import DEFAULT_LM
    from thresher.pipeline.prune import prune_info

    given = ctx.options.get("model")
    info = prune_info(pruned) if not given else None
    return ctx.option("model", given or (info or {}).get("source") or DEFAULT_LM)


def _scores(ctx: Context, pruned: str, original: str) -> pl.DataFrame:
    from thresher.pipeline.engine import DEFAULT_MAX_TOKENS
    from thresher.pipeline.forward import parse_flag
    from thresher.pipeline.jsd import jsd_signals
    from thresher.pipeline.models import resolve

    o, p = resolve(original), resolve(pruned)
    ctx.models.update({"original": o.identity, "pruned": p.identity})
    with ctx.timed("jsd"):
        res = jsd_signals(ctx.pool, ctx.store, o, p,
                          max_tokens=int(ctx.option("max_tokens", DEFAULT_MAX_TOKENS)),
                          token_budget=ctx.option("token_budget"),
                          response_only=parse_flag(ctx.option("response_only", True)),
                          device=ctx.option("device"), dtype=ctx.option("dtype", "auto"),
                          threads=ctx.option("threads"))
    return res.scores()


class PaserMethod(Method):
    name = "paser"
    needs = ("a pruned causal LM (--pruned-model) and its original (--model), an embedding model; "
             "the pool's instructions")
    cost = ("embed O(N) + sparse kNN graph/eigsh/NMF O(N k K) + 2 LM forward passes per row "
            "(cached per shard) + concept filter O(sum C^2)")
    summary = ("PASER: recover a pruned model; capability clusters get budget by JSD degradation, "
               "rows by JSD/log(cost), concept-consistency filter")

    def select(self, ctx: Context) -> pl.DataFrame:
        pruned = ctx.option("pruned_model")
        if not pruned:
            raise ValueError("--method paser needs --pruned-model DIR (make one with `thresher prune`)")
        original = _original_model(ctx, str(pruned))
        k = ctx.option("k")
        with ctx.timed("clusters"):
            cl = pool_clusters(ctx.pool, ctx.store, k=int(k) if k else None,
                               algo=ctx.option("cluster_algo", "nmf"),
                               neighbours=int(ctx.option("neighbours", 15)),
                               seed=int(ctx.option("cluster_seed", 0)), device=ctx.option("device"),
                               embedder=ctx.option("embedder"))
        ctx.config["k_chosen"], ctx.config["k_errors"] = cl.k, cl.info.get("k_errors")
        scores = _scores(ctx, str(pruned), original)
        reduce = ctx.option("jsd_reduce", "mean")
        if reduce not in ("mean", "sum"):
            raise ValueError(f"--param jsd_reduce={reduce!r}: expected mean or sum")
        cand = (ctx.candidates.with_columns(pl.Series("cluster", cl.labels[ctx.candidates["row"].to_numpy()]))
                .join(scores.select("id", pl.col("n_tokens").alias("jsd_tokens"),
                                    pl.col(f"jsd_{reduce}").alias("jsd")),
                      on="id", how="left", maintain_order="left"))
        ok = pl.col("jsd").is_not_null() & pl.col("jsd").is_not_nan()
        ctx.config["unscored_rows"] = cand.height - cand.filter(ok).height
        cand = cand.filter(ok)
        if cand.height == 0:
            raise ValueError("no row has a response token to score; check --param max_tokens")
        return self._choose(ctx, cand, cl)

    def _choose(self, ctx: Context, cand: pl.DataFrame, cl: PoolClusters) -> pl.DataFrame:
        cand = cand.with_columns(pl.Series("ies", efficiency(cand["jsd"].to_numpy(),
                                                             cand["jsd_tokens"].to_numpy())))
        stats = cand.group_by("cluster").agg(pl.len().alias("size"), pl.col("jsd").mean().alias("cds")) \
                    .sort("cluster")
        clusters = stats["cluster"].to_list()
        budget = ctx.budget.rows(cand)
        alloc = allocate(stats["cds"].to_numpy(), stats["size"].to_numpy(), budget)
        order = {c: part.sort(["ies", "id"], descending=[True, False])["row"].to_list()
                 for c, part in ((c, cand.filter(pl.col("cluster") == c)) for c in clusters)}
        extractor = ConceptExtractor(int(ctx.option("max_concepts", 5)),
                                     int(ctx.option("concept_chars", 2000)))
        text = _row_texts(ctx.pool)
        accepted, rejected = concept_filter(order, dict(zip(clusters, alloc.tolist())),
                                            dict(zip(clusters, stats["cds"].to_list())),
                                            lambda r: extractor(text(r)))
        ctx.config["concept_rejected_rows"] = rejected
        cds = dict(zip(clusters, stats["cds"].to_list()))
        picked = [(c, r) for c in sorted(clusters, key=lambda c: (-cds[c], c)) for r in accepted[c]]
        return self._report(ctx, cand, stats, alloc, accepted, picked, cl)

    def _report(self, ctx, cand, stats, alloc, accepted, picked, cl) -> pl.DataFrame:
        cds = dict(zip(stats["cluster"].to_list(), stats["cds"].to_list()))
        extra = {c: {"degradation": cds[c], "budget": int(a), "selected": len(accepted[c])}
                 for c, a in zip(stats["cluster"].to_list(), alloc)}
        table = cluster_table(ctx.pool, cl.labels, extra=extra)
        ctx.config["clusters"] = table["rows"]
        ctx.config["ami_capability"] = table["ami"]
        unfilled = ctx.budget.rows(cand) - len(picked)
        ctx.config["unfilled"] = unfilled
        ami = f"{table['ami']:.3f}" if table["ami"] is not None else "n/a (no capability field)"
        ctx.config["report_lines"] = table["lines"] + [
            f"paser: {cl.k} capability clusters, adjusted mutual information with capability {ami}; "
            f"concept filter rejected {ctx.config['concept_rejected_rows']} rows"
            + (f"; {unfilled} of the budget unfilled (no consistent rows left)" if unfilled else "")]
        by_row = cand.select("row", "id", "cluster", "jsd", "ies").to_dicts()
        index = {r["row"]: r for r in by_row}
        out = [{"id": index[r]["id"], "cluster": c, "jsd": index[r]["jsd"], "ies": index[r]["ies"],
                "reason": f"paser: cluster {c} (degradation {cds[c]:.4g}, budget "
                          f"{extra[c]['budget']}), IES {index[r]['ies']:.4g}, concept-consistent"}
               for c, r in picked]
        chosen = pl.DataFrame(out, schema={"id": pl.String, "cluster": pl.Int64, "jsd": pl.Float64,
                                           "ies": pl.Float64, "reason": pl.String})
        return ctx.budget.cut(chosen, ctx.candidates) if ctx.budget.kind == "tokens" else chosen


def _row_texts(pool):
    """row index -> the row's text for concept extraction (instruction, input and output)."""
    frame = pool.frame(["kind", "messages", "text"])

    def text(r: int) -> str:
        row = frame.row(int(r), named=True)
        if row["kind"] == "text" or row["messages"] is None:
            return row["text"] or ""
        return "\n".join(m["content"] for m in row["messages"])
    return text
