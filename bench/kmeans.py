"""FAISS k-means (thresher.pipeline.cluster.kmeans) vs scikit-learn KMeans on the same matrix.

    .venv/bin/python bench/kmeans.py [--n 100000] [--d 384] [--k 100] [--niter 20]

The matrix is random but clustered (200 Gaussian blobs on the unit sphere plus noise, float32,
seeded). Both sides run the same k, the same number of Lloyd iterations, one initialisation
(random rows), and return an assignment of every row. Both libraries may stop before `niter`
(scikit-learn when no label changes; the iteration counts are printed), so the ratio is given
per total and per iteration. FAISS is run on every row with its default thread count and with
one thread (on a CPU shared with other jobs, OpenMP's spinning threads can be much slower than
one), plus the pipeline's `kmeans()`, which trains on at most 256 x k sampled rows as faiss
recommends. Inertia (sum of squared distances to the assigned centroid) shows the clusterings
are of the same quality.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np


def data(n: int, d: int, blobs: int = 200, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(blobs, d))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    x = centers[rng.integers(0, blobs, n)] + 0.05 * rng.normal(size=(n, d))
    return x.astype(np.float32)


def inertia(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray) -> float:
    return float(sum(((x[i:i + 10000] - centroids[labels[i:i + 10000]]) ** 2).sum()
                     for i in range(0, len(x), 10000)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--niter", type=int, default=20)
    args = ap.parse_args()

    import faiss
    from sklearn.cluster import KMeans
    from thresher.pipeline.cluster import kmeans

    x = data(args.n, args.d)
    print(f"matrix {args.n} x {args.d} float32, k={args.k}, at most {args.niter} iterations, "
          f"{os.cpu_count()} CPUs ({platform.machine()}); times include assigning every row")
    results = {}

    def faiss_full(threads: int):
        faiss.omp_set_num_threads(threads)
        t = time.perf_counter()
        km = faiss.Kmeans(args.d, args.k, niter=args.niter, seed=1234,
                          max_points_per_centroid=10**9)
        km.train(x)
        lab = km.index.search(x, 1)[1][:, 0]
        return time.perf_counter() - t, len(km.obj), inertia(x, km.centroids, lab)

    threads = faiss.omp_get_max_threads()
    results[f"faiss.Kmeans full data, {threads} threads"] = faiss_full(threads)
    results["faiss.Kmeans full data, 1 thread"] = faiss_full(1)
    faiss.omp_set_num_threads(threads)
    t = time.perf_counter()
    c, lab, _, _ = kmeans(x, args.k, niter=args.niter, seed=1234)
    results["thresher kmeans() (trains on <= 256*k rows)"] = (
        time.perf_counter() - t, args.niter, inertia(x, c, lab))

    t = time.perf_counter()
    km = KMeans(n_clusters=args.k, init="random", n_init=1, max_iter=args.niter, tol=0.0,
                algorithm="lloyd", random_state=1234).fit(x)
    base = time.perf_counter() - t
    results["scikit-learn KMeans (lloyd, tol=0)"] = (base, int(km.n_iter_), float(km.inertia_))

    b_it = base / results["scikit-learn KMeans (lloyd, tol=0)"][1]
    for name, (sec, iters, inert) in results.items():
        print(f"{name:46s} {sec:7.2f} s  {iters:3d} it  {sec / iters:6.3f} s/it  "
              f"inertia {inert:10.1f}  ratio sklearn/this: total x{base / sec:.2f}, "
              f"per iteration x{b_it / (sec / iters):.2f}")


if __name__ == "__main__":
    main()
