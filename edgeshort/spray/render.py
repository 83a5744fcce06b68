"""PNG rendering of heatmaps with Pillow only (a colour map table, no matplotlib)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

# Anchor colours of matplotlib's "inferno" (dark = no relevance, bright = high), interpolated
# linearly to 256 entries: perceptually ordered and readable in greyscale print.
_INFERNO_ANCHORS = np.array(
    [
        [0, 0, 4],
        [40, 11, 84],
        [101, 21, 110],
        [159, 42, 99],
        [212, 72, 66],
        [245, 125, 21],
        [250, 193, 39],
        [252, 255, 164],
    ],
    dtype=np.float64,
)
RISK_COLOURS = {"none": (90, 90, 90), "low": (200, 170, 40), "medium": (235, 120, 20), "high": (220, 30, 30)}


def colour_table() -> np.ndarray:
    """(256, 3) uint8 colour map."""
    positions = np.linspace(0.0, 1.0, len(_INFERNO_ANCHORS))
    steps = np.linspace(0.0, 1.0, 256)
    table = np.stack([np.interp(steps, positions, _INFERNO_ANCHORS[:, c]) for c in range(3)], axis=1)
    return np.round(table).astype(np.uint8)


def colourise(heatmap: np.ndarray) -> np.ndarray:
    """(H, W) relevance -> (H, W, 3) uint8, scaled to its own [min, max] (a flat map is dark)."""
    values = np.asarray(heatmap, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return colour_table()[np.round(scaled * 255).astype(np.int64)]


def heatmap_grid(
    heatmaps: Sequence[np.ndarray],
    captions: Sequence[str],
    border_colours: Sequence[tuple[int, int, int]] | None = None,
    cell_size: int = 160,
    columns: int | None = None,
):
    """A Pillow image with one captioned, colour-mapped cell per heatmap."""
    from PIL import Image, ImageDraw, ImageFont

    count = len(heatmaps)
    columns = columns or min(count, 4)
    rows = -(-count // columns)
    caption_height, border = 30, 4
    cell_w, cell_h = cell_size + 2 * border, cell_size + 2 * border + caption_height
    canvas = Image.new("RGB", (columns * cell_w, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for index, (heatmap, caption) in enumerate(zip(heatmaps, captions)):
        left, top = (index % columns) * cell_w, (index // columns) * cell_h
        colour = border_colours[index] if border_colours else (255, 255, 255)
        draw.rectangle([left, top, left + cell_w - 1, top + cell_size + 2 * border - 1], fill=colour)
        tile = Image.fromarray(colourise(heatmap)).resize((cell_size, cell_size), Image.Resampling.BILINEAR)
        canvas.paste(tile, (left + border, top + border))
        for line_no, line in enumerate(caption.split("\n")[:2]):
            draw.text((left + border, top + cell_size + 2 * border + 2 + 13 * line_no), line, fill=(0, 0, 0), font=font)
    return canvas


def save_heatmap_grid(path: str | Path, *args, **kwargs) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    heatmap_grid(*args, **kwargs).save(path, format="PNG")
    return path
