"""UMAP projection stage: 2-D coordinates of the pool's embeddings for the report's map.

    proj = project_umap(store, emb.matrix(), fingerprint=emb.fingerprint, max_points=5000)
    proj.rows      int64 (m,)     pool row indices that were projected (sorted)
    proj.coords    float32 (m, 2) their UMAP coordinates

UMAP (`umap-learn`, McInnes et al.) with the cosine metric over the L2-normalised embeddings.
Pools larger than `max_points` are subsampled uniformly with a seed before fitting, so the map
stays readable (an SVG scatter with hover text per point) and the fit stays in seconds; the
subsample does not depend on any selection, so one projection serves every selection of the
pool. Cached like every stage: `store.dir("umap", [embeddings fingerprint], config)` holds
`rows.npy` and `coords.npy`; the same embeddings and settings reuse them.

Cost: umap-learn compiles its numba kernels on the first fit in a process (tens of seconds on a
busy 2-core CPU, a few on an idle one); the fit itself is about a second per thousand points.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
from thresher.pipeline.artifacts import ArtifactDir, ArtifactStore

log = logging.getLogger(__name__)

MAX_POINTS = 5000


@dataclass
class Projection:
    dir: ArtifactDir

    @property
    def rows(self) -> np.ndarray:
        return np.load(self.dir.path("rows.npy"))

    @property
    def coords(self) -> np.ndarray:
        return np.load(self.dir.path("coords.npy"))

    @property
    def config(self) -> dict:
        return self.dir.info()


def sample_rows(n: int, max_points: int, seed: int) -> np.ndarray:
    """Sorted pool row indices to project: all rows, or a seeded uniform sample of max_points."""
    if max_points < 1:
        raise ValueError(f"max_points must be at least 1, got {max_points}")
    if n <= max_points:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False)).astype(np.int64)


def fit_umap(x: np.ndarray, n_neighbors: int, min_dist: float, seed: int) -> np.ndarray:
    """float32 (n, 2) UMAP coordinates (cosine metric); tiny inputs get a degenerate layout."""
    n = x.shape[0]
    if n < 4:   # UMAP needs a few neighbours; a line keeps 1-3 points visible
        return np.column_stack([np.arange(n), np.zeros(n)]).astype(np.float32)
    import umap

    reducer = umap.UMAP(n_components=2, n_neighbors=min(n_neighbors, n - 1), min_dist=min_dist,
                        metric="cosine", random_state=seed, n_jobs=1,
                        init="spectral" if n > n_neighbors + 1 else "random")
    with warnings.catch_warnings():
        # "n_jobs value 1 overridden to 1 by setting random_state": expected, we want determinism
        warnings.filterwarnings("ignore", message=".*n_jobs.*", category=UserWarning)
        return np.asarray(reducer.fit_transform(np.asarray(x, dtype=np.float32)), dtype=np.float32)


def project_umap(store: ArtifactStore, x: np.ndarray, fingerprint: str,
                 max_points: int = MAX_POINTS, n_neighbors: int = 15, min_dist: float = 0.1,
                 seed: int = 0) -> Projection:
    """The cached 2-D UMAP map of `x` (rows = pool rows), subsampled to `max_points`."""
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"cannot project a matrix of shape {x.shape}")
    config = {"algorithm": "umap-learn", "metric": "cosine", "max_points": max_points,
              "n_neighbors": n_neighbors, "min_dist": min_dist, "seed": seed}
    stage = store.dir("umap", [fingerprint], config)
    if not stage.done:
        rows = sample_rows(x.shape[0], max_points, seed)
        coords = fit_umap(x[rows], n_neighbors, min_dist, seed)
        for name, arr in (("rows", rows), ("coords", coords)):
            with stage.writing(f"{name}.npy") as tmp, open(tmp, "wb") as f:
                np.save(f, arr)
        stage.complete({"rows": int(x.shape[0]), "points": len(rows), **config})
        log.info("UMAP of %d of %d rows -> %s", len(rows), x.shape[0], stage.dir)
    return Projection(stage)
