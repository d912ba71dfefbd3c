"""k-means: thresher's `pipeline.cluster.kmeans` against scikit-learn's KMeans (and faiss) on the
same float16 embedding matrix, memory-mapped.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/kmeans.py \
        [--data bench/out/scale/1000000/embeddings.npy | --n 100000 --d 384] [--k 1000] \
        [--niter 20] [--faiss] [--threads N]

The matrix: the scale generator's synthetic embeddings (bench/scale_data.py: unit vectors,
topic + prompt directions + noise, planted copies), or `--n` rows drawn the same way here.
Runs, in this order: thresher, scikit-learn, thresher again (the median of the two thresher runs
brackets the long scikit-learn run, on a shared CPU), then with --faiss faiss.Kmeans with one
and with all threads. Every run gets the same k and at most `--niter` Lloyd iterations:
  thresher      greedy k-means++ seeding on 16 x k sampled rows, Lloyd on <= 256 x k sampled rows
                with bf16 GEMM scores, one Lloyd update over every row, then every row assigned
                (`kmeans(x, k, niter)`, reading the float16 memmap block by block);
  scikit-learn  KMeans(k, n_init=1, max_iter=niter) with its defaults (greedy k-means++ on every
                row, Lloyd, tol 1e-4) on the float32 copy of the same rows (conversion not timed);
  faiss         faiss.Kmeans(d, k, niter) (random-row init, trains on <= 256 x k sampled rows,
                float32 BLAS), then every row assigned with its index.
Inertia (sum of squared distances of every row to its centroid) is computed for each on every
row; the ratio printed is scikit-learn's time over thresher's median.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np


def synthetic(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Rows like bench/scale_data.py's: 16 topics x 20k prompt directions + noise, unit norm."""
    rng = np.random.default_rng(seed)
    topics, prompts = rng.normal(size=(16, d)), rng.normal(size=(20_000, d))
    t, p = rng.integers(0, 16, n), rng.integers(0, 20_000, n)
    x = np.empty((n, d), dtype=np.float16)
    for s in range(0, n, 65536):
        v = 2 * topics[t[s:s + 65536]] + 1.2 * prompts[p[s:s + 65536]] + rng.normal(size=(len(t[s:s + 65536]), d))
        x[s:s + 65536] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return x


def inertia(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray) -> float:
    return float(sum(((x[i:i + 65536].astype(np.float32) - centroids[labels[i:i + 65536]]) ** 2)
                     .astype(np.float64).sum() for i in range(0, len(x), 65536)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", help="float16 .npy matrix (memory-mapped)")
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--niter", type=int, default=20)
    ap.add_argument("--faiss", action="store_true", help="also run faiss.Kmeans (1 and all threads)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for thresher")
    ap.add_argument("--gpu", action="store_true", help="thresher's kmeans on the GPU (faiss-gpu)")
    args = ap.parse_args()

    import torch
    from sklearn.cluster import KMeans
    from thresher.pipeline.stages.cluster import kmeans

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.data:
        x = np.load(args.data, mmap_mode="r")
        src = args.data
    else:
        path = Path(__file__).resolve().parent / "out" / f"kmeans-{args.n}x{args.d}.npy"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, synthetic(args.n, args.d))
        x, src = np.load(path, mmap_mode="r"), str(path)
    n, d = x.shape
    print(f"matrix {n} x {d} float16 ({src}), k={args.k}, at most {args.niter} iterations; "
          f"{os.cpu_count()} CPUs ({platform.machine()}), torch threads {torch.get_num_threads()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, load average {os.getloadavg()}")
    res = {}

    def ours(tag):
        t = time.perf_counter()
        c, lab, _, _ = kmeans(x, args.k, niter=args.niter, seed=1234, gpu=args.gpu)
        res[tag] = (time.perf_counter() - t, inertia(x, c, lab))
        print(f"{tag}: {res[tag][0]:.1f} s, load average {os.getloadavg()}", flush=True)

    ours("thresher (1)")
    x32 = np.asarray(x, dtype=np.float32)
    t = time.perf_counter()
    km = KMeans(n_clusters=args.k, n_init=1, max_iter=args.niter, random_state=1234).fit(x32)
    res["scikit-learn"] = (time.perf_counter() - t, float(km.inertia_))
    print(f"scikit-learn ran {km.n_iter_} iterations: {res['scikit-learn'][0]:.1f} s, "
          f"load average {os.getloadavg()}", flush=True)
    del km, x32
    ours("thresher (2)")
    if args.faiss:
        import faiss

        for threads in (1, faiss.omp_get_max_threads()):
            faiss.omp_set_num_threads(threads)
            t = time.perf_counter()
            fk = faiss.Kmeans(d, args.k, niter=args.niter, seed=1234)
            fk.train(np.ascontiguousarray(x[np.sort(np.random.default_rng(0).choice(
                n, min(n, 256 * args.k), replace=False))], dtype=np.float32))
            lab = np.concatenate([fk.index.search(np.ascontiguousarray(
                x[s:s + 65536], dtype=np.float32), 1)[1][:, 0] for s in range(0, n, 65536)])
            res[f"faiss.Kmeans, {threads} thread(s)"] = (time.perf_counter() - t,
                                                          inertia(x, fk.centroids, lab))
    ours_t = float(np.median([res["thresher (1)"][0], res["thresher (2)"][0]]))
    ours_i = res["thresher (2)"][1]
    base_t, base_i = res["scikit-learn"]
    for name, (sec, inert) in res.items():
        print(f"{name:32s} {sec:8.1f} s  inertia {inert:12.1f} ({inert / base_i - 1:+.2%} vs "
              f"scikit-learn)  sklearn time / this: x{base_t / sec:.2f}")
    print(f"thresher kmeans vs scikit-learn: x{base_t / ours_t:.2f} faster (median of 2), "
          f"inertia {ours_i / base_i - 1:+.3%} (target >= 4x, within 1%)")
    print(json.dumps({"n": n, "d": d, "k": args.k, "niter": args.niter,
                      "seconds": {k: round(v[0], 2) for k, v in res.items()},
                      "inertia": {k: round(v[1], 1) for k, v in res.items()},
                      "speedup": round(base_t / ours_t, 2),
                      "inertia_rel": round(ours_i / base_i - 1, 5)}))


if __name__ == "__main__":
    main()
