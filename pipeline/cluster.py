"""Clustering stage: FAISS k-means over any float matrix, cached by the matrix and the settings.

    cl = cluster_matrix(store, emb.matrix(), k=100, fingerprint=emb.fingerprint, spherical=True)
    cl.labels      int64 (n,)    nearest centroid of each row
    cl.cos_dist    float32 (n,)  1 - cos(x, centroid)  (centroid renormalised, as NeMo Curator does)
    cl.l2_dist     float32 (n,)  ||x - centroid||
    cl.centroids   float32 (k, d)

Works on embeddings and on any other feature matrix (S2L's loss trajectories). The artifacts
(`labels.npy`, `cos_dist.npy`, `l2_dist.npy`, `centroids.npy`) live in
`store.dir("cluster", ...)` (`cluster_matrix`) or the `KMeans` stage's directory. Training uses at most
`max_points_per_centroid * k` rows (a seeded sample, as faiss itself would take) and assignment
runs in blocks, so memory beyond the input stays O(block x k). faiss runs on the GPU when it has
one (faiss-gpu) unless `gpu=False`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from thresher.pipeline.artifacts import ArtifactDir, ArtifactStore
from thresher.pipeline.stage import Resources, Stage, StageRun

BLOCK = 65_536
FILES = ("labels", "cos_dist", "l2_dist", "centroids")


def matrix_fingerprint(x: np.ndarray) -> str:
    """A content hash of a matrix (shape, dtype, bytes), for matrices without a stage key."""
    h = hashlib.sha256(f"{x.shape}:{x.dtype}".encode())
    for start in range(0, x.shape[0], BLOCK):
        h.update(np.ascontiguousarray(x[start:start + BLOCK]).tobytes())
    return "matrix:" + h.hexdigest()[:32]


def _gpus() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def kmeans(x: np.ndarray, k: int, niter: int = 20, seed: int = 1234, spherical: bool = False,
           gpu: bool | None = None, max_points_per_centroid: int = 256, nredo: int = 1):
    """Run faiss k-means; returns (centroids, labels, cos_dist, l2_dist). Deterministic per seed.

    `nredo` > 1 keeps the best of that many runs (faiss initialises from random rows)."""
    import faiss

    n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the number of rows ({n}), got {k}")
    use_gpu = _gpus() > 0 if gpu is None else (gpu and _gpus() > 0)
    train_n = min(n, max_points_per_centroid * k)
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(n, train_n, replace=False)) if train_n < n else slice(None)
    train = np.ascontiguousarray(x[idx], dtype=np.float32)
    km = faiss.Kmeans(d, k, niter=niter, seed=seed, spherical=spherical, gpu=use_gpu, nredo=nredo,
                      max_points_per_centroid=max_points_per_centroid, verbose=False)
    km.train(train)
    centroids = km.centroids.astype(np.float32)
    unit_c = _unit(centroids)
    index = faiss.IndexFlatIP(d) if spherical else faiss.IndexFlatL2(d)
    index.add(centroids)
    labels = np.empty(n, dtype=np.int64)
    cos_dist = np.empty(n, dtype=np.float32)
    l2_dist = np.empty(n, dtype=np.float32)
    for start in range(0, n, BLOCK):
        block = np.ascontiguousarray(x[start:start + BLOCK], dtype=np.float32)
        _, lab = index.search(block, 1)
        lab = lab[:, 0]
        c = centroids[lab]
        labels[start:start + len(block)] = lab
        l2_dist[start:start + len(block)] = np.linalg.norm(block - c, axis=1)
        cos_dist[start:start + len(block)] = 1.0 - np.sum(_unit(block) * unit_c[lab], axis=1)
    return centroids, labels, cos_dist, l2_dist


@dataclass
class Clusters:
    dir: ArtifactDir
    k: int

    @property
    def fingerprint(self) -> str:
        return f"kmeans:{self.dir.key}"

    def _load(self, name: str) -> np.ndarray:
        return np.load(self.dir.path(f"{name}.npy"))

    @property
    def labels(self) -> np.ndarray:
        return self._load("labels")

    @property
    def cos_dist(self) -> np.ndarray:
        return self._load("cos_dist")

    @property
    def l2_dist(self) -> np.ndarray:
        return self._load("l2_dist")

    @property
    def centroids(self) -> np.ndarray:
        return self._load("centroids")

    def paths(self) -> dict[str, str]:
        return {name: str(self.dir.path(f"{name}.npy")) for name in FILES}


def _write(out: ArtifactDir, x: np.ndarray, k: int, niter: int, seed: int, spherical: bool,
           gpu: bool | None) -> dict:
    centroids, labels, cos_dist, l2_dist = kmeans(x, k, niter, seed, spherical, gpu)
    for name, arr in zip(FILES, (labels, cos_dist, l2_dist, centroids)):
        with out.writing(f"{name}.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, arr)
    return {"rows": int(x.shape[0]), "k": k, "sizes": np.bincount(labels, minlength=k).tolist()}


def _config(k: int, niter: int, seed: int, spherical: bool) -> dict:
    return {"k": k, "niter": niter, "seed": seed, "spherical": spherical,
            "algorithm": "faiss.Kmeans"}


def cluster_matrix(store: ArtifactStore, x: np.ndarray, k: int, fingerprint: str | None = None,
                   niter: int = 20, seed: int = 1234, spherical: bool = False,
                   gpu: bool | None = None) -> Clusters:
    """k-means over any matrix `x` (cached: the same matrix and settings reuse the assignment).
    Methods declare the `KMeans` stage instead; this is for matrices no stage made."""
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"cannot cluster a matrix of shape {x.shape}")
    out = store.dir("cluster", [fingerprint or matrix_fingerprint(x)],
                    _config(k, niter, seed, spherical))
    if not out.done:
        out.complete(_write(out, x, k, niter, seed, spherical, gpu))
    return Clusters(out, k)


@dataclass(frozen=True)
class KMeans(Stage):
    """FAISS k-means over the matrix another stage made (`of`: Embed, trajectories, ...)."""

    kind: ClassVar[str] = "kmeans"
    per_shard: ClassVar[bool] = False
    requires = (("faiss", "faiss-cpu>=1.8"),)
    of: Stage = None
    k: int = 100
    niter: int = 20
    seed: int = 1234
    spherical: bool = False

    def deps(self) -> tuple[Stage, ...]:
        return (*super().deps(), self.of)

    def resources(self) -> Resources:
        return Resources(cpus=2, gpus=0, memory_gb=4)

    def describe(self) -> str:
        return (f"kmeans(k={self.k}, niter={self.niter}, seed={self.seed}, "
                f"spherical={self.spherical}) of {self.of.kind}")

    def run_whole(self, run: StageRun) -> dict:
        x = run.deps[self.of].matrix()
        k = min(self.k, x.shape[0])
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"cannot cluster a matrix of shape {x.shape}")
        return _write(run.dir, x, k, self.niter, self.seed, self.spherical, None)

    def load(self, run: StageRun) -> Clusters:
        return Clusters(run.dir, int(run.dir.info()["k"]))


def default_k(n: int, per_cluster: int = 100, cap: int = 1000) -> int:
    """Heuristic k for a pool of n rows: about `per_cluster` rows per cluster, at most `cap`."""
    return max(1, min(cap, n // per_cluster))
