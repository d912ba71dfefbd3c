"""Capability clusters: a sparse kNN graph and Laplacian (O(N k), never N x N), clusters that
recover planted groups, K by the reconstruction-error rule."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.metrics import adjusted_mutual_info_score
from thresher.pipeline.stages import spectral


def blobs(n, k=6, d=32, noise=0.8, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d)) * 1.5
    y = rng.integers(0, k, n)
    return (centres[y] + noise * rng.standard_normal((n, d))).astype(np.float32), y


def test_graph_and_laplacian_are_sparse_symmetric_and_normalised():
    x, _ = blobs(600)
    a = spectral.knn_graph(x, k=10)
    assert sp.issparse(a) and a.shape == (600, 600)
    assert a.nnz <= 2 * 600 * 10 and (a != a.T).nnz == 0 and a.diagonal().sum() == 0
    assert (a.data > 0).all() and (a.data <= 1).all()
    lap = spectral.sym_laplacian(a)
    assert sp.issparse(lap) and lap.nnz <= a.nnz + 600
    deg = np.asarray(a.sum(1)).ravel()
    dense_ref = np.eye(600) - a.toarray() / np.sqrt(np.outer(deg, deg))    # small N only
    np.testing.assert_allclose(lap.toarray(), dense_ref, atol=1e-12)
    v = spectral.spectral_embedding(lap, 6)
    lam = np.einsum("ij,ij->j", v, lap @ v)                       # Rayleigh quotients
    assert v.shape == (600, 6) and (lam >= -1e-8).all() and (np.diff(lam) >= -1e-8).all()
    np.testing.assert_allclose(np.asarray(lap @ v), v * lam, atol=1e-4)   # eigenvectors


def test_nothing_grows_quadratically_with_the_pool():
    """Every N x N object is sparse with O(N k) entries, and peak Python-side memory grows about
    linearly: 4x the rows stays far below the 16x a dense N x N matrix would cost."""
    peaks, nnz = {}, {}
    for n in (1000, 4000):
        x, _ = blobs(n)
        tracemalloc.start()
        a = spectral.knn_graph(x, k=10)
        lap = spectral.sym_laplacian(a)
        v = spectral.spectral_embedding(lap, 6)
        s = spectral.edge_similarity(a, v)
        labels, _ = spectral.nmf_clusters(a, v, 6)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        for m in (a, lap, s):
            assert sp.issparse(m) and m.nnz <= n * (2 * 10 + 1)
        nnz[n] = s.nnz
        assert labels.shape == (n,)
    assert nnz[4000] <= 4.5 * nnz[1000]
    assert peaks[4000] < 8 * peaks[1000]


@pytest.mark.parametrize(("algo", "least"), [("nmf", 0.95), ("kmeans", 0.8)])
def test_planted_groups_are_recovered(algo, least):
    x, y = blobs(1500)
    res = spectral.capability_clusters(x, k=6, algo=algo, neighbours=10)
    assert res.k == 6 and res.labels.shape == (1500,)
    assert adjusted_mutual_info_score(y, res.labels) > least


@pytest.mark.slow            # umap-learn's numba compilation takes about a minute
def test_umap_option_recovers_planted_groups():
    x, y = blobs(400, k=4, noise=0.5)
    res = spectral.capability_clusters(x, k=4, algo="umap", neighbours=10)
    assert adjusted_mutual_info_score(y, res.labels) > 0.9


def test_k_by_the_reconstruction_error_rule():
    x, y = blobs(1500, k=8, noise=0.7, seed=1)
    res = spectral.capability_clusters(x, k=None, neighbours=10, k_grid=range(3, 17))
    assert abs(res.k - 8) <= 1                                    # the knee of a noisy curve
    assert sorted(res.k_errors) == list(range(3, 17))
    errs = [res.k_errors[k] for k in range(3, 17)]
    assert errs[0] > errs[5] > errs[-1]                           # falls, then flattens
    assert adjusted_mutual_info_score(y, res.labels) > 0.9


def test_knee_of_a_curve():
    assert spectral.knee([1, 2, 3, 4, 5], [1.0, 0.5, 0.1, 0.08, 0.05]) == 3
    with pytest.raises(ValueError, match="unknown cluster algorithm"):
        spectral.capability_clusters(blobs(50)[0], k=3, algo="dbscan")
    with pytest.raises(ValueError, match="number of clusters"):
        spectral.capability_clusters(blobs(50)[0], k=60)


def test_duplicate_rows_never_link_to_themselves():
    x, _ = blobs(200)
    x = np.vstack([x, x[:20]])                                     # exact duplicates
    a = spectral.knn_graph(x, k=5)
    assert a.diagonal().sum() == 0 and a[0, 200] > 0
