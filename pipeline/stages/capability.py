"""PASER's capability clusters (S2RIC, methods-b.md §1) as a stage: the instructions' MiniLM
embeddings (the first user turn), a sparse kNN graph, spectral embedding and NMF
(`pipeline/stages/spectral.py`), cached like any stage.

    cl = pool_clusters(pool, store, k=None, algo="nmf")      # PoolClusters: labels [N], k
    cluster_table(pool, cl.labels, label="capability")        # per cluster: size, top label/source, AMI

The `paser` method needs `CapabilityClusters`; `thresher capability-clusters` prints the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import polars as pl
from thresher.pipeline.models.resolve import DEFAULT_EMBEDDER
from thresher.pipeline.stage import Resources, Stage
from thresher.pipeline.stages.embed import Embed

CLUSTER_VERSION = 1
EMBED_PART = "first_user"          # the instruction (PASER embeds the instruction field)
EMBED_MAX_SEQ = 128


@dataclass
class PoolClusters:
    dir: object
    labels: np.ndarray
    k: int
    info: dict

    @property
    def fingerprint(self) -> str:
        return f"capability_clusters:{self.dir.key}"


@dataclass(frozen=True)
class CapabilityClusters(Stage):
    """S2RIC over the matrix another stage made (`of`: the instructions' embeddings)."""

    kind: ClassVar[str] = "capability_clusters"
    per_shard: ClassVar[bool] = False
    of: Stage = None
    k: int | None = None
    algo: str = "nmf"
    neighbours: int = 15
    seed: int = 0
    version: int = CLUSTER_VERSION

    def __post_init__(self):
        from thresher.pipeline.stages.spectral import ALGOS

        if self.algo not in ALGOS:
            raise ValueError(f"unknown cluster algorithm {self.algo!r}; expected one of {', '.join(ALGOS)}")
        if self.k is not None and self.k < 2:
            raise ValueError(f"the number of capability clusters must be >= 2, got {self.k}")

    def deps(self) -> tuple[Stage, ...]:
        return (*super().deps(), self.of)

    def resources(self) -> Resources:
        return Resources(cpus=2, gpus=0, memory_gb=4)

    def describe(self) -> str:
        return (f"capability_clusters(k={self.k or 'auto'}, algo={self.algo}, "
                f"neighbours={self.neighbours}) of {self.of.kind}")

    def run_whole(self, run) -> dict:
        from thresher.pipeline.stages.spectral import capability_clusters

        x = np.asarray(run.deps[self.of].matrix(), dtype=np.float32)
        res = capability_clusters(x, k=self.k, algo=self.algo, neighbours=self.neighbours,
                                  seed=self.seed)
        run.dir.save_array("labels.npy", res.labels)
        return {"k": res.k, "algo": self.algo, "k_errors": res.k_errors, "graph_nnz": res.graph_nnz}

    def load(self, run) -> PoolClusters:
        info = run.dir.info()
        return PoolClusters(run.dir, np.load(run.dir.path("labels.npy")), int(info["k"]), info)

def pool_clusters(pool, store, k: int | None = None, algo: str = "nmf", neighbours: int = 15,
                  seed: int = 0, device: str | None = None,
                  embedder: str = DEFAULT_EMBEDDER) -> PoolClusters:
    """Capability clusters of the pool's instructions, run here (cached like any stage)."""
    from thresher.pipeline.models.resolve import pick_device
    from thresher.pipeline.plan import run_stage

    emb = Embed(model=embedder, part=EMBED_PART, max_seq_length=EMBED_MAX_SEQ)
    stage = CapabilityClusters(of=emb, k=k, algo=algo, neighbours=neighbours, seed=seed)
    return run_stage(stage, pool, store, pick_device(device))


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
