"""Evenly spaced picks, shared by every place that thins a sequence without favouring one end."""

from __future__ import annotations

import numpy as np


def evenly_spaced(items: np.ndarray, count: int) -> np.ndarray:
    """`count` of `items` (along the first axis) at evenly spaced positions, first and last included;
    all of them when there are no more than `count`."""
    if count >= len(items):
        return items
    return items[np.linspace(0, len(items) - 1, count).round().astype(np.int64)]
