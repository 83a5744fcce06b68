"""Drawing with numpy + Pillow only, so the runtime's overlays and the offline pictures share it.

Patch cells are laid out by `cell_edges` everywhere (heat, outlines, crops): when an image's
side is not a multiple of the grid, a flagged cell is outlined exactly where its heat is drawn.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from edgeshort.errors import InputError

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


def cell_edges(pixels: int, cells: int) -> np.ndarray:
    """Pixel boundaries of `cells` patch cells over `pixels`: cell i covers [edges[i], edges[i + 1]).

    Pixel p belongs to cell floor(p * cells / pixels), the rule `grid_to_pixels` uses, so cell i
    starts at ceil(i * pixels / cells).
    """
    return -(-np.arange(cells + 1) * pixels // cells)


def colourise(values: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """(H, W) float -> (H, W, 3) uint8 with the hot colour map, scaled to [lo, hi]."""
    values = np.asarray(values, dtype=np.float64)
    lo = float(np.nanmin(values)) if lo is None else lo
    hi = float(np.nanmax(values)) if hi is None else hi
    scaled = np.clip((values - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    return HOT[np.nan_to_num(scaled * 255).astype(np.uint8)]


def grid_to_pixels(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour upsampling of a (gh, gw[, C]) patch grid to (H, W[, C]): each patch covers its pixels."""
    h, w = size
    gh, gw = grid.shape[:2]
    rows = np.minimum(np.arange(h) * gh // h, gh - 1)
    cols = np.minimum(np.arange(w) * gw // w, gw - 1)
    return grid[rows[:, None], cols[None, :]]


def _check_image(image: np.ndarray, name: str = "image") -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise InputError(
            f"expected {name} as a uint8 (H, W, 3) RGB array, got {image.dtype} {image.shape}; "
            "pass np.asarray(pil_image.convert('RGB'))"
        )
    return image


def _check_grid(grid: np.ndarray, image: np.ndarray, name: str) -> np.ndarray:
    grid = np.asarray(grid)
    if grid.ndim != 2:
        raise InputError(f"expected {name} as a 2-D (gh, gw) patch grid, got shape {grid.shape}")
    if grid.shape[0] > image.shape[0] or grid.shape[1] > image.shape[1]:
        raise InputError(
            f"expected an image of at least {grid.shape[0]}x{grid.shape[1]} pixels for a {name} grid of that size, "
            f"got {image.shape[0]}x{image.shape[1]}; draw on a larger image"
        )
    return grid


# How strongly a key heatmap covers its image (the report's colour key says so).
HEAT_ALPHA = 0.5


def heatmap_overlay(image: np.ndarray, heat: np.ndarray, alpha: float = HEAT_ALPHA) -> np.ndarray:
    """An RGB image with a (gh, gw) heat grid (values in [0, 1]) blended over it."""
    image = _check_image(image)
    heat = _check_grid(heat, image, "heat")
    coloured = grid_to_pixels(colourise(heat, 0.0, 1.0), image.shape[:2])  # colour the cells, then spread them
    return (image.astype(np.float32) * (1 - alpha) + coloured.astype(np.float32) * alpha).astype(np.uint8)


def flag_outline_overlay(image: np.ndarray, flags: np.ndarray, colour=FLAG_COLOUR, width: int = 1) -> Image.Image:
    """The image with a rectangle around every flagged patch of a (gh, gw) bool grid.

    Each rectangle lies on the outermost `width` pixels inside its cell, so outlines never
    cover a neighbouring cell that was not flagged.
    """
    image = _check_image(image)
    flags = _check_grid(flags, image, "flag").astype(bool)
    img = Image.fromarray(image)
    ys = cell_edges(image.shape[0], flags.shape[0])
    xs = cell_edges(image.shape[1], flags.shape[1])
    draw = ImageDraw.Draw(img)
    for r, c in zip(*np.nonzero(flags)):
        draw.rectangle([int(xs[c]), int(ys[r]), int(xs[c + 1]) - 1, int(ys[r + 1]) - 1], outline=colour, width=width)
    return img


# How strongly the saliency tint covers an image (predict's overlays and the report's flag pictures alike).
TINT_ALPHA = 0.45


def guard_overlay(
    image: np.ndarray, saliency: np.ndarray, flags: np.ndarray, scale: int = 1, alpha: float = TINT_ALPHA
) -> Image.Image:
    """Image + saliency heat + outlines of flagged patches: what a person looks at per prediction.

    `saliency` and `flags` are patch grids of the same shape; `scale` enlarges the image first
    (nearest neighbour) so the outlines of small images stay visible.
    """
    image = _check_image(image)
    saliency, flags = np.asarray(saliency), np.asarray(flags)
    if saliency.shape != flags.shape:
        raise InputError(
            f"expected saliency and flags on the same patch grid, got {saliency.shape} and {flags.shape}"
        )
    if scale > 1:
        image = np.asarray(Image.fromarray(image).resize((image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST))
    blended = heatmap_overlay(image, saliency, alpha)
    return flag_outline_overlay(blended, flags, width=max(1, scale))


def patch_grid_crop(image: np.ndarray, grid: tuple[int, int], centre: tuple[int, int], span: int = 5) -> np.ndarray:
    """The `span` x `span` patches around `centre` (row, col), clipped at the borders (the seed's patch grid)."""
    h, w = image.shape[:2]
    ys, xs = cell_edges(h, grid[0]), cell_edges(w, grid[1])
    half = span // 2
    r0, r1 = max(0, centre[0] - half), min(grid[0], centre[0] + half + 1)
    c0, c1 = max(0, centre[1] - half), min(grid[1], centre[1] + half + 1)
    return image[ys[r0] : ys[r1], xs[c0] : xs[c1]]


def upscale(image: np.ndarray, factor: int) -> Image.Image:
    img = Image.fromarray(image)
    return img.resize((img.width * factor, img.height * factor), Image.NEAREST) if factor > 1 else img
