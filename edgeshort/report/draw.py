"""Drawing with numpy + Pillow only, so the runtime's overlays and the offline pictures share it."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

# Matplotlib's "hot" colour map sampled at 256 levels (black -> red -> yellow -> white), built
# here so drawing needs no matplotlib.
_t = np.linspace(0.0, 1.0, 256)
HOT = (
    np.stack(
        [np.clip(_t / 0.365, 0, 1), np.clip((_t - 0.365) / 0.381, 0, 1), np.clip((_t - 0.746) / 0.254, 0, 1)], axis=1
    )
    * 255
).astype(np.uint8)
FLAG_COLOUR = (0, 255, 255)


def colourise(values: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """(H, W) float -> (H, W, 3) uint8 with the hot colour map, scaled to [lo, hi]."""
    values = np.asarray(values, dtype=np.float64)
    lo = float(np.nanmin(values)) if lo is None else lo
    hi = float(np.nanmax(values)) if hi is None else hi
    scaled = np.clip((values - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    return HOT[np.nan_to_num(scaled * 255).astype(np.uint8)]


def grid_to_pixels(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour upsampling of a (gh, gw) patch grid to (H, W): each patch covers its pixels."""
    h, w = size
    gh, gw = grid.shape
    rows = np.minimum(np.arange(h) * gh // h, gh - 1)
    cols = np.minimum(np.arange(w) * gw // w, gw - 1)
    return grid[rows[:, None], cols[None, :]]


def heatmap_overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """An RGB image with a (gh, gw) heat grid blended over it."""
    coloured = colourise(grid_to_pixels(heat, image.shape[:2]), 0.0, 1.0)
    return (image.astype(np.float32) * (1 - alpha) + coloured.astype(np.float32) * alpha).astype(np.uint8)


def flag_outline_overlay(image: np.ndarray, flags: np.ndarray, colour=FLAG_COLOUR, width: int = 1) -> Image.Image:
    """The image with a rectangle around every flagged patch of a (gh, gw) bool grid."""
    img = Image.fromarray(image).convert("RGB")
    h, w = image.shape[:2]
    gh, gw = flags.shape
    draw = ImageDraw.Draw(img)
    for r, c in zip(*np.nonzero(flags)):
        y0, y1 = r * h // gh, (r + 1) * h // gh - 1
        x0, x1 = c * w // gw, (c + 1) * w // gw - 1
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=width)
    return img


def guard_overlay(
    image: np.ndarray, saliency: np.ndarray, flags: np.ndarray, scale: int = 1, alpha: float = 0.45
) -> Image.Image:
    """Image + saliency heat + outlines of flagged patches: what a person looks at per prediction."""
    if scale > 1:
        image = np.asarray(Image.fromarray(image).resize((image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST))
    blended = heatmap_overlay(image, saliency, alpha)
    return flag_outline_overlay(blended, flags, width=max(1, scale))


def patch_grid_crop(image: np.ndarray, grid: tuple[int, int], centre: tuple[int, int], span: int = 5) -> np.ndarray:
    """The `span` x `span` patches around `centre` (row, col), clipped at the borders (the seed's patch grid)."""
    h, w = image.shape[:2]
    ph, pw = h // grid[0], w // grid[1]
    half = span // 2
    r0, r1 = max(0, centre[0] - half), min(grid[0], centre[0] + half + 1)
    c0, c1 = max(0, centre[1] - half), min(grid[1], centre[1] + half + 1)
    return image[r0 * ph : r1 * ph, c0 * pw : c1 * pw]


def upscale(image: np.ndarray, factor: int) -> Image.Image:
    img = Image.fromarray(image)
    return img.resize((img.width * factor, img.height * factor), Image.NEAREST) if factor > 1 else img
