"""Flag-grid operations of the offline detector and bench's seed-style pipeline (numpy only); the runtime's
dilation is inside the exported guard graph."""

from __future__ import annotations

import numpy as np


def dilate(flags: np.ndarray, radius: int) -> np.ndarray:
    """Grow flagged patches to their neighbours within `radius` (radius 1 = the 8 neighbours).

    `flags` is (..., gh, gw) bool. A square structuring element, as the seed's 8-neighbour rule;
    written with shifted maxima because it is a few lines and keeps the runtime scipy-free.
    """
    flags = np.asarray(flags, dtype=bool)
    if radius <= 0:
        return flags.copy()
    out = flags.copy()
    gh, gw = flags.shape[-2:]
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy == 0 and dx == 0:
                continue
            src = flags[..., max(0, -dy) : gh - max(0, dy), max(0, -dx) : gw - max(0, dx)]
            out[..., max(0, dy) : gh - max(0, -dy), max(0, dx) : gw - max(0, -dx)] |= src
    return out


def keep_mask(flags: np.ndarray, num_prefix: int, present: np.ndarray) -> np.ndarray:
    """(B, gh, gw) dilated flags -> (B, P+N) bool keep mask; images without a shortcut keep everything."""
    b = flags.shape[0]
    keep = np.ones((b, num_prefix + flags[0].size), dtype=bool)
    keep[:, num_prefix:] = ~(flags.reshape(b, -1) & np.asarray(present, bool)[:, None])
    return keep
