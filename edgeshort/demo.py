"""The built-in demo: its data, its tiny ViT and its detector settings (DEMO_DETECTOR, kept beside
DetectorConfig so the CLI can show it without torch), in one place.

`edgeshort demo`, `edgeshort detect --demo` and the tests all use these, so what the tests
prove is what the demo shows.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from edgeshort.data import ImageDataset, SplitSpec, SyntheticConfig, generate
from edgeshort.detect.config import DEMO_DETECTOR  # noqa: F401 (the demo's settings, kept beside DetectorConfig)
from edgeshort.models.train import TrainConfig, cached_tiny_vit

# ISIC-like: the artefact on half the benign training images and on 3% of malignant ones, those
# only where the lesion is plainly malignant, so the model learns to trust the artefact over
# faint malignant evidence. Validation adds patched malignant images so every group exists (and
# DFR has each to balance); test is balanced.
DEMO_DATA = SyntheticConfig(
    train=SplitSpec(3000, (0.5, 0.03), malignant_artefact_min_strength=0.6),
    val=SplitSpec(1500, (0.5, 0.2)),
)
# The ruler is a weaker cue than a coloured sticker: the model leans on it only when it never
# appears on a malignant training image (ISIC's own split for its patches).
DEMO_TRAIN_SPLITS = {"patch": DEMO_DATA.train, "ruler": SplitSpec(3000, (0.5, 0.0))}
DEMO_TRAIN = TrainConfig(epochs=12)


def demo_data_config(artefact: str = "patch") -> SyntheticConfig:
    return replace(DEMO_DATA, artefact=artefact, train=DEMO_TRAIN_SPLITS[artefact])


def demo_datasets(artefact: str = "patch") -> dict[str, ImageDataset]:
    return generate(demo_data_config(artefact))


def demo_model(artefact: str = "patch", datasets=None, cache_dir: str | Path | None = None, progress: bool = True):
    """The demo's tiny ViT trained on `artefact` data (cached on disk after the first call)."""
    return cached_tiny_vit(DEMO_TRAIN, demo_data_config(artefact), cache_dir, datasets, progress)
