"""Focus statistics of heatmaps: how concentrated relevance is, and where it sits.

All statistics use the non-negative part of each map (after `preprocess.remove_floor`),
normalised to a distribution `p` over pixels, so they do not depend on the arbitrary scale of
a CAM:

- `hot_area`: share of pixels at or above half the map's maximum (the "full width at half
  maximum" area). It is what the Clever Hans flags compare: it ignores a weak residue spread
  over the image, which mass-based measures count, and a sharp hot spot scores tiny.
- `effective_area`: exp(entropy(p)) / pixels, the share of the image that effectively carries
  relevance (1 = spread evenly, 1/pixels = one pixel). Its inverse ratio between two groups
  is the "how many times more concentrated" figure the Clever Hans flags quote.
- `focus`: 1 - entropy / log(pixels), in [0, 1] (the entropy-based focus score other SpRAy
  implementations report).
- `gini`: Gini coefficient of the pixel relevances (0 = even, ~1 = all on one pixel).
- `top_mass`: share of relevance in the top 5% of pixels.
- `centroid_y`, `centroid_x`: relevance-weighted centre of the hot region, in [0, 1] image
  coordinates.
- `spread`: relevance-weighted RMS distance of all relevance from its mean position, in
  image-side units.
"""

from __future__ import annotations

import numpy as np

STAT_NAMES = ("hot_area", "effective_area", "focus", "gini", "top_mass", "centroid_y", "centroid_x", "spread")
TOP_SHARE = 0.05
_CHUNK = 8192


def sample_focus(heatmaps: np.ndarray) -> dict[str, np.ndarray]:
    """Per-map statistics of (N, h, w) maps, each an (N,) float64 array."""
    n, height, width = heatmaps.shape
    pixels = height * width
    ys = (np.arange(height) + 0.5) / height
    xs = (np.arange(width) + 0.5) / width
    top_k = max(1, int(np.ceil(TOP_SHARE * pixels)))
    ranks = np.arange(1, pixels + 1, dtype=np.float64)
    out = {name: np.empty(n, dtype=np.float64) for name in STAT_NAMES}
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        flat = np.maximum(heatmaps[start:stop].reshape(stop - start, pixels), 0.0).astype(np.float64)
        total = flat.sum(axis=1, keepdims=True)
        # A map without positive relevance is treated as spread evenly (no focus at all).
        p = np.where(total > 0, flat / np.where(total > 0, total, 1.0), 1.0 / pixels)
        entropy = -np.sum(p * np.log(np.where(p > 0, p, 1.0)), axis=1)
        out["effective_area"][start:stop] = np.exp(entropy) / pixels
        out["focus"][start:stop] = 1.0 - entropy / np.log(pixels) if pixels > 1 else 0.0
        peak = p.max(axis=1, keepdims=True)
        out["hot_area"][start:stop] = np.where(total[:, 0] > 0, (p >= 0.5 * peak).sum(axis=1) / pixels, 1.0)
        ordered = np.sort(p, axis=1)
        out["gini"][start:stop] = (2.0 * (ordered @ ranks) / pixels) - (pixels + 1.0) / pixels
        out["top_mass"][start:stop] = ordered[:, -top_k:].sum(axis=1)
        grid = p.reshape(stop - start, height, width)
        row_mass, col_mass = grid.sum(axis=2), grid.sum(axis=1)
        cy, cx = row_mass @ ys, col_mass @ xs
        var = row_mass @ ys**2 - cy**2 + col_mass @ xs**2 - cx**2
        out["spread"][start:stop] = np.sqrt(np.maximum(var, 0.0))
        # Where the model looks: the centre of the hot region, not of all mass, so a weak
        # residue elsewhere does not drag a hot spot's position towards the middle.
        hot = np.where(p >= 0.5 * peak, p, 0.0).reshape(stop - start, height, width)
        hot /= np.maximum(hot.sum(axis=(1, 2), keepdims=True), 1e-300)
        out["centroid_y"][start:stop] = hot.sum(axis=2) @ ys
        out["centroid_x"][start:stop] = hot.sum(axis=1) @ xs
    return out


def centroid_scatter(stats: dict[str, np.ndarray], members: np.ndarray) -> float:
    """RMS distance of the members' centroids from their mean centroid: how consistently a
    group of maps looks at the same place (an artefact at a fixed position gives ~0)."""
    if members.sum() == 0:
        return 0.0
    cy, cx = stats["centroid_y"][members], stats["centroid_x"][members]
    return float(np.sqrt(np.mean((cy - cy.mean()) ** 2 + (cx - cx.mean()) ** 2)))
