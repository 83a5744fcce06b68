"""Synthetic explanation heatmaps with a planted Clever Hans group, for tests and benchmarks.

Normal maps look like GradCAM on an object that sits somewhere near the middle of the image:
one or two diffuse blobs of varied position and width. Artefact maps look like a model that
reads a marker at a fixed place: a sharp hot spot in one corner, with a weak trace of the
object left. The artefact group is drawn from one class only, as in ISIC's coloured patches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeshort.errors import InputError


@dataclass(frozen=True)
class SyntheticHeatmaps:
    heatmaps: np.ndarray  # (N, H, W) float32 in [0, 1]
    labels: np.ndarray  # (N,) int64
    is_artefact: np.ndarray  # (N,) bool: the planted group


def _blobs(
    rng: np.random.Generator, count: int, size: int, centre_range: tuple[float, float], sigma_range: tuple[float, float]
) -> np.ndarray:
    """`count` maps, each a sum of one or two anisotropic Gaussian blobs."""
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size
    maps = np.zeros((count, size, size), dtype=np.float32)
    for extra in (False, True):
        centres = rng.uniform(*centre_range, size=(count, 2)).astype(np.float32)
        sigmas = rng.uniform(*sigma_range, size=(count, 2)).astype(np.float32)
        weight = np.ones(count, dtype=np.float32)
        if extra:  # a second, weaker blob on about a third of the maps
            weight = np.where(rng.random(count) < 0.35, rng.uniform(0.3, 0.7, count), 0.0).astype(np.float32)
        gy = np.exp(-0.5 * ((grid[None, :] - centres[:, :1]) / sigmas[:, :1]) ** 2)
        gx = np.exp(-0.5 * ((grid[None, :] - centres[:, 1:]) / sigmas[:, 1:]) ** 2)
        maps += weight[:, None, None] * gy[:, :, None] * gx[:, None, :]
    return maps


def _minmax(maps: np.ndarray) -> np.ndarray:
    low = maps.min(axis=(1, 2), keepdims=True)
    high = maps.max(axis=(1, 2), keepdims=True)
    return ((maps - low) / np.maximum(high - low, 1e-7)).astype(np.float32)


def make_spray_heatmaps(
    n_samples: int = 600,
    size: int = 32,
    artefact_fraction: float = 0.1,
    n_classes: int = 2,
    artefact_label: int = 1,
    corner: tuple[float, float] = (0.12, 0.12),
    noise: float = 0.03,
    seed: int = 0,
) -> SyntheticHeatmaps:
    """Heatmaps of `n_samples` images, `artefact_fraction` of them (all of class `artefact_label`)
    explained by a hot spot at `corner` (relative (y, x)) instead of the object."""
    if n_samples < 2 or size < 4:
        raise InputError(f"expected n_samples >= 2 and size >= 4, got {n_samples} and {size}; do pass larger values")
    if not 0.0 <= artefact_fraction < 1.0:
        raise InputError(f"expected 0 <= artefact_fraction < 1, got {artefact_fraction}; do pass a fraction")
    if not 0 <= artefact_label < n_classes:
        raise InputError(
            f"expected 0 <= artefact_label < n_classes={n_classes}, got {artefact_label}; do pick an existing class"
        )
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n_samples) % n_classes).astype(np.int64)
    n_artefact = int(round(artefact_fraction * n_samples))
    candidates = np.flatnonzero(labels == artefact_label)
    if n_artefact > candidates.size:
        raise InputError(
            f"expected at most {candidates.size} artefact samples (class {artefact_label}), got {n_artefact}; "
            "do lower artefact_fraction"
        )
    is_artefact = np.zeros(n_samples, dtype=bool)
    is_artefact[rng.choice(candidates, size=n_artefact, replace=False)] = True

    maps = _blobs(rng, n_samples, size, (0.25, 0.75), (0.10, 0.20))
    if n_artefact:
        grid = (np.arange(size, dtype=np.float32) + 0.5) / size
        jitter = rng.normal(0.0, 0.015, size=(n_artefact, 2)).astype(np.float32)
        centre = np.asarray(corner, dtype=np.float32)[None, :] + jitter
        sigma = np.float32(0.04)
        gy = np.exp(-0.5 * ((grid[None, :] - centre[:, :1]) / sigma) ** 2)
        gx = np.exp(-0.5 * ((grid[None, :] - centre[:, 1:]) / sigma) ** 2)
        spot = gy[:, :, None] * gx[:, None, :]
        residue = rng.uniform(0.0, 0.15, size=(n_artefact, 1, 1)).astype(np.float32)
        maps[is_artefact] = spot + residue * _minmax(maps[is_artefact])
    maps += np.abs(rng.normal(0.0, noise, size=maps.shape)).astype(np.float32)
    return SyntheticHeatmaps(heatmaps=_minmax(maps), labels=labels, is_artefact=is_artefact)
