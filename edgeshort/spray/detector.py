"""`SpRAyDetector`: Spectral Relevance Analysis of explanation heatmaps (Lapuschkin et al., 2019)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
from sklearn.base import BaseEstimator

from edgeshort._version import __version__
from edgeshort.errors import InputError, NotFittedError
from edgeshort.spray import fit_warnings, preprocess
from edgeshort.spray.assess import CleverHansCriteria, assess_cluster
from edgeshort.spray.choices import AFFINITIES, CLUSTER_SELECTIONS, RISK_LEVELS, risk_rank
from edgeshort.spray.focus import centroid_scatter, sample_focus
from edgeshort.spray.spectral import DENSE_MAX_SAMPLES, SpectralResult, spectral_clusters

logger = logging.getLogger(__name__)

MIN_SAMPLES = 3
HeatmapGenerator = Callable[[Any], Any]


def _to_numpy(array: Any, name: str) -> np.ndarray:
    """numpy arrays pass through untouched (no copy); torch tensors and sequences are converted."""
    if isinstance(array, np.ndarray):
        return array
    if hasattr(array, "detach") and hasattr(array, "cpu"):
        return array.detach().cpu().numpy()
    try:
        return np.asarray(array)
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"expected {name} as an array, got {type(array).__name__}; do pass a numpy array or torch tensor"
        ) from exc


def _check_heatmaps(heatmaps: Any) -> np.ndarray:
    maps = _to_numpy(heatmaps, "heatmaps")
    if maps.ndim != 3:
        hint = " (squeeze the channel axis)" if maps.ndim == 4 and 1 in (maps.shape[1], maps.shape[-1]) else (
            " (flat patch grids: reshape them to (N, gh, gw); a detection result gives its key heatmaps so with "
            "result.key_heatmap_grids())" if maps.ndim == 2 else "")
        raise InputError(
            f"expected heatmaps of shape (N, H, W), got shape {tuple(maps.shape)}; do pass one 2-D map per "
            f"sample{hint}"
        )
    if not (np.issubdtype(maps.dtype, np.floating) or np.issubdtype(maps.dtype, np.integer)):
        raise InputError(f"expected numeric heatmaps, got dtype {maps.dtype}; do convert them to float32")
    n = maps.shape[0]
    if n < MIN_SAMPLES:
        raise InputError(f"expected at least {MIN_SAMPLES} heatmaps, got {n}; do pass more samples")
    if min(maps.shape[1:]) < 2:
        raise InputError(f"expected maps of at least 2x2 pixels, got {maps.shape[1:]}; do pass 2-D maps")
    if np.issubdtype(maps.dtype, np.floating):
        bad = np.zeros(n, dtype=bool)
        for start in range(0, n, 4096):  # chunked: no full-size boolean temporary
            chunk = maps[start : start + 4096]
            bad[start : start + 4096] = ~np.isfinite(chunk.reshape(len(chunk), -1)).all(axis=1)
        if bad.any():
            first = np.flatnonzero(bad)[:5].tolist()
            raise InputError(
                f"expected finite heatmaps, got NaN or inf in {int(bad.sum())} of {n} maps (first at {first}); "
                "do fix or drop those samples"
            )
    return maps


def _check_labels(labels: Any, n: int, name: str) -> np.ndarray | None:
    if labels is None:
        return None
    values = _to_numpy(labels, name)
    if values.ndim != 1 or values.shape[0] != n:
        raise InputError(
            f"expected {name} of shape ({n},), one per heatmap, got shape {tuple(values.shape)}; "
            f"do pass one {name[:-1]} per sample"
        )
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise InputError(f"expected finite {name}, got NaN or inf; do drop the unlabelled samples")
    if values.dtype.kind == "O":
        values = values.astype(str)
    return values


def _by_label(selected: np.ndarray, labels: np.ndarray | None, most: int = 5) -> str:
    """" (364 of 757 benign, 43 of 743 malignant)": where selected maps fall among the labels (of each label's
    maps), most first."""
    if labels is None:
        return ""
    kinds, totals = np.unique(labels, return_counts=True)
    hits = np.array([int((selected & (labels == kind)).sum()) for kind in kinds])
    order = [i for i in np.argsort(-hits, kind="stable") if hits[i]]
    named = (lambda kind: f"label {kind}") if labels.dtype.kind in "iub" else str  # "30 of 750 label 0", not "... 0"
    parts = [f"{hits[i]} of {totals[i]} {named(_plain(kinds[i]))}" for i in order[:most]]
    return f" ({', '.join(parts)}{', ...' if len(order) > most else ''})"


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _purity(values: np.ndarray | None, members: np.ndarray) -> tuple[float | None, Any, dict]:
    """Share of the majority value among members, the value, and the counts."""
    if values is None or not members.any():
        return None, None, {}
    kinds, counts = np.unique(values[members], return_counts=True)
    best = int(np.argmax(counts))
    count_map = {str(_plain(k)): int(c) for k, c in zip(kinds, counts)}
    return float(counts[best] / counts.sum()), _plain(kinds[best]), count_map


# How each setting is named in errors: as a Python argument, or (the CLI passes these) as its flag.
PARAMETER_NAMES = {"n_clusters": "n_clusters", "cluster_selection": "cluster_selection", "max_clusters": "max_clusters",
                   "downsample_size": "downsample_size"}


def check_cluster_settings(cluster_selection, n_clusters, max_clusters, downsample_size,
                           names: dict[str, str] = PARAMETER_NAMES) -> None:
    """The rules on SpRAy's cluster settings, in one place; `names` words them for the caller."""
    n, selection = names["n_clusters"], names["cluster_selection"]
    if n_clusters is not None and (not isinstance(n_clusters, (int, np.integer)) or n_clusters < 2):
        # One cluster is the whole set: there is no minority group to flag.
        raise InputError(f"expected {n} to be an int >= 2 or None, got {n_clusters!r}; do pass e.g. 3")
    if cluster_selection == "fixed" and n_clusters is None:
        raise InputError(f"expected {n} with {selection} 'fixed', got none; do pass {n} or use {selection} 'auto'")
    if cluster_selection == "eigengap" and n_clusters is not None:
        raise InputError(f"expected no {n} with {selection} 'eigengap', got {n_clusters}; do drop {n} or use "
                         f"{selection} 'fixed' (or 'auto') to set the number yourself")
    if not isinstance(max_clusters, (int, np.integer)) or max_clusters < 2:
        raise InputError(f"expected {names['max_clusters']} to be an int >= 2, got {max_clusters!r}; do raise it")
    if downsample_size is not None and (not isinstance(downsample_size, (int, np.integer)) or downsample_size < 2):
        raise InputError(f"expected {names['downsample_size']} to be an int >= 2 or None, got {downsample_size!r}; "
                         "do use e.g. 32")


class SpRAyDetector(BaseEstimator):
    """Spectral Relevance Analysis: cluster explanation heatmaps to find Clever Hans behaviour.

    Parameters
    ----------
    affinity : "cosine" | "rbf" | "knn"
        Similarity between downsampled, unit-normalised heatmaps (see
        `edgeshort.spray.spectral.build_affinity`). cosine and knn always use a sparse
        k-nearest-neighbour graph; rbf is dense up to `dense_max_samples` samples.
    cluster_selection : "auto" | "eigengap" | "fixed"
        fixed: use `n_clusters`. eigengap: largest gap of the Laplacian spectrum, k in
        [2, max_clusters]. auto: `n_clusters` when given, else the eigengap.
    n_clusters : int or None
    max_clusters : int
        Upper bound of the eigengap choice (never exceeded).
    downsample_size : int or None
        Longer side of the processing resolution; maps are area-averaged down to it (never up).
    per_class : bool
        Cluster each class separately, as in Lapuschkin et al. (needs labels, or model targets).
    random_state : int
        Seeds the eigensolver start vector, the kNN projection and k-means.
    n_neighbors : int or None
        Neighbours of the kNN graph; default about 1.5 ln N in [5, 15].
    gamma : float or None
        Fixed RBF width; default: self-tuning local scales.
    dense_max_samples : int
        Above this many samples (per clustering run) rbf switches to the kNN graph.
    criteria : CleverHansCriteria or None
        Thresholds of the per-cluster Clever Hans assessment.
    heatmap_generator : callable or None
        `(inputs) -> (N, H, W)` used by `fit(inputs=...)` when no model is given.

    Attributes (after fit)
    ----------------------
    labels_ / cluster_labels_ : (N,) cluster of each sample
    n_clusters_ : total number of clusters
    clusters_ : per-cluster summaries (dicts, as in the report)
    clever_hans_ : the assessment (flags per cluster, risk level)
    risk_level_, shortcut_detected_
    representative_heatmaps_ : {cluster_id: (H, W) mean heatmap at input resolution}
    eigenvalues_ : {scope: smallest Laplacian eigenvalues}, scope "all" or the class
    sample_focus_ : per-sample focus statistics (see `edgeshort.spray.focus`)
    heatmaps_ : the heatmaps analysed (the array passed in, or the generated one)
    targets_ : the explained class per sample when heatmaps were generated from a model
    """

    def __init__(
        self,
        affinity: Literal["cosine", "rbf", "knn"] = "cosine",
        cluster_selection: Literal["auto", "eigengap", "fixed"] = "auto",
        n_clusters: int | None = None,
        max_clusters: int = 8,
        downsample_size: int | None = 32,
        per_class: bool = False,
        random_state: int = 0,
        n_neighbors: int | None = None,
        gamma: float | None = None,
        dense_max_samples: int = DENSE_MAX_SAMPLES,
        criteria: CleverHansCriteria | None = None,
        heatmap_generator: HeatmapGenerator | None = None,
    ) -> None:
        self.affinity = affinity
        self.cluster_selection = cluster_selection
        self.n_clusters = n_clusters
        self.max_clusters = max_clusters
        self.downsample_size = downsample_size
        self.per_class = per_class
        self.random_state = random_state
        self.n_neighbors = n_neighbors
        self.gamma = gamma
        self.dense_max_samples = dense_max_samples
        self.criteria = criteria
        self.heatmap_generator = heatmap_generator

    # ------------------------------------------------------------------ validation
    def _validate_params(self) -> None:
        if self.affinity not in AFFINITIES:
            raise InputError(f"expected affinity in {AFFINITIES}, got {self.affinity!r}; do pick one of them")
        if self.cluster_selection not in CLUSTER_SELECTIONS:
            raise InputError(
                f"expected cluster_selection in {CLUSTER_SELECTIONS}, got {self.cluster_selection!r}; do pick one"
            )
        check_cluster_settings(self.cluster_selection, self.n_clusters, self.max_clusters, self.downsample_size)
        if self.n_neighbors is not None and (not isinstance(self.n_neighbors, (int, np.integer)) or self.n_neighbors < 1):
            raise InputError(f"expected n_neighbors to be a positive int or None, got {self.n_neighbors!r}; do fix it")
        if self.gamma is not None and (not isinstance(self.gamma, (int, float, np.number)) or not self.gamma > 0):
            raise InputError(f"expected gamma > 0 or None, got {self.gamma!r}; do pass a positive width")

    def _check_fitted(self) -> None:
        if not hasattr(self, "labels_"):
            raise NotFittedError(
                "expected a fitted SpRAyDetector, got one whose fit() has not run; "
                "do call fit(heatmaps=...) or fit(inputs=..., model=..., target_layer=...) first"
            )

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        heatmaps: Any = None,
        labels: Any = None,
        *,
        group_labels: Any = None,
        inputs: Any = None,
        model: Any = None,
        target_layer: Any = None,
        head: Any = None,
        targets: Any = None,
        heatmap_generator: HeatmapGenerator | None = None,
        cam_method: str = "gradcam",
        batch_size: int = 32,
        num_prefix_tokens: int | None = None,
    ) -> SpRAyDetector:
        """Cluster heatmaps and assess every cluster for Clever Hans behaviour.

        Either `heatmaps` (N, H, W), or `inputs` (N, C, H, W) with `model` and `target_layer`
        (GradCAM via pytorch-grad-cam; `head` picks the logits from the model output,
        `targets` the explained class per sample, default the predicted one), or `inputs`
        with a `heatmap_generator` callable `(inputs) -> (N, H, W)`. `labels` (N,) are the
        true classes; they give cluster purity and sharpen the assessment. `group_labels`
        (N,) optionally give a group purity per cluster (e.g. a known artefact marker).
        """
        self._validate_params()
        with fit_warnings.recorded() as warned:
            self._fit(heatmaps, labels, group_labels, inputs, model, target_layer, head, targets, heatmap_generator,
                      cam_method, batch_size, num_prefix_tokens)
        self.warnings_ = warned
        return self

    def _fit(self, heatmaps, labels, group_labels, inputs, model, target_layer, head, targets, heatmap_generator,
             cam_method, batch_size, num_prefix_tokens) -> None:
        started = time.perf_counter()
        generated_targets = None
        if heatmaps is not None:
            if inputs is not None or model is not None:
                raise InputError(
                    "expected either heatmaps or inputs (+ model), got both; do pass only one source of heatmaps"
                )
            source = "precomputed"
        else:
            heatmaps, generated_targets, source = self._generate(
                inputs, model, target_layer, head, targets, heatmap_generator, cam_method, batch_size, num_prefix_tokens
            )
        maps = _check_heatmaps(heatmaps)
        n = maps.shape[0]
        label_values = _check_labels(labels, n, "labels")
        group_values = _check_labels(group_labels, n, "group_labels")
        if self.n_clusters is not None and self.n_clusters > n:
            raise InputError(
                f"expected at least n_clusters={self.n_clusters} heatmaps, got {n}; "
                "do pass more samples or a smaller n_clusters"
            )
        class_values = label_values if label_values is not None else generated_targets
        if self.per_class and class_values is None:
            raise InputError(
                "expected labels with per_class=True, got None; do pass labels=... (or use per_class=False)"
            )

        small = preprocess.remove_floor(preprocess.downsample(maps, self.downsample_size))
        stats = sample_focus(small)
        features = preprocess.normalise(small)
        empty = np.linalg.norm(features, axis=1) == 0
        if empty.all():
            raise InputError(
                "expected heatmaps with some positive relevance, got only empty or non-positive maps; do check "
                "the explanation method (for a ViT, the last block's patch tokens do not reach a class-token "
                "head: pick an earlier block or its norm1)"
            )
        if empty.any():
            fit_warnings.warn(logger, f"{empty.sum()} of {n} heatmaps have no positive relevance{_by_label(empty, label_values)}; "
                              "they cluster together")

        cluster_labels, scopes, runs = self._cluster(features, class_values)
        self._summarise(maps, small, stats, cluster_labels, scopes, runs, label_values, group_values, class_values,
                        empty)
        self.silhouette_ = self._silhouette(features, cluster_labels)

        self.heatmaps_ = maps
        self.targets_ = generated_targets
        self.sample_focus_ = stats
        self.heatmap_shape_ = tuple(int(s) for s in maps.shape[1:])
        self.processed_shape_ = tuple(int(s) for s in small.shape[1:])
        self.heatmap_source_ = source
        self.labels_given_ = label_values is not None
        self.fit_seconds_ = time.perf_counter() - started
        logger.info(
            "SpRAy: %d maps, %d clusters, risk %s (%.2fs)", n, self.n_clusters_, self.risk_level_, self.fit_seconds_
        )

    def _generate(self, inputs, model, target_layer, head, targets, generator, cam_method, batch_size, prefix):
        if inputs is None:
            raise InputError(
                "expected heatmaps=(N, H, W) or inputs=(N, C, H, W), got neither; do pass one of them"
            )
        generator = generator if generator is not None else self.heatmap_generator
        if model is not None:
            if generator is not None:
                raise InputError(
                    "expected either model (GradCAM) or heatmap_generator, got both; do pass only one"
                )
            if target_layer is None:
                raise InputError(
                    "expected target_layer with model, got None; do name a layer, e.g. 'blocks.3.norm1' for a ViT "
                    "or 'features.2' for a CNN"
                )
            from edgeshort.spray.heatmaps import GradCAMHeatmaps

            cam = GradCAMHeatmaps(
                model, target_layer, head=head, method=cam_method, batch_size=batch_size, num_prefix_tokens=prefix
            )
            maps, used = cam.generate(inputs, targets=targets)
            return maps, used, f"{cam_method}:{target_layer if isinstance(target_layer, str) else 'module'}"
        if generator is None:
            raise InputError(
                "expected model + target_layer or a heatmap_generator with inputs, got neither; do pass one"
            )
        if targets is not None:
            raise InputError(
                "expected targets only with model (GradCAM), got targets with a heatmap_generator; "
                "do bind the targets inside your generator"
            )
        maps = generator(inputs)
        return maps, None, f"generator:{getattr(generator, '__name__', type(generator).__name__)}"

    def _cluster(self, features: np.ndarray, class_values: np.ndarray | None):
        """Global or per-class spectral clustering; returns labels, scope of each cluster, runs."""
        n = features.shape[0]
        common = dict(
            affinity=self.affinity,
            n_neighbors=self.n_neighbors,
            gamma=None if self.gamma is None else float(self.gamma),
            dense_max_samples=self.dense_max_samples,
            random_state=self.random_state,
        )
        if not self.per_class:
            result = spectral_clusters(features, n_clusters=self.n_clusters, max_clusters=self.max_clusters, **common)
            return result.labels, [None] * result.n_clusters, {"all": result}

        cluster_labels = np.full(n, -1, dtype=np.int64)
        scopes: list = []
        runs: dict[str, SpectralResult | None] = {}
        for value in np.unique(class_values):
            members = np.flatnonzero(class_values == value)
            offset = len(scopes)
            if len(members) < MIN_SAMPLES:
                fit_warnings.warn(logger, f"class {value} has {len(members)} samples: kept as one cluster")
                cluster_labels[members] = offset
                scopes.append(_plain(value))
                runs[str(_plain(value))] = None
                continue
            k = None if self.n_clusters is None else min(self.n_clusters, len(members))
            max_k = min(self.max_clusters, len(members) - 1)
            result = spectral_clusters(features[members], n_clusters=k, max_clusters=max(2, max_k), **common)
            cluster_labels[members] = result.labels + offset
            scopes.extend([_plain(value)] * result.n_clusters)
            runs[str(_plain(value))] = result
        return cluster_labels, scopes, runs

    # ------------------------------------------------------------------ summaries
    def _summarise(self, maps, small, stats, cluster_labels, scopes, runs, label_values, group_values, class_values,
                   empty):
        n = maps.shape[0]
        k = len(scopes)
        criteria = self.criteria or CleverHansCriteria()
        clusters, flags = [], []
        for cid in range(k):
            members = cluster_labels == cid
            size = int(members.sum())
            purity, majority, counts = _purity(label_values, members)
            group_purity, group_majority, group_counts = _purity(group_values, members)
            # The reference a cluster is judged against: the rest of its class, or of everything.
            if self.per_class:
                scope_value = scopes[cid]
                in_class = class_values == scope_value
            elif label_values is not None:
                in_class = label_values == majority
            else:
                in_class = np.ones(n, dtype=bool)
            # Empty maps are left out of the reference: their hot area of 1 would make any focus look concentrated.
            reference = in_class & ~members & ~empty
            class_size = int(in_class.sum())
            class_share = float((members & in_class).sum() / max(class_size, 1))
            flag = assess_cluster(
                cid,
                members,
                reference,
                stats,
                criteria,
                purity=purity,
                majority_label=scopes[cid] if self.per_class else majority,
                class_share=class_share,
                class_size=class_size,
                per_class=self.per_class,
                labels_given=label_values is not None or (self.per_class and class_values is not None),
            )
            if flag is not None:
                flags.append(flag)
            # Medians, as the assessment compares: a few empty maps (hot area 1) would drag a mean far off.
            focus = {name: float(np.median(stats[name][members]))
                     for name in ("hot_area", "effective_area", "gini", "top_mass", "spread")}
            focus["centroid"] = [float(stats["centroid_y"][members].mean()), float(stats["centroid_x"][members].mean())]
            focus["centroid_scatter"] = centroid_scatter(stats, members)
            clusters.append(
                {
                    "cluster_id": cid,
                    "size": size,
                    "fraction": size / n,
                    "class": scopes[cid] if self.per_class else None,
                    "label_purity": purity,
                    "majority_label": majority,
                    "label_counts": counts,
                    "group_purity": group_purity,
                    "group_majority": _plain(group_majority),
                    "group_counts": group_counts,
                    "focus_mean": float(stats["focus"][members].mean()),
                    "focus_std": float(stats["focus"][members].std()),
                    "focus": focus,
                    "risk_level": flag["risk_level"] if flag else "none",
                }
            )
        flags.sort(key=lambda f: (-risk_rank(f["risk_level"]), f["cluster_id"]))
        risk = flags[0]["risk_level"] if flags else "none"
        notes = []
        if label_values is None:
            notes.append(
                "No labels were given: clusters were judged by size and localisation only and the risk is capped "
                "at medium; labels would sharpen the assessment (label purity per cluster)."
            )
        if self.per_class:
            notes.append("Clusters were formed within each class; label purity is 1 by construction.")
        self.labels_ = cluster_labels
        self.cluster_labels_ = cluster_labels
        self.n_clusters_ = k
        self.clusters_ = clusters
        self.risk_level_ = risk
        self.shortcut_detected_ = risk_rank(risk) >= risk_rank("medium")
        self.clever_hans_ = {
            "shortcut_detected": self.shortcut_detected_,
            "risk_level": risk,
            "flagged_clusters": [f["cluster_id"] for f in flags if risk_rank(f["risk_level"]) >= risk_rank("medium")],
            "flags": flags,
            "labels_used": label_values is not None,
            "criteria": criteria.to_dict(),
            "notes": notes,
        }
        self.eigenvalues_ = {scope: (None if run is None else run.eigenvalues) for scope, run in runs.items()}
        self.spectral_runs_ = runs
        self.representative_heatmaps_ = self._cluster_means(maps, cluster_labels, k)
        self.processed_representatives_ = self._cluster_means(small, cluster_labels, k)

    @staticmethod
    def _cluster_means(maps: np.ndarray, cluster_labels: np.ndarray, k: int) -> dict[int, np.ndarray]:
        """Mean map per cluster by a one-hot product in chunks (no per-cluster copies)."""
        n, height, width = maps.shape
        sums = np.zeros((k, height * width), dtype=np.float64)
        for start in range(0, n, 4096):
            chunk = np.asarray(maps[start : start + 4096], dtype=np.float32).reshape(-1, height * width)
            onehot = np.zeros((k, len(chunk)), dtype=np.float32)
            onehot[cluster_labels[start : start + 4096], np.arange(len(chunk))] = 1.0
            sums += onehot @ chunk  # float32 within a chunk, float64 across chunks
        counts = np.maximum(np.bincount(cluster_labels, minlength=k), 1)
        means = (sums / counts[:, None]).astype(np.float32).reshape(k, height, width)
        return {cid: means[cid] for cid in range(k)}

    def _silhouette(self, features: np.ndarray, cluster_labels: np.ndarray) -> float | None:
        """Silhouette of the clustering on the normalised maps (cosine), on at most 2,000 samples."""
        n = len(cluster_labels)
        index = np.arange(n)
        if n > 2000:
            index = np.sort(np.random.default_rng(self.random_state).choice(n, size=2000, replace=False))
        labels = cluster_labels[index]
        k = len(np.unique(labels))
        if k < 2 or k >= len(index):
            return None
        from sklearn.metrics import silhouette_score

        return float(silhouette_score(features[index], labels, metric="cosine"))

    # ------------------------------------------------------------------ outputs
    def get_report(self, full_resolution: bool = False) -> dict:
        """JSON-serialisable report: method, shortcut_detected, risk_level, metrics, metadata, report.

        `report.representative_heatmaps` maps each cluster id (a string) to its mean heatmap as
        nested lists, at the processing resolution (`metadata.processed_shape`), or at the input
        resolution with `full_resolution=True`.
        """
        self._check_fitted()
        purities = [c["label_purity"] for c in self.clusters_ if c["label_purity"] is not None]
        representatives = self.representative_heatmaps_ if full_resolution else self.processed_representatives_
        eigen = {
            scope: (None if values is None else [round(float(v), 6) for v in values])
            for scope, values in self.eigenvalues_.items()
        }
        graphs = {
            scope: (None if run is None else {"graph": run.graph, "n_neighbors": run.n_neighbors, "n_clusters": run.n_clusters})
            for scope, run in self.spectral_runs_.items()
        }
        return {
            "method": "spray",
            "warnings": list(self.warnings_),
            "shortcut_detected": bool(self.shortcut_detected_),
            "risk_level": self.risk_level_,
            "metrics": {
                "n_clusters": int(self.n_clusters_),
                "silhouette": self.silhouette_,
                "mean_label_purity": float(np.mean(purities)) if purities else None,
                "max_label_purity": float(np.max(purities)) if purities else None,
                "mean_focus": float(np.mean(self.sample_focus_["focus"])),
                "n_flagged_clusters": len(self.clever_hans_["flagged_clusters"]),
                "fit_seconds": round(float(self.fit_seconds_), 4),
            },
            "metadata": {
                "n_samples": int(len(self.labels_)),
                "heatmap_shape": list(self.heatmap_shape_),
                "processed_shape": list(self.processed_shape_),
                "representative_heatmap_shape": list(self.heatmap_shape_ if full_resolution else self.processed_shape_),
                "heatmap_source": self.heatmap_source_,
                "labels_given": bool(self.labels_given_),
                "params": {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in self._json_params().items()},
                "affinity": self.affinity,
                "cluster_selection": self.cluster_selection,
                "downsample_size": self.downsample_size,
                "per_class": bool(self.per_class),
                "graphs": graphs,
                "laplacian_eigenvalues": eigen,
                "edgeshort_version": __version__,
            },
            "report": {
                "clusters": self.clusters_,
                "clever_hans": self.clever_hans_,
                "representative_heatmaps": {
                    str(cid): np.round(heatmap.astype(np.float64), 5).tolist() for cid, heatmap in representatives.items()
                },
            },
        }

    def _json_params(self) -> dict:
        params = self.get_params(deep=False)
        generator = params.get("heatmap_generator")
        if generator is not None:
            params["heatmap_generator"] = getattr(generator, "__name__", type(generator).__name__)
        return params

    def _selection_used(self) -> str:
        """How the cluster count was chosen: "auto" with a given count is a fixed one."""
        if self.cluster_selection == "auto":
            return "fixed" if self.n_clusters is not None else "eigengap"
        return self.cluster_selection

    def summary(self) -> str:
        """A readable multi-line account of the clusters and the Clever Hans flags."""
        self._check_fitted()
        n = len(self.labels_)
        h, w = self.heatmap_shape_
        ph, pw = self.processed_shape_
        runs = [r for r in self.spectral_runs_.values() if r is not None]
        graph = runs[0].graph if runs else "-"
        k_text = f"k={runs[0].n_neighbors}" if runs and runs[0].n_neighbors else "dense"
        lines = [
            f"SpRAy: {n} heatmaps {h}x{w} -> {ph}x{pw}, affinity={self.affinity} ({graph}, {k_text}), "
            f"{self.n_clusters_} clusters ({self._selection_used()}{', per class' if self.per_class else ''})",
            f"Risk: {self.risk_level_.upper()}"
            + (
                f" - shortcut suspected in cluster(s) {', '.join(map(str, self.clever_hans_['flagged_clusters']))}"
                if self.shortcut_detected_
                else ""
            ),
            "",
            f"{'cluster':>7} {'size':>6} {'share':>6} {'label (purity)':>16} {'hot area':>9} {'top5%':>6} "
            f"{'centroid y,x':>13} {'risk':>6}",
        ]
        for c in self.clusters_:
            label = "-" if c["majority_label"] is None else f"{c['majority_label']} ({c['label_purity']:.0%})"
            if self.per_class:
                label = f"class {c['class']}"
            cy, cx = c["focus"]["centroid"]
            lines.append(
                f"{c['cluster_id']:>7} {c['size']:>6} {c['fraction']:>6.1%} {label:>16} "
                f"{c['focus']['hot_area']:>9.1%} {c['focus']['top_mass']:>6.1%} {cy:>6.2f},{cx:>6.2f} "
                f"{c['risk_level']:>6}"
            )
        flags = self.clever_hans_["flags"]
        lines.append("")
        if flags:
            lines.append("Clever Hans flags:")
            for flag in flags:
                lines.append(f"  cluster {flag['cluster_id']} [{flag['risk_level']}]:")
                lines.extend(f"    - {reason}" for reason in flag["reasons"])
        else:
            lines.append("No cluster looks like Clever Hans behaviour.")
        lines.extend(self.clever_hans_["notes"])
        if self.warnings_:
            lines += ["", "Warnings:", *(f"  - {message}" for message in self.warnings_)]
        return "\n".join(lines)

    def save_representative_heatmaps(self, path: str | Path, cell_size: int = 160, columns: int | None = None) -> Path:
        """Write a PNG grid of the clusters' mean heatmaps (input resolution), flagged ones framed
        in their risk colour. Returns the path."""
        self._check_fitted()
        from edgeshort.spray.render import RISK_COLOURS, save_heatmap_grid

        ids = sorted(self.representative_heatmaps_)
        by_id = {c["cluster_id"]: c for c in self.clusters_}
        captions, colours = [], []
        for cid in ids:
            c = by_id[cid]
            label = "" if c["majority_label"] is None else f" lbl {c['majority_label']} {c['label_purity']:.0%}"
            if self.per_class:
                label = f" class {c['class']}"
            captions.append(f"cluster {cid}: n={c['size']} ({c['fraction']:.0%})\n{label.strip()} risk {c['risk_level']}")
            colours.append(RISK_COLOURS[c["risk_level"]] if c["risk_level"] != "none" else (255, 255, 255))
        return save_heatmap_grid(
            path, [self.representative_heatmaps_[cid] for cid in ids], captions, colours, cell_size, columns
        )

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "labels_")


__all__ = ["SpRAyDetector", "RISK_LEVELS", "CleverHansCriteria"]
