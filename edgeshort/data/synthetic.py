"""Seeded ISIC-like images with a planted shortcut artefact and its exact mask.

A lesion's class is decided by real visual evidence: malignant lesions have an irregular
border and variegated colour, benign ones are round-ish and uniform. An artefact (a coloured
patch as in ISIC, or a ruler) is drawn on a share of the images that depends on the class
and the split, so a model trained on `train` can learn it as a shortcut. Every image carries
its class, its group (artefact present) and the pixel mask of exactly the drawn artefact.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from edgeshort.data.dataset import ImageDataset
from edgeshort.errors import InputError

ARTEFACTS = ("patch", "ruler")
CLASS_NAMES = ("benign", "malignant")
# ISIC's coloured patches are saturated stickers; one family of hues (green to blue) that never
# occurs in skin or lesion, so the artefact is one shortcut rather than several.
PATCH_COLOURS = np.array([[40, 200, 60], [30, 110, 230], [20, 200, 210]], dtype=np.float32)
# Bump when the drawing changes, so models cached for the old images are not reused.
GENERATOR_VERSION = 9


@dataclass(frozen=True)
class SplitSpec:
    """Size of a split, the share of each class that carries the artefact, and on which malignant lesions.

    `malignant_artefact_min_strength` > 0 puts the artefact only on malignant lesions whose
    evidence is at least that plain (0..1): a model trained on such a split learns to trust the
    artefact over faint malignant evidence, the partial shortcut the ISIC models show.
    """

    size: int
    artefact_rate: tuple[float, float]  # (benign, malignant)
    malignant_artefact_min_strength: float = 0.0


@dataclass(frozen=True)
class SyntheticConfig:
    image_size: int = 64
    artefact: str = "patch"
    seed: int = 0
    malignant_share: float = 0.5
    # Like ISIC: the artefact sits on a large share of benign images only; validation adds a few
    # patched malignant images so every (class, artefact) group exists; test is balanced.
    train: SplitSpec = field(default_factory=lambda: SplitSpec(3000, (0.9, 0.0)))
    val: SplitSpec = field(default_factory=lambda: SplitSpec(1000, (0.5, 0.1)))
    test: SplitSpec = field(default_factory=lambda: SplitSpec(800, (0.5, 0.5)))

    def __post_init__(self) -> None:
        if self.artefact not in ARTEFACTS:
            raise InputError(f"expected artefact in {ARTEFACTS}, got {self.artefact!r}")
        if self.image_size < 32:
            raise InputError(f"expected image_size >= 32, got {self.image_size}")
        for name in ("train", "val", "test"):
            spec = getattr(self, name)
            if spec.size < 1 or not all(0.0 <= r <= 1.0 for r in spec.artefact_rate):
                raise InputError(f"{name}: expected size >= 1 and artefact rates in [0, 1], got {spec}")

    def to_dict(self) -> dict:
        return asdict(self)

    def with_sizes(self, train: int, val: int, test: int) -> SyntheticConfig:
        return replace(
            self,
            train=replace(self.train, size=train),
            val=replace(self.val, size=val),
            test=replace(self.test, size=test),
        )


def _polar(size: int, cy: float, cx: float) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    return np.hypot(dy, dx), np.arctan2(dy, dx)


def _skin(rng: np.random.Generator, size: int) -> np.ndarray:
    base = np.array([225, 175, 145], np.float32) + rng.normal(0, 12, 3).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    gradient = (rng.normal(0, 10) * (yy - 0.5) + rng.normal(0, 10) * (xx - 0.5))[..., None]
    noise = rng.normal(0, 4, (size, size, 1)).astype(np.float32)
    return base + gradient + noise


def _draw_lesion(
    rng: np.random.Generator, img: np.ndarray, malignant: bool, min_strength: float = 0.0
) -> tuple[float, float, float]:
    size = img.shape[0]
    cy, cx = size / 2 + rng.normal(0, size * 0.04, 2)
    r0 = size * rng.uniform(0.17, 0.24)
    radius, theta = _polar(size, cy, cx)
    # How plainly malignant a lesion looks varies, as in the clinic: faint evidence is where a
    # model is tempted to lean on the artefact instead.
    strength = min_strength + (1.0 - min_strength) * rng.uniform(0.0, 1.0)
    if malignant:
        # Irregular border: several angular harmonics, stronger with the evidence.
        amps = rng.uniform(0.09, 0.12, 3) + 0.09 * strength
        freqs = rng.integers(3, 8, 3)
    else:
        amps = rng.uniform(0.0, 0.06, 3)
        freqs = rng.integers(2, 4, 3)
    phases = rng.uniform(0, 2 * np.pi, 3)
    border = r0 * (1 + sum(a * np.sin(f * theta + p) for a, f, p in zip(amps, freqs, phases)))
    inside = radius < border
    brown = np.array([120, 75, 50], np.float32) + rng.normal(0, 10, 3).astype(np.float32)
    colour = np.broadcast_to(brown, img.shape).copy()
    shade = (radius / max(r0, 1.0))[..., None]
    colour *= 0.85 + 0.25 * np.clip(shade, 0, 1.2)
    if malignant:
        # Colour variegation: dark, blue-grey and reddish blotches inside the lesion.
        for tint in rng.permutation(np.array([[50, 30, 25], [90, 100, 130], [170, 70, 70]], np.float32))[:2]:
            by, bx = cy + rng.normal(0, r0 * 0.35), cx + rng.normal(0, r0 * 0.35)
            blob, _ = _polar(size, by, bx)
            weight = (0.5 + 0.5 * strength) * np.clip(1 - blob / (r0 * rng.uniform(0.4, 0.7)), 0, 1)[..., None]
            colour = colour * (1 - weight) + tint * weight
    img[inside] = colour[inside]
    return float(cy), float(cx), float(r0 * (1 + amps.sum()))


def _artefact_position(
    rng: np.random.Generator, size: int, extent: tuple[int, int], lesion: tuple[float, float, float]
) -> tuple[int, int]:
    """Top-left corner of an (h, w) artefact: the image corner farthest from the lesion, jittered."""
    h, w = extent
    cy, cx, reach = lesion
    jitter = rng.integers(0, max(2, size // 16), (4, 2))
    corners = [(0, 0), (0, size - w), (size - h, 0), (size - h, size - w)]
    candidates = [
        (int(np.clip(y + (jy if y == 0 else -jy), 0, size - h)), int(np.clip(x + (jx if x == 0 else -jx), 0, size - w)))
        for (y, x), (jy, jx) in zip(corners, jitter)
    ]

    def gap(pos: tuple[int, int]) -> float:
        y, x = pos
        return float(np.hypot(max(y - cy, 0, cy - (y + h)), max(x - cx, 0, cx - (x + w))))

    best = max(gap(c) for c in candidates)
    # Among the corners clear of the lesion pick one at random, so the artefact moves around.
    clear = [c for c in candidates if gap(c) >= min(best, reach)]
    return clear[int(rng.integers(len(clear)))]


def _draw_patch(rng, img, lesion) -> np.ndarray:
    size = img.shape[0]
    # About three patch tokens across at the demo's 8-pixel patches, like ISIC's stickers.
    diameter = int(round(size * rng.uniform(0.34, 0.42)))
    y, x = _artefact_position(rng, size, (diameter, diameter), lesion)
    radius, _ = _polar(size, y + (diameter - 1) / 2, x + (diameter - 1) / 2)
    mask = radius <= diameter / 2
    img[mask] = PATCH_COLOURS[rng.integers(len(PATCH_COLOURS))] + rng.normal(0, 6, 3).astype(np.float32)
    return mask


def _draw_ruler(rng, img, lesion) -> np.ndarray:
    size = img.shape[0]
    length, width = int(size * rng.uniform(0.5, 0.7)), max(4, int(round(size * 0.22)))
    vertical = bool(rng.integers(2))
    extent = (length, width) if vertical else (width, length)
    y, x = _artefact_position(rng, size, extent, lesion)
    mask = np.zeros((size, size), bool)
    mask[y : y + extent[0], x : x + extent[1]] = True
    # Dermoscopy rulers are often clear plastic: the skin shows through to a varying degree, so
    # some rulers are faint, unlike the opaque sticker.
    opacity = rng.uniform(0.5, 1.0)
    img[mask] = opacity * np.array([235, 235, 225], np.float32) + (1 - opacity) * img[mask]
    step = max(3, size // 16)
    ticks = np.zeros_like(mask)
    for i, pos in enumerate(range(1, length - 1, step)):
        depth = width if i % 4 == 0 else width // 2
        if vertical:
            ticks[y + pos, x : x + depth] = True
        else:
            ticks[y : y + depth, x + pos] = True
    img[ticks & mask] = np.array([30, 30, 30], np.float32)
    return mask


DRAWERS = {"patch": _draw_patch, "ruler": _draw_ruler}


SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}


def render_image(
    config: SyntheticConfig, split: str, index: int, label: int, with_artefact: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Image `index` of a split as uint8 (H, W, 3) and its artefact pixel mask (H, W).

    The artefact is drawn last, so the same call without it gives the same image minus the
    artefact: that is how the tests prove the mask covers exactly what was drawn.
    """
    rng = np.random.default_rng([config.seed, SPLIT_SEEDS[split], index])
    img = _skin(rng, config.image_size)
    spec: SplitSpec = getattr(config, split)
    min_strength = spec.malignant_artefact_min_strength if (label and with_artefact) else 0.0
    lesion = _draw_lesion(rng, img, bool(label), min_strength)
    mask = DRAWERS[config.artefact](rng, img, lesion) if with_artefact else np.zeros(img.shape[:2], bool)
    return np.clip(img, 0, 255).astype(np.uint8), mask


def generate_split(config: SyntheticConfig, split: str) -> ImageDataset:
    """One split as an in-memory dataset: uint8 images, labels, groups and artefact masks."""
    if split not in ("train", "val", "test"):
        raise InputError(f"expected split 'train', 'val' or 'test', got {split!r}")
    spec: SplitSpec = getattr(config, split)
    rng = np.random.default_rng([config.seed, SPLIT_SEEDS[split]])
    size, n = config.image_size, spec.size
    if split == "test":
        # Balanced groups: each (class, artefact) cell gets a quarter.
        labels = np.arange(n) % 2
        groups = (np.arange(n) // 2) % 2
    else:
        labels = (rng.random(n) < config.malignant_share).astype(np.int64)
        rates = np.asarray(spec.artefact_rate)[labels]
        groups = (rng.random(n) < rates).astype(np.int64)
    order = rng.permutation(n)
    labels, groups = labels[order].astype(np.int64), groups[order].astype(np.int64)
    images = np.empty((n, size, size, 3), np.uint8)
    masks = np.zeros((n, size, size), bool)
    for i in range(n):
        images[i], masks[i] = render_image(config, split, i, int(labels[i]), bool(groups[i]))
    return ImageDataset.from_arrays(
        images, labels, class_names=CLASS_NAMES, groups=groups, masks=masks, name=f"{config.artefact}-{split}",
        source=f"synthetic:{split}:{json.dumps(config.to_dict())}",
    )


def generate(config: SyntheticConfig | None = None) -> dict[str, ImageDataset]:
    """All three splits."""
    config = config or SyntheticConfig()
    return {split: generate_split(config, split) for split in ("train", "val", "test")}
