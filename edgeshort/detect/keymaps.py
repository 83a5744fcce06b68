"""Clustering of pooled features, key heatmaps (nearest-clean or the seed's mean contrast) and KNN training keys."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from edgeshort._spacing import evenly_spaced
from edgeshort.detect.config import NEGATIVE_CHOICES
from edgeshort.errors import InputError


@dataclass
class Clustering:
    assignments: np.ndarray  # (N,) cluster id
    projection: np.ndarray  # (N, pca_components) PCA of the min-max normalised features
    distances: np.ndarray  # (N, k) distance of each sample to each centroid
    feature_min: float
    feature_max: float
    pca_components: np.ndarray
    pca_mean: np.ndarray
    centroids: np.ndarray


def canonical_order(digests: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """An order of the images that depends on them, not on where a listing put them: by the digest of each
    image's pixels as the model saw them (`input_digests`), then label. k-means seeds and the fit's random
    draws pick by index; taken in this order, the same images in another order give the same run (one
    listing's row order flipped a model's clusters between following the classes and not). Pixels, not
    features: those move by about 1e-6 with the thread count, which could reorder near-ties."""
    return np.lexsort((labels, digests))


def ranks(order: np.ndarray) -> np.ndarray:
    """Each image's place in `order`: `indices[np.argsort(ranks(order)[indices])]` puts any indices in that order."""
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank


def in_order(indices: np.ndarray, rank: np.ndarray | None) -> np.ndarray:
    return indices if rank is None else indices[np.argsort(rank[indices], kind="stable")]


def cluster_features(pooled: np.ndarray, n_clusters: int, n_components: int, seed: int,
                     order: np.ndarray | None = None) -> Clustering:
    """Min-max normalise (globally, as the seed), PCA, k-means; on the rows in `order` (`canonical_order`)
    when given, with every per-image result in the rows' own order."""
    if order is not None:
        found = cluster_features(pooled[order], n_clusters, n_components, seed)
        rank = ranks(order)
        return replace(found, assignments=found.assignments[rank], projection=found.projection[rank],
                       distances=found.distances[rank])
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    n, d = pooled.shape
    if n < n_clusters:
        raise InputError(
            f"expected at least n_clusters={n_clusters} samples, got {n}; add images or lower n_clusters"
        )
    lo, hi = float(pooled.min()), float(pooled.max())
    normalised = (pooled - lo) / (hi - lo if hi > lo else 1.0)
    components = min(n_components, n, d)
    pca = PCA(n_components=components, random_state=seed)
    projection = pca.fit_transform(normalised)
    kmeans = KMeans(n_clusters=n_clusters, random_state=seed, n_init=10)
    assignments = kmeans.fit_predict(projection)
    if len(np.unique(assignments)) < n_clusters:
        raise InputError(
            f"k-means found fewer than {n_clusters} distinct clusters in {n} samples; lower n_clusters"
        )
    return Clustering(
        assignments=assignments.astype(np.int64),
        projection=projection.astype(np.float32),
        distances=kmeans.transform(projection).astype(np.float32),
        feature_min=lo,
        feature_max=hi,
        pca_components=pca.components_.astype(np.float32),
        pca_mean=pca.mean_.astype(np.float32),
        centroids=kmeans.cluster_centers_.astype(np.float32),
    )


def class_centred(pooled: np.ndarray, labels: np.ndarray, order: np.ndarray | None = None) -> np.ndarray:
    """Pooled features minus their class's mean (summed in `order`, when given: a float32 mean moves with the
    order of its rows).

    When a model's strongest feature direction is the class, k-means on the pooled features splits
    the classes and the artefact never gets a cluster; without the class means, what the features
    vary with next (an artefact the model relies on) leads.
    """
    centred = pooled.astype(np.float32, copy=True)
    rows = np.arange(len(pooled)) if order is None else order
    for c in np.unique(labels):
        centred[labels == c] -= centred[rows[labels[rows] == c]].mean(0)
    return centred


def nearest_to_centroids(distances: np.ndarray, assignments: np.ndarray, count: int) -> list[np.ndarray]:
    """For each cluster, up to `count` of its own samples nearest its centroid."""
    out = []
    for c in range(distances.shape[1]):
        members = np.flatnonzero(assignments == c)
        out.append(members[np.argsort(distances[members, c], kind="stable")[:count]])
    return out


def mean_keys_outside(keys: np.ndarray, assignments: np.ndarray, cluster: int,
                      rank: np.ndarray | None = None) -> np.ndarray:
    """(N_patches, d) mean key at each position over the samples of every *other* cluster (summed in `rank`'s
    order of the images, when given)."""
    return keys[in_order(np.flatnonzero(assignments != cluster), rank)].mean(axis=0)


def key_distance_maps(keys: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(M, N_patches) Euclidean distance of each patch key to the reference key at the same position."""
    return np.linalg.norm(keys - reference[None], axis=-1)


# Enough clean keys to hold every kind of clean token; the nearest-neighbour search stays cheap.
NEAREST_POOL_SIZE = 20000


def nearest_clean_distance_maps(
    keys: np.ndarray, clean_keys: np.ndarray, k: int, seed: int
) -> np.ndarray:
    """(M, N_patches) mean distance of each patch key to its `k` nearest clean keys at any position.

    The seed measures a key against the clean *mean* key at the same position. Lesion tokens vary
    so much that they sit far from any mean, and when the artefact is faint or the model leans on
    it only partly they outrank the artefact's tokens. A lesion token has near neighbours among
    the clean images' lesion tokens, an artefact token has none, so this contrast singles out
    what the clean images never show.
    """
    return _nearest_clean_search(clean_keys, k, seed)(keys)


def _nearest_clean_search(clean_keys: np.ndarray, k: int, seed: int, pool_size: int | None = NEAREST_POOL_SIZE):
    """A function (M, N_patches, d) keys -> (M, N_patches) mean distance to the `k` nearest clean keys, searched
    among at most `pool_size` of them (None: all)."""
    from sklearn.neighbors import NearestNeighbors

    d = clean_keys.shape[-1]
    pool = clean_keys.reshape(-1, d)
    if pool_size is not None and len(pool) > pool_size:
        pool = pool[np.random.default_rng(seed).choice(len(pool), pool_size, replace=False)]
    search = NearestNeighbors(n_neighbors=min(k, len(pool))).fit(pool)

    def distances(keys: np.ndarray) -> np.ndarray:
        found, _ = search.kneighbors(keys.reshape(-1, d))
        return found.mean(1).reshape(keys.shape[:2]).astype(np.float32)

    return distances


@dataclass
class PositiveChoice:
    keys: np.ndarray  # (count, d) the KNN's positive keys
    threshold: float  # heat a clean token exceeds with probability 1 - quantile
    candidates: int  # shortcut-cluster tokens above the threshold
    null_tokens: int  # held-out clean tokens the threshold was estimated on


def calibrated_positives(
    keys: np.ndarray, assignments: np.ndarray, cluster: int, count: int, quantile: float, k: int, seed: int,
    rank: np.ndarray | None = None,
) -> PositiveChoice | None:
    """KNN positives drawn evenly from every shortcut-cluster token hotter than clean tokens ever are.

    The seed takes the `count` hottest tokens of the samples nearest the centre. When an artefact
    comes in variants (ISIC's patches in several colours) the most distinct fills all `count` and
    the others are never flagged. Here heat is each token's distance to its nearest keys in one half
    of the clean images; the other half gives heat's null distribution, whose `quantile` is the
    threshold. Every token of the cluster above it is a candidate, and `count` are taken evenly over
    the candidates' heat ranking, so each variant is represented by its share. None when fewer than
    two clean images exist. `rank` (`ranks(canonical_order(...))`) orders the images the draws pick from.
    """
    clean = in_order(np.flatnonzero(assignments != cluster), rank)
    if len(clean) < 2:
        return None
    rng = np.random.default_rng(seed)
    clean = clean[rng.permutation(len(clean))]
    pool, null_images = clean[::2], clean[1::2]
    # The quantile needs no more null tokens than the pool holds keys.
    null_images = null_images[: max(1, NEAREST_POOL_SIZE // keys.shape[1])]
    heat_of = _nearest_clean_search(keys[pool], k, seed)
    null_heat = heat_of(keys[null_images])
    threshold = float(np.quantile(null_heat, quantile))
    members = in_order(np.flatnonzero(assignments == cluster), rank)
    member_keys = keys[members]  # one copy of the cluster's keys, for the search and the choice
    heat = heat_of(member_keys).reshape(-1)
    member_keys = member_keys.reshape(-1, keys.shape[-1])
    above = np.flatnonzero(heat > threshold)
    count = min(count, len(heat))
    if len(above) >= count:  # evenly over the candidates' heat ranking: faint variants get their share
        ranked = above[np.argsort(heat[above], kind="stable")]
        chosen = evenly_spaced(ranked, count)
    else:  # too few: the hottest tokens fill the count, as the seed's rule would
        chosen = np.argsort(heat, kind="stable")[-count:]
    return PositiveChoice(member_keys[chosen], threshold, int(len(above)), int(null_heat.size))


def knn_training_keys(
    keys: np.ndarray,
    selected: list[np.ndarray],
    maps: list[np.ndarray],
    shortcut_cluster: int,
    count: int,
    negative_count: int | None = None,
    negatives: str = "spread",
    positives: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The KNN training set. Positives, as the seed: the `count` patch keys of the shortcut
    cluster's selected samples with the hottest heatmap. Negatives from the other clusters'
    selected samples: `closest` takes the coolest, as the seed; `spread` takes them evenly over
    the heatmap ranking, so lesion tokens are negatives too and the vote does not flag them for
    lying nearer the artefact keys than plain skin. `positives` replaces the hottest keys (see
    `calibrated_positives`)."""
    d = keys.shape[-1]
    if positives is None:
        hottest = np.argsort(maps[shortcut_cluster].reshape(-1), kind="stable")[-count:]
        positives = keys[selected[shortcut_cluster]].reshape(-1, d)[hottest]
    neg_keys = np.concatenate([keys[s].reshape(-1, d) for c, s in enumerate(selected) if c != shortcut_cluster])
    neg_dist = np.concatenate([m.reshape(-1) for c, m in enumerate(maps) if c != shortcut_cluster])
    negative_count = min(len(positives) if negative_count is None else negative_count, len(neg_dist))
    ranking = np.argsort(neg_dist, kind="stable")
    if negatives == "spread":
        chosen = evenly_spaced(ranking, negative_count)
    elif negatives == "closest":
        chosen = ranking[:negative_count]
    else:
        raise InputError(f"expected negatives in {NEGATIVE_CHOICES}, got {negatives!r}")
    x = np.concatenate([neg_keys[chosen], positives]).astype(np.float32)
    y = np.concatenate([np.zeros(negative_count), np.ones(len(positives))]).astype(np.int64)
    return x, y


class KeyKNN:
    """k-nearest-neighbour vote over reference keys (label 1 = shortcut patch).

    scikit-learn's KNeighborsClassifier does the offline work; the reference keys, labels and k
    are all it needs, so they are what the run folder and the bundle store (no pickles).
    """

    def __init__(self, reference: np.ndarray, labels: np.ndarray, k: int) -> None:
        from sklearn.neighbors import KNeighborsClassifier

        if k > len(reference):
            raise InputError(f"expected knn_k <= {len(reference)} reference keys, got {k}; lower knn_k")
        self.reference = np.asarray(reference, np.float32)
        self.labels = np.asarray(labels, np.int64)
        self.k = int(k)
        self.classifier = KNeighborsClassifier(n_neighbors=self.k).fit(self.reference, self.labels)
        self._clean_search = None

    def nearest_clean(self, keys: np.ndarray) -> np.ndarray:
        """(M, N_patches, d) keys -> (M, N_patches) distance to the nearest clean reference key, every negative
        searched (as the exported guard graph searches them); the search is built once, not per batch."""
        if self._clean_search is None:
            self._clean_search = _nearest_clean_search(self.reference[self.labels == 0], 1, 0, pool_size=None)
        return self._clean_search(keys)

    def flags(self, keys: np.ndarray) -> np.ndarray:
        """(B, N_patches, d) keys -> (B, N_patches) bool raw flags."""
        b, n, d = keys.shape
        return self.classifier.predict(keys.reshape(-1, d).astype(np.float32, copy=False)).reshape(b, n).astype(bool)


def saliency_distance_maps(keys: np.ndarray, contrast: str, knn: KeyKNN, clean_keys: np.ndarray) -> np.ndarray:
    """(M, N_patches) the guard's per-patch tint before scaling.

    "nearest": the distance to the nearest of the KNN's clean reference keys, the heatmaps' kind of
    contrast (a lesion token has near neighbours among clean lesion tokens, an artefact token has none),
    from keys the bundle already holds. Measured on the demo's test images, the hottest clean-image
    tokens reach 0.33 (patch) and 0.63 (ruler) of the median artefact token's tint, against 0.50 and
    1.24 with "mean": the distance to the clean mean key at the same position, which tints every lesion.
    """
    if contrast == "mean":
        return key_distance_maps(keys, clean_keys)
    return knn.nearest_clean(keys)


def describe_positives(candidates: int, positives: int | None, quantile: float, threshold: float) -> str:
    """How the calibrated KNN positives were drawn, in one sentence (run summary and report)."""
    hotter = f"hotter than {quantile:.1%} of held-out clean tokens (heat {threshold:.3f})"
    if positives is None or candidates >= positives:
        return f"The KNN's positives are spread over the {candidates:,} shortcut-cluster tokens {hotter}."
    if candidates == 0:
        return (f"No shortcut-cluster token is {hotter}: the {positives:,} KNN positives are the hottest tokens of the "
                "shortcut cluster's images.")
    return (f"Only {candidates:,} shortcut-cluster tokens are {hotter}, fewer than the {positives:,} KNN positives; "
            "the hottest tokens of the shortcut cluster's images fill the rest.")
