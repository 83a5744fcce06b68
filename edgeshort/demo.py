"""The built-in demo: its data, its tiny ViT and its detector settings, in one place.

`edgeshort demo`, `edgeshort detect --demo` and the tests all use these, so what the tests
prove is what the demo shows.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from edgeshort.data import ImageDataset, SplitSpec, SyntheticConfig, generate
from edgeshort.detect.config import DetectorConfig
from edgeshort.models.train import TrainConfig, cached_tiny_vit

# ISIC-like: the artefact on 30% of benign training images and on no malignant one.
DEMO_DATA = SyntheticConfig(train=SplitSpec(3000, (0.3, 0.0)))
DEMO_TRAIN = TrainConfig(epochs=10)
DEMO_DETECTOR = DetectorConfig(num_selected=50, knn_negatives=500)


def demo_data_config(artefact: str = "patch") -> SyntheticConfig:
    return replace(DEMO_DATA, artefact=artefact)


def demo_datasets(artefact: str = "patch") -> dict[str, ImageDataset]:
    return generate(demo_data_config(artefact))


def demo_model(artefact: str = "patch", datasets=None, cache_dir: str | Path | None = None, progress: bool = True):
    """The demo's tiny ViT trained on `artefact` data (cached on disk after the first call)."""
    return cached_tiny_vit(DEMO_TRAIN, demo_data_config(artefact), cache_dir, datasets, progress)
