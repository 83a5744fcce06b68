"""The detector's settings, one frozen dataclass (written to the run folder as config.json)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from edgeshort.errors import InputError

DFR_METHODS = ("logreg", "adam", "none")
HEATMAP_CONTRASTS = ("nearest", "mean")
NEGATIVE_CHOICES = ("spread", "closest")
# Runs written before `heatmap` and `negatives` existed used the notebook's choices.
SETTINGS_OF_EARLIER_RUNS = {"heatmap": "mean", "negatives": "closest"}


@dataclass(frozen=True)
class DetectorConfig:
    n_clusters: int = 2
    pca_components: int = 3
    lambdas: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)
    num_selected: int = 20  # samples nearest each centroid used for heatmaps and the KNN
    knn_samples: int | None = None  # positives; None: the seed's 200 at 20 x 196 patches, scaled to this grid
    knn_negatives: int | None = None  # negatives; None: as many as positives (the seed)
    knn_k: int = 5
    # Key heatmaps against the nearest clean keys ("mean": the seed's clean mean key per position)
    # and KNN negatives spread over the clean tokens ("closest": the seed's); see detect/keymaps.py.
    heatmap: str = "nearest"
    negatives: str = "spread"
    dilation_radius: int = 1
    min_patches: int = 2  # the seed's "more than one flagged patch" rule for "shortcut present"
    key_layer: int = -1
    dfr: str = "logreg"
    dfr_subsamples: int = 10
    batch_size: int = 64
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.n_clusters >= 2, f"n_clusters >= 2, got {self.n_clusters}"),
            (self.pca_components >= 1, f"pca_components >= 1, got {self.pca_components}"),
            (len(self.lambdas) == 3, f"three lambdas, got {self.lambdas}"),
            (self.num_selected >= 1, f"num_selected >= 1, got {self.num_selected}"),
            (self.knn_samples is None or self.knn_samples >= 1, f"knn_samples >= 1, got {self.knn_samples}"),
            (self.knn_negatives is None or self.knn_negatives >= 1, f"knn_negatives >= 1, got {self.knn_negatives}"),
            (self.knn_k >= 1, f"knn_k >= 1, got {self.knn_k}"),
            (self.dilation_radius >= 0, f"dilation_radius >= 0, got {self.dilation_radius}"),
            (self.min_patches >= 1, f"min_patches >= 1, got {self.min_patches}"),
            (self.dfr in DFR_METHODS, f"dfr in {DFR_METHODS}, got {self.dfr!r}"),
            (self.heatmap in HEATMAP_CONTRASTS, f"heatmap in {HEATMAP_CONTRASTS}, got {self.heatmap!r}"),
            (self.negatives in NEGATIVE_CHOICES, f"negatives in {NEGATIVE_CHOICES}, got {self.negatives!r}"),
            (self.batch_size >= 1, f"batch_size >= 1, got {self.batch_size}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(f"DetectorConfig: expected {message}")

    def knn_sample_count(self, num_patches: int) -> int:
        if self.knn_samples is not None:
            return self.knn_samples
        return max(self.knn_k, round(200 * self.num_selected * num_patches / (20 * 196)))

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
