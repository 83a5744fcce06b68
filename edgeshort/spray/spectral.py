"""Affinity graphs, spectral embedding, eigengap selection and k-means for SpRAy.

Small sets get a dense affinity; above `dense_max_samples` a sparse k-nearest-neighbour graph
is built instead (memory O(N*k) rather than O(N^2)), so 50,000 maps fit in a few hundred MB.
The embedding always comes from a Lanczos solver (`scipy.sparse.linalg.eigsh`) on the
symmetrically normalised affinity, which only needs matrix-vector products.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import sparse
from scipy.linalg import eigh
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

logger = logging.getLogger(__name__)

Affinity = Literal["cosine", "rbf", "knn"]

# Above this many samples the dense N x N affinity is replaced by a kNN graph.
DENSE_MAX_SAMPLES = 3000
# kNN search on more dimensions than this first projects onto the leading singular vectors.
KNN_PROJECTION_DIMS = 64
_KNN_CHUNK = 1024
_PROJECTION_FIT_SAMPLES = 10_000
_TOP_K_SAMPLE = 1024


@dataclass(frozen=True)
class SpectralResult:
    labels: np.ndarray  # (N,) cluster id per sample, 0..k-1, ordered by decreasing size
    n_clusters: int
    eigenvalues: np.ndarray  # smallest eigenvalues of the normalised Laplacian, ascending
    graph: str  # "dense" or "knn"
    n_neighbors: int | None
    gamma: float | None


def default_n_neighbors(n_samples: int) -> int:
    """About 1.5 ln N, in [5, 15]: small enough that a group of a few percent keeps its
    neighbours inside itself, large enough that the graph stays connected."""
    return int(min(15, max(5, round(1.5 * math.log(max(n_samples, 2))))))


def _project(features: np.ndarray, dims: int, random_state: int) -> np.ndarray:
    """Projection on the leading right-singular vectors: keeps dot products (so cosine and
    Euclidean distances of unit vectors) up to the discarded spectrum, at a fraction of the cost.

    The basis is fitted on at most `_PROJECTION_FIT_SAMPLES` rows, single-threaded: its QR and
    SVD steps are small, and threads there cost far more than they save on a busy machine
    (measured 5.7 s instead of 0.25 s for 5,000 maps).
    """
    if features.shape[1] <= dims:
        return features
    from sklearn.utils.extmath import randomized_svd
    from threadpoolctl import threadpool_limits

    rows = features
    if len(features) > _PROJECTION_FIT_SAMPLES:
        chosen = np.random.default_rng(random_state).choice(len(features), _PROJECTION_FIT_SAMPLES, replace=False)
        rows = features[np.sort(chosen)]
    with threadpool_limits(limits=1):
        _, _, components = randomized_svd(rows, n_components=dims, n_iter=4, random_state=random_state)
    return features @ components.T.astype(np.float32)


def _top_k(block: np.ndarray, k: int, sample_columns: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Column indices and values of each row's k largest entries, largest first (exact).

    The O(N^2) kNN search spends much of its time here. Rather than an `argpartition` of
    whole rows, a lower bound of each row's k-th largest value comes from a column sample (the
    k-th largest of a subset can only be smaller), one comparison pass keeps the entries above
    it (about k x width / sample of them), and only those are sorted: 35% less CPU than
    `argpartition` on 400 x 20,000 heatmap similarities. Without a sample the bound is the
    exact k-th largest, from a value partition.
    """
    rows, width = block.shape
    if sample_columns is not None and len(sample_columns) > k:
        sample = block[:, sample_columns]
        bound = np.partition(sample, len(sample_columns) - k, axis=1)[:, len(sample_columns) - k]
    else:
        bound = np.partition(block, width - k, axis=1)[:, width - k]
    hit_rows, hit_cols = np.nonzero(block >= bound[:, None])
    values = block[hit_rows, hit_cols]
    order = np.lexsort((-values, hit_rows))
    hit_cols, values = hit_cols[order], values[order]
    starts = np.concatenate(([0], np.cumsum(np.bincount(hit_rows, minlength=rows))[:-1]))
    take = starts[:, None] + np.arange(k)[None, :]
    return hit_cols[take], values[take]


def knn_search(
    features: np.ndarray,
    n_neighbors: int,
    random_state: int = 0,
    project_above: int = DENSE_MAX_SAMPLES,
    projection_dims: int = KNN_PROJECTION_DIMS,
) -> tuple[np.ndarray, np.ndarray]:
    """Indices and dot products of each unit-norm row's `n_neighbors` nearest rows (self
    excluded), nearest first.

    Brute force in chunks: one matrix product per chunk, then a top-k. Above `project_above`
    samples the search runs on the rows projected on their `projection_dims` leading singular
    vectors (the N^2 products dominate there), keeps twice as many candidates, and re-ranks
    them by the exact dot product of the full rows, which are also the returned values.
    """
    n = features.shape[0]
    projected = n > project_above and features.shape[1] > projection_dims
    reduced = _project(features, projection_dims, random_state) if projected else features
    candidates = min(n - 1, 2 * n_neighbors) if projected else n_neighbors
    indices = np.empty((n, n_neighbors), dtype=np.int64)
    sims = np.empty((n, n_neighbors), dtype=np.float32)
    # Rows per chunk so a chunk's similarity block stays near 32 MB.
    chunk = int(min(_KNN_CHUNK, max(16, 8_000_000 // max(n, 1))))
    sample_columns = None
    if n > 8 * _TOP_K_SAMPLE:
        sample_columns = np.sort(np.random.default_rng(random_state).choice(n, _TOP_K_SAMPLE, replace=False))
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        block = reduced[start:stop] @ reduced.T
        block[np.arange(stop - start), np.arange(start, stop)] = -np.inf
        cols, values = _top_k(block, candidates, sample_columns)
        if projected:
            values = np.einsum("rd,rcd->rc", features[start:stop], features[cols])
            order = np.argsort(-values, axis=1, kind="stable")[:, :n_neighbors]
            cols, values = np.take_along_axis(cols, order, axis=1), np.take_along_axis(values, order, axis=1)
        indices[start:stop], sims[start:stop] = cols, values
    return indices, sims


def build_affinity(
    features: np.ndarray,
    affinity: Affinity,
    n_neighbors: int | None = None,
    gamma: float | None = None,
    dense_max_samples: int = DENSE_MAX_SAMPLES,
    random_state: int = 0,
) -> tuple[np.ndarray | sparse.csr_matrix, dict]:
    """Symmetric non-negative affinity of unit-norm rows, and a description of the graph.

    cosine: cosine similarity on the symmetric k-nearest-neighbour graph, at every N. Two
      non-negative heatmaps almost always overlap somewhat, so a dense cosine graph is nearly
      complete and cannot cut out a group of a few percent (on the 3% test set its second
      Laplacian eigenvalue is 0.74 and the group is not found; on the kNN graph it is ~0).
    rbf: exp(-|a-b|^2 / (s_a s_b)) with each sample's local scale s = distance to its 7th
      neighbour (self-tuning, Zelnik-Manor and Perona 2004), or exp(-gamma |a-b|^2) when
      `gamma` is given. Dense up to `dense_max_samples`, then on the kNN graph.
    knn: 0/1 symmetric k-nearest-neighbour connectivity (as in Lapuschkin et al. 2019).
    """
    n = features.shape[0]
    k = max(1, min(n_neighbors or default_n_neighbors(n), n - 1))
    scale_rank = min(7, n - 1)
    use_dense = affinity == "rbf" and n <= dense_max_samples
    info: dict = {"graph": "dense" if use_dense else "knn", "n_neighbors": None if use_dense else k, "gamma": gamma}

    if use_dense:
        sq_dist = features @ features.T
        np.clip(sq_dist, -1.0, 1.0, out=sq_dist)
        sq_dist = np.maximum(2.0 - 2.0 * sq_dist, 0.0).astype(np.float64)
        if gamma is None:
            scale = np.sqrt(np.partition(sq_dist, scale_rank, axis=1)[:, scale_rank])  # column 0 is self
            weights = np.exp(-sq_dist / np.maximum(np.outer(scale, scale), 1e-12))
        else:
            weights = np.exp(-gamma * sq_dist)
        np.fill_diagonal(weights, 0.0)
        return weights, info

    indices, sims = knn_search(features, max(k, scale_rank), random_state)
    if affinity == "knn":
        values = np.ones_like(sims[:, :k])
    elif affinity == "cosine":
        values = np.clip(sims[:, :k], 1e-6, 1.0)
    else:
        sq_dist = np.maximum(2.0 - 2.0 * sims, 0.0).astype(np.float64)
        if gamma is None:
            scale = np.sqrt(sq_dist[:, scale_rank - 1])
            values = np.exp(-sq_dist[:, :k] / np.maximum(scale[:, None] * scale[indices[:, :k]], 1e-12))
        else:
            values = np.exp(-gamma * sq_dist[:, :k])
        values = np.maximum(values, 1e-12)
    indices = indices[:, :k]
    rows = np.repeat(np.arange(n), k)
    graph = sparse.csr_matrix((values.ravel().astype(np.float64), (rows, indices.ravel())), shape=(n, n))
    return graph.maximum(graph.T).tocsr(), info


def spectral_embedding(
    weights: np.ndarray | sparse.spmatrix,
    n_components: int,
    random_state: int = 0,
    regularization: float = 1e-3,
) -> tuple[np.ndarray, np.ndarray]:
    """Smallest `n_components` eigenvalues (ascending) of the normalised Laplacian of the
    regularised graph W + (tau/N) 11^T, and their eigenvectors (N, n_components).

    tau = `regularization` x mean degree (regularised spectral clustering, Amini et al. 2013;
    Qin and Rohe 2013). It matters here because a shortcut group is often its *own connected
    component* of the kNN graph: the eigenvalue 0 is then repeated, and a Lanczos solver
    started from one vector returns a single vector of that eigenspace, so the group is lost
    (seen on the 3% test sets). The tiny uniform link lifts the group's eigenvalue to ~tau/degree,
    distinct from the trivial one, and also gives isolated samples a degree.
    """
    n = weights.shape[0]
    degree = np.asarray(weights.sum(axis=1), dtype=np.float64).ravel()
    tau = regularization * max(float(degree.mean()), 1e-12)
    inv_sqrt = 1.0 / np.sqrt(degree + tau)
    n_components = min(n_components, n)
    if n <= 200 or n_components >= n - 1:
        dense = weights.toarray() if sparse.issparse(weights) else np.asarray(weights, dtype=np.float64)
        scaled = (dense + tau / n) * inv_sqrt[:, None] * inv_sqrt[None, :]
        values, vectors = eigh(scaled, subset_by_index=[n - n_components, n - 1])
    else:
        matrix = weights.tocsr() if sparse.issparse(weights) else np.asarray(weights, dtype=np.float64)

        def matvec(block: np.ndarray) -> np.ndarray:
            scaled_in = inv_sqrt[:, None] * block.reshape(n, -1)
            out = matrix @ scaled_in + (tau / n) * scaled_in.sum(axis=0, keepdims=True)
            return (inv_sqrt[:, None] * out).reshape(block.shape)

        operator = LinearOperator((n, n), matvec=matvec, matmat=matvec, dtype=np.float64)
        start = np.random.default_rng(random_state).uniform(-1.0, 1.0, n)
        ncv = min(n, max(4 * n_components + 1, 40))
        from threadpoolctl import threadpool_limits

        # ARPACK's work is level-2 BLAS on N x ncv blocks plus a sparse product: threads only
        # add synchronisation (measured 8.7 s of 28 s at N=20,000 on a busy 2-core machine).
        with threadpool_limits(limits=1):
            try:
                values, vectors = eigsh(operator, k=n_components, which="LA", v0=start, tol=1e-7, ncv=ncv)
            except ArpackNoConvergence:
                logger.debug("eigsh did not converge at tol=1e-7; retrying with a looser tolerance")
                values, vectors = eigsh(
                    operator, k=n_components, which="LA", v0=start, tol=1e-4, ncv=ncv, maxiter=50 * n
                )
    order = np.argsort(-values)
    return np.clip(1.0 - values[order], 0.0, 2.0), vectors[:, order]


def eigengap_clusters(laplacian_values: np.ndarray, max_clusters: int, min_clusters: int = 2) -> int:
    """k in [min_clusters, max_clusters] after which the Laplacian spectrum jumps most."""
    usable = min(max_clusters, len(laplacian_values) - 1)
    if usable < min_clusters:
        return max(1, usable)
    gaps = np.diff(laplacian_values[: usable + 1])  # gaps[i] = mu_{i+2} - mu_{i+1}, i.e. after k=i+1
    candidates = np.arange(min_clusters, usable + 1)
    return int(candidates[np.argmax(gaps[candidates - 1])])


def kmeans_on_embedding(vectors: np.ndarray, n_clusters: int, random_state: int = 0) -> np.ndarray:
    """Ng-Jordan-Weiss: rows of the first k eigenvectors, normalised to unit length, k-means."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    embedding = vectors[:, :n_clusters]
    embedding = embedding / np.maximum(np.linalg.norm(embedding, axis=1, keepdims=True), 1e-12)
    if n_clusters == 1:
        return np.zeros(len(embedding), dtype=np.int64)
    # One thread: the embedding is tiny (N x k), and OpenMP workers on a busy machine spin
    # far longer than the work takes (measured 4 s instead of 0.05 s for N=600 under load).
    with threadpool_limits(limits=1, user_api="openmp"):
        labels = KMeans(n_clusters=n_clusters, n_init=10, random_state=random_state).fit_predict(embedding)
    # Renumber by decreasing size so cluster 0 is always the largest: stable, readable reports.
    sizes = np.bincount(labels, minlength=n_clusters)
    rank = np.empty(n_clusters, dtype=np.int64)
    rank[np.argsort(-sizes, kind="stable")] = np.arange(n_clusters)
    return rank[labels]


def spectral_clusters(
    features: np.ndarray,
    affinity: Affinity,
    n_clusters: int | None,
    max_clusters: int,
    n_neighbors: int | None = None,
    gamma: float | None = None,
    dense_max_samples: int = DENSE_MAX_SAMPLES,
    random_state: int = 0,
) -> SpectralResult:
    """Cluster unit-norm rows; `n_clusters=None` chooses k by the eigengap, never above `max_clusters`."""
    from threadpoolctl import threadpool_limits

    # Small problems run single-threaded: BLAS workers cost more than they save there, and far
    # more on a shared machine (measured 9 s instead of 0.1 s for N=600 under load).
    threads = 1 if features.shape[0] <= dense_max_samples else None
    with threadpool_limits(limits=threads):
        weights, info = build_affinity(features, affinity, n_neighbors, gamma, dense_max_samples, random_state)
        n_eig = max(max_clusters, n_clusters or 0) + 1
        values, vectors = spectral_embedding(weights, n_eig, random_state)
    k = n_clusters if n_clusters is not None else eigengap_clusters(values, max_clusters)
    labels = kmeans_on_embedding(vectors, k, random_state)
    return SpectralResult(
        labels=labels,
        n_clusters=int(k),
        eigenvalues=values,
        graph=info["graph"],
        n_neighbors=info["n_neighbors"],
        gamma=info["gamma"],
    )
