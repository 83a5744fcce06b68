"""The detector's settings, one frozen dataclass (written to the run folder as config.json)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from edgeshort.errors import InputError

DFR_METHODS = ("logreg", "adam", "none")
HEATMAP_CONTRASTS = ("nearest", "mean")
SALIENCY_CONTRASTS = ("nearest", "mean")
NEGATIVE_CHOICES = ("spread", "closest")
CLUSTER_SPACES = ("auto", "pooled", "class_centred")
POSITIVE_CHOICES = ("calibrated", "hottest")
# Clusters sharing this much information with the class labels follow the classes. Measured on the
# demo's twelve trained models (two artefacts x six seeds): 0.03-0.09 where the pooled clusters
# found the artefact, 0.30-0.58 where they split the classes instead.
CLASS_FOLLOWING_NMI = 0.2
# Ablation that costs more than this much balanced validation accuracy removes the object, not
# an artefact: on a real shortcut it gains accuracy, as the artefact-bearing minority recovers.
ABLATION_HARM_TOLERANCE = 0.05
# Runs written before these settings existed used the notebook's choices.
SETTINGS_OF_EARLIER_RUNS = {"heatmap": "mean", "negatives": "closest", "positives": "hottest", "cluster_space": "pooled",
                            "saliency": "mean"}


@dataclass(frozen=True)
class DetectorConfig:
    """The detector's settings; `SETTING_NOTES` says what each means (CLI help and report use it)."""

    n_clusters: int = 2
    pca_components: int = 3
    cluster_space: str = "auto"
    lambdas: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)
    num_selected: int = 20
    knn_samples: int | None = None
    knn_negatives: int | None = None
    knn_k: int = 5
    positives: str = "calibrated"
    positive_quantile: float = 0.999
    heatmap: str = "nearest"  # see detect/keymaps.py for both contrasts
    negatives: str = "spread"
    saliency: str = "nearest"  # the guard's per-patch tint (overlays, report); see DetectionResult.saliency_maps
    dilation_radius: int | None = None
    min_patches: int = 2
    key_layer: int = -1
    dfr: str = "logreg"
    dfr_subsamples: int = 10
    batch_size: int = 64
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        # Types first: a float or string count would fail deep inside the fit, after the slow steps.
        whole = ("n_clusters", "pca_components", "num_selected", "knn_samples", "knn_negatives", "knn_k",
                 "dilation_radius", "min_patches", "key_layer", "dfr_subsamples", "batch_size", "seed")
        optional = ("knn_samples", "knn_negatives", "dilation_radius")
        for name in whole:
            value = getattr(self, name)
            if not (isinstance(value, (int, np.integer)) and not isinstance(value, bool)) and not (
                    value is None and name in optional):
                raise InputError(f"DetectorConfig: expected {name} as a whole number"
                                 f"{' or None' if name in optional else ''}, got {value!r}")
        if not isinstance(self.progress, bool):
            raise InputError(f"DetectorConfig: expected progress as True or False, got {self.progress!r}")
        if not isinstance(self.positive_quantile, (int, float)) or isinstance(self.positive_quantile, bool):
            raise InputError(f"DetectorConfig: expected positive_quantile as a number, got {self.positive_quantile!r}")
        object.__setattr__(self, "lambdas", tuple(float(v) for v in self.lambdas))  # frozen: hashable, JSON-able
        checks = [
            (self.n_clusters >= 2, f"n_clusters >= 2, got {self.n_clusters}"),
            (self.pca_components >= 1, f"pca_components >= 1, got {self.pca_components}"),
            (len(self.lambdas) == 3, f"three lambdas, got {self.lambdas}"),
            (self.num_selected >= 1, f"num_selected >= 1, got {self.num_selected}"),
            (self.knn_samples is None or self.knn_samples >= 1, f"knn_samples >= 1, got {self.knn_samples}"),
            (self.knn_negatives is None or self.knn_negatives >= 1, f"knn_negatives >= 1, got {self.knn_negatives}"),
            (self.knn_k >= 1, f"knn_k >= 1, got {self.knn_k}"),
            (self.dilation_radius is None or self.dilation_radius >= 0,
             f"dilation_radius >= 0 or None, got {self.dilation_radius}"),
            (self.min_patches >= 1, f"min_patches >= 1, got {self.min_patches}"),
            (self.dfr in DFR_METHODS, f"dfr in {DFR_METHODS}, got {self.dfr!r}"),
            (self.cluster_space in CLUSTER_SPACES, f"cluster_space in {CLUSTER_SPACES}, got {self.cluster_space!r}"),
            (self.heatmap in HEATMAP_CONTRASTS, f"heatmap in {HEATMAP_CONTRASTS}, got {self.heatmap!r}"),
            (self.positives in POSITIVE_CHOICES, f"positives in {POSITIVE_CHOICES}, got {self.positives!r}"),
            (0 < self.positive_quantile < 1, f"0 < positive_quantile < 1, got {self.positive_quantile}"),
            (self.negatives in NEGATIVE_CHOICES, f"negatives in {NEGATIVE_CHOICES}, got {self.negatives!r}"),
            (self.saliency in SALIENCY_CONTRASTS, f"saliency in {SALIENCY_CONTRASTS}, got {self.saliency!r}"),
            (self.batch_size >= 1, f"batch_size >= 1, got {self.batch_size}"),
            (self.dfr_subsamples >= 1, f"dfr_subsamples >= 1, got {self.dfr_subsamples}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(f"DetectorConfig: expected {message}")

    def knn_sample_count(self, num_patches: int) -> int:
        if self.knn_samples is not None:
            return self.knn_samples
        return max(self.knn_k, round(200 * self.num_selected * num_patches / (20 * 196)))

    def dilation_for(self, grid: tuple[int, int]) -> int:
        """The radius flags grow by: as set, or the seed's 1 patch at 14 x 14 scaled to this grid, so the
        grown area is the same share of the image (0 on grids under 7 x 7, where one patch is a sixth)."""
        if self.dilation_radius is not None:
            return self.dilation_radius
        return int(min(grid) / 14 + 0.5)

    def knn_negative_count(self, num_patches: int) -> int:
        return self.knn_negatives if self.knn_negatives is not None else self.knn_sample_count(num_patches)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> DetectorConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InputError(f"unknown detector settings {sorted(unknown)}; known: {sorted(known)}")
        if "lambdas" in data:
            data = {**data, "lambdas": tuple(data["lambdas"])}
        return cls(**data)


# The demo's detector: the seed's 200 positive keys; 50 samples per cluster for the heatmaps and the
# negatives (the demo's artefact covers about 15% of an image's 64 tokens), and 600 negatives so
# clean lesion keys are represented.
DEMO_DETECTOR = DetectorConfig(num_selected=50, knn_samples=200, knn_negatives=600)

SETTING_NOTES = {
    "n_clusters": "k-means clusters",
    "pca_components": "PCA components before k-means",
    "cluster_space": "cluster the pooled features (pooled, the seed's), what remains once each class's mean is "
                     "removed (class_centred), or pooled unless those clusters follow the classes (auto)",
    "lambdas": "weights of homogeneity, exp(-Brier dominant), 1 - exp(-Brier other)",
    "num_selected": "samples nearest each centre used for heatmaps and KNN negatives (and positives when "
                    "positives='hottest')",
    "knn_samples": "KNN positives (None: the seed's 200 at num_selected 20 and 196 patches, scaled to "
                   "num_selected and this grid)",
    "knn_negatives": "KNN negatives (None: as many as positives, as the seed)",
    "knn_k": "neighbours the KNN votes with",
    "heatmap": "key heatmaps against the nearest clean keys (nearest) or the clean mean key per position "
               "(mean, the seed's)",
    "positives": "KNN positives drawn evenly from the shortcut cluster's tokens hotter than that quantile of clean "
                 "tokens (calibrated), or the hottest of its selected samples (hottest, the seed's)",
    "positive_quantile": "quantile of clean tokens' heat a calibrated positive must exceed",
    "negatives": "KNN negatives spread over the clean tokens' heat ranking (spread) or the coolest "
                 "(closest, the seed's)",
    "saliency": "the guard's per-patch tint: key distance to the nearest of the KNN's clean keys (nearest) or to "
                "the clean mean key per position (mean, earlier runs')",
    "dilation_radius": "flags grown to neighbours within this radius (None: the seed's 1 at 14 x 14 patches, "
                       "scaled to this grid)",
    "min_patches": "flagged patches needed for 'shortcut present' (the seed's 'more than one')",
    "key_layer": "encoder block whose key projection, applied to the patch embeddings (the seed's), gives the keys",
    "dfr": "last-layer retraining method",
    "dfr_subsamples": "balanced subsamples DFR averages over",
    "batch_size": "images per forward pass",
    "seed": "random seed",
    "progress": "progress bars",
}

# help(DetectorConfig) lists what each setting means.
DetectorConfig.__doc__ += "\n\nSettings:\n" + "\n".join(f"    {name}: {note}" for name, note in SETTING_NOTES.items())
