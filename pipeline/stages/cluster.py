"""Clustering stage: k-means over any float matrix, cached by the matrix and the settings.

    cl = cluster_matrix(store, emb.matrix(), k=100, fingerprint=emb.fingerprint, spherical=True)
    cl.labels      int64 (n,)    nearest centroid of each row
    cl.cos_dist    float32 (n,)  1 - cos(x, centroid)  (centroid renormalised, as NeMo Curator does)
    cl.l2_dist     float32 (n,)  ||x - centroid||
    cl.centroids   float32 (k, d)

Works on embeddings and on any other feature matrix (S2L's loss trajectories). The artifacts
(`labels.npy`, `cos_dist.npy`, `l2_dist.npy`, `centroids.npy`) live in
`store.dir("cluster", ...)` (`cluster_matrix`) or the `KMeans` stage's directory.

On a CPU, `kmeans` is torch: greedy k-means++ seeding on a sample, Lloyd on at most
`max_points_per_centroid * k` sampled rows with the distance GEMM in bf16 (on CPUs with native
bf16), one Lloyd update over every row, then every row assigned block by block (a float16
memory map is read in blocks, never whole, and its pages are released after each block:
`pipeline/io/memmap.py`). Why not faiss on a CPU: faiss.Kmeans and
scikit-learn both spend their time in the same float32 BLAS GEMM, so faiss was no faster than
scikit-learn here (and much slower with OpenMP's spinning threads on a shared CPU); bf16 GEMM
and sampled training are where the speed comes from (bench/RESULTS.md). With faiss-gpu and a GPU,
faiss.Kmeans trains on the GPU unless `gpu=False`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from thresher.pipeline.artifacts import ArtifactDir, ArtifactStore
from thresher.pipeline.io.memmap import copy_rows, gather
from thresher.pipeline.stage import Resources, Stage, StageRun

BLOCK = 65_536
ALGORITHM = "lloyd-bf16-refined+kmeans++"   # in the cache key: a new algorithm, a new key
FILES = ("labels", "cos_dist", "l2_dist", "centroids")


def matrix_fingerprint(x: np.ndarray) -> str:
    """A content hash of a matrix (shape, dtype, bytes), for matrices without a stage key."""
    h = hashlib.sha256(f"{x.shape}:{x.dtype}".encode())
    for start in range(0, x.shape[0], BLOCK):
        h.update(copy_rows(x, slice(start, start + BLOCK), x.dtype).tobytes())
    return "matrix:" + h.hexdigest()[:32]


def _gpus() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def _gemm_dtype():
    """bf16 on CPUs with native bf16 instructions (AVX512-BF16, AMX, Arm BF16), else float32."""
    import torch
    from thresher.pipeline.models.engine import _cpu_has_native_bf16

    return torch.bfloat16 if _cpu_has_native_bf16() else torch.float32


def _nearest(xb, c_low, c_sq):
    """(labels, min of ||c||^2 - 2 x.c) of rows xb [m, d] float32 to the centroids.

    x.c runs as one GEMM in c_low's dtype (bf16 on CPUs with native bf16, about 1.5-5x the fp32
    rate here), ||c||^2 stays float32. Measured on 60k x 384 embedding-like rows, k = 1000: 0.17%
    of the labels differ from a float32 argmin, all between near-equidistant centroids, and the
    inertia changes by 5e-6 (relative); scikit-learn's own float32 GEMM rounds too."""
    scores = c_sq - 2.0 * (xb.to(c_low.dtype) @ c_low.T).float()
    best, labels = scores.min(1)
    return labels, best


def _assign_torch(X, C, step: int = 4096):
    """Nearest centroid of every row of the float32 tensor X, and the inertia (approximate:
    from the low-precision scores)."""
    import torch

    c_low, c_sq = C.to(_gemm_dtype()), (C * C).sum(1)
    labels = torch.empty(X.shape[0], dtype=torch.long)
    obj = 0.0
    for s in range(0, X.shape[0], step):
        xb = X[s:s + step]
        labels[s:s + step], best = _nearest(xb, c_low, c_sq)
        obj += float((best + (xb * xb).sum(1)).double().sum())
    return labels, obj


def _kmeanspp(X, k: int, gen, sample: int):
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007; 2 + ln k candidates per step, the
    one that lowers the potential most is kept, as scikit-learn does) on `sample` seeded rows."""
    import math

    import torch

    if X.shape[0] > sample:
        X = X[torch.randperm(X.shape[0], generator=gen)[:sample]]
    x_sq = (X * X).sum(1)
    trials = 2 + int(math.log(k))
    C = torch.empty(k, X.shape[1])
    C[0] = X[torch.randint(X.shape[0], (1,), generator=gen)]
    best = ((X - C[0]) ** 2).sum(1)
    for j in range(1, k):
        total = float(best.sum())
        cand = torch.multinomial(best / total, trials, replacement=True, generator=gen) \
            if total > 0 else torch.randint(X.shape[0], (trials,), generator=gen)
        d2 = (x_sq[cand, None] + x_sq[None, :] - 2.0 * X[cand] @ X.T).clamp_min_(0)
        pot = torch.minimum(best[None, :], d2)
        pick = int(torch.argmin(pot.sum(1)))
        C[j], best = X[cand[pick]], pot[pick]
    return C


def _lloyd(train: np.ndarray, k: int, niter: int, seed: int, spherical: bool):
    """Lloyd iterations on the float32 rows `train`; (centroids, inertia of the last assignment).

    Stops early when no label changes. An empty cluster takes half of the largest one (its
    centroid nudged apart, as faiss does)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    X = torch.from_numpy(train)
    C = _kmeanspp(X, k, gen, sample=min(X.shape[0], 16 * k))
    if spherical:
        C = torch.nn.functional.normalize(C, dim=1)
    prev, obj = None, float("inf")
    for _ in range(niter):
        labels, obj = _assign_torch(X, C)
        if prev is not None and torch.equal(labels, prev):
            break
        prev = labels
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros(k, X.shape[1]).index_add_(0, labels, X)
        C = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], C)
        for j in torch.nonzero(counts == 0)[:, 0].tolist():
            big = int(torch.argmax(counts))
            C[j], C[big] = C[big] * (1 + 1 / 1024), C[big] * (1 - 1 / 1024)
            counts[j] = counts[big] // 2
            counts[big] -= counts[j]
        if spherical:
            C = torch.nn.functional.normalize(C, dim=1)
    return C.numpy(), obj


def _full_step(x: np.ndarray, C, spherical: bool):
    """One Lloyd update over every row of x, streamed BLOCK rows at a time."""
    import torch

    sums = torch.zeros_like(C)
    counts = torch.zeros(C.shape[0], dtype=torch.long)
    for start in range(0, x.shape[0], BLOCK):
        X = torch.from_numpy(copy_rows(x, slice(start, start + BLOCK)))
        labels = _assign_torch(X, C)[0]
        sums.index_add_(0, labels, X)
        counts += torch.bincount(labels, minlength=C.shape[0])
    C = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], C)
    return torch.nn.functional.normalize(C, dim=1) if spherical else C


def assign(x: np.ndarray, centroids: np.ndarray):
    """(labels, cos_dist, l2_dist) of every row of x (any float dtype, a memory map too) to the
    nearest centroid, BLOCK rows at a time; the distances are exact float32."""
    import torch

    n = x.shape[0]
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    C = torch.from_numpy(centroids)
    unit_c = _unit(centroids)
    labels = np.empty(n, dtype=np.int64)
    cos_dist = np.empty(n, dtype=np.float32)
    l2_dist = np.empty(n, dtype=np.float32)
    for start in range(0, n, BLOCK):
        block = copy_rows(x, slice(start, start + BLOCK))
        lab = _assign_torch(torch.from_numpy(block), C)[0].numpy()
        stop = start + len(block)
        labels[start:stop] = lab
        l2_dist[start:stop] = np.linalg.norm(block - centroids[lab], axis=1)
        cos_dist[start:stop] = 1.0 - np.sum(_unit(block) * unit_c[lab], axis=1)
    return labels, cos_dist, l2_dist


def kmeans(x: np.ndarray, k: int, niter: int = 20, seed: int = 1234, spherical: bool = False,
           gpu: bool | None = None, max_points_per_centroid: int = 256, nredo: int = 1,
           full_iters: int = 1):
    """k-means; returns (centroids, labels, cos_dist, l2_dist). Deterministic per seed.

    CPU (`_lloyd`): k-means++ seeding on a sample, Lloyd iterations on at most
    `max_points_per_centroid * k` sampled rows with bf16 GEMM scores, then `full_iters` Lloyd
    updates over every row (when the sample is smaller than x; they recover most of what the
    sampling loses), then every row assigned; x may be a float16 memory map, read block by block
    (memory beyond the sample stays O(block x k)). On a GPU (faiss-gpu), faiss.Kmeans. `nredo` > 1 keeps the best of that
    many seeded runs (lowest sample inertia)."""
    n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the number of rows ({n}), got {k}")
    use_gpu = _gpus() > 0 if gpu is None else (gpu and _gpus() > 0)
    train_n = min(n, max_points_per_centroid * k)
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(n, train_n, replace=False)) if train_n < n else None
    train = copy_rows(x, slice(0, n)) if idx is None else gather(x, idx)
    if use_gpu:
        import faiss

        km = faiss.Kmeans(d, k, niter=niter, seed=seed, spherical=spherical, gpu=True,
                          nredo=nredo, max_points_per_centroid=max_points_per_centroid)
        km.train(train)
        centroids = km.centroids.astype(np.float32)
    else:
        best = None
        for r in range(nredo):
            c, obj = _lloyd(train, k, niter, seed + r, spherical)
            if best is None or obj < best[1]:
                best = (c, obj)
        centroids = best[0]
        if train_n < n and full_iters:
            import torch

            C = torch.from_numpy(centroids)
            for _ in range(full_iters):
                C = _full_step(x, C, spherical)
            centroids = C.numpy()
    del train
    labels, cos_dist, l2_dist = assign(x, centroids)
    _fill_empty(x, centroids, labels, cos_dist, l2_dist)
    return centroids, labels, cos_dist, l2_dist


def _fill_empty(x, centroids, labels, cos_dist, l2_dist) -> None:
    """Every cluster non-empty, as faiss guarantees: an empty cluster takes the row of the largest
    cluster farthest from its centroid (that row becomes its centroid). Identical rows can leave
    a cluster empty after the final assignment (e.g. short loss trajectories)."""
    k = centroids.shape[0]
    for j in np.flatnonzero(np.bincount(labels, minlength=k) == 0):
        big = int(np.argmax(np.bincount(labels, minlength=k)))
        if np.sum(labels == big) < 2:
            break
        members = np.flatnonzero(labels == big)
        far = int(members[np.argmax(l2_dist[members])])
        row = np.asarray(x[far], dtype=np.float32)
        centroids[j] = row
        labels[far], l2_dist[far], cos_dist[far] = j, 0.0, 0.0


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
            "algorithm": ALGORITHM}


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
    """k-means over the matrix another stage made (`of`: Embed, trajectories, ...)."""

    kind: ClassVar[str] = "kmeans"
    per_shard: ClassVar[bool] = False
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


def embed_and_cluster(p, n_rows: int) -> dict[str, Stage]:
    """`emb` (sentence embeddings) and `km` (k-means over them) from a method's parameters
    (embedder, part, k, spherical, niter): what prototypes and semdedup both declare."""
    from thresher.pipeline.stages.embed import Embed

    emb = Embed(model=p.embedder, part=p.part)
    return {"emb": emb, "km": KMeans(of=emb, k=p.k or default_k(n_rows), spherical=p.spherical,
                                     niter=p.niter)}


def default_k(n: int, per_cluster: int = 100, cap: int = 1000) -> int:
    """Heuristic k for a pool of n rows: about `per_cluster` rows per cluster, at most `cap`."""
    return max(1, min(cap, n // per_cluster))
