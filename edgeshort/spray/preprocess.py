"""Heatmap preprocessing for SpRAy: anti-aliased (area) downsampling and normalisation."""

from __future__ import annotations

import numpy as np

# Maps are processed in chunks so that 50,000 maps of 64x64 never need a float64 copy.
_CHUNK = 4096


def area_matrix(source: int, target: int) -> np.ndarray:
    """(target, source) matrix whose rows average the source cells each target cell covers.

    This is exact box/area resampling (what OpenCV calls INTER_AREA): every source cell
    contributes in proportion to its overlap, so a one-pixel hot spot is kept as mass rather
    than skipped or aliased, as point sampling or bilinear zoom would do.
    """
    if target >= source:
        return np.eye(source, dtype=np.float32)
    edges = np.linspace(0.0, source, target + 1)
    cells = np.arange(source, dtype=np.float64)
    overlap = np.clip(np.minimum(edges[1:, None], cells[None, :] + 1) - np.maximum(edges[:-1, None], cells[None, :]), 0.0, None)
    return (overlap / overlap.sum(axis=1, keepdims=True)).astype(np.float32)


def target_shape(shape: tuple[int, int], downsample_size: int | None) -> tuple[int, int]:
    """Processing resolution: the longer side becomes `downsample_size`, never upsampled."""
    height, width = shape
    if downsample_size is None or max(height, width) <= downsample_size:
        return height, width
    scale = downsample_size / max(height, width)
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def downsample(heatmaps: np.ndarray, downsample_size: int | None) -> np.ndarray:
    """(N, H, W) -> (N, h, w) float32 by area averaging."""
    n, height, width = heatmaps.shape
    out_h, out_w = target_shape((height, width), downsample_size)
    if (out_h, out_w) == (height, width):
        return np.asarray(heatmaps, dtype=np.float32)
    rows, cols = area_matrix(height, out_h), area_matrix(width, out_w)
    out = np.empty((n, out_h, out_w), dtype=np.float32)
    for start in range(0, n, _CHUNK):
        chunk = np.asarray(heatmaps[start : start + _CHUNK], dtype=np.float32)
        out[start : start + _CHUNK] = rows @ (chunk @ cols.T)
    return out


def remove_floor(heatmaps: np.ndarray) -> np.ndarray:
    """Subtract each map's median and keep the positive part, (N, h, w) float32.

    CAMs are min-max scaled per image, so a weak but image-wide background (noise, a bias of
    the last layer) keeps a floor that would carry most of the relevance *mass* and make a
    sharp hot spot look diffuse. The median is a robust estimate of that floor: relevance
    that covers less than half of the image is kept whole. Negative relevance (LRP, signed
    CAMs) is dropped: SpRAy compares where a model finds evidence *for* its output.
    """
    out = np.empty(heatmaps.shape, dtype=np.float32)
    for start in range(0, heatmaps.shape[0], _CHUNK):
        chunk = np.asarray(heatmaps[start : start + _CHUNK], dtype=np.float32)
        floor = np.median(chunk.reshape(len(chunk), -1), axis=1)
        out[start : start + _CHUNK] = np.maximum(chunk - np.maximum(floor, 0.0)[:, None, None], 0.0)
    return out


def normalise(heatmaps: np.ndarray) -> np.ndarray:
    """Flattened maps with non-negative relevance scaled to unit length, shape (N, h*w).

    Unit length makes the dot product the cosine similarity and removes the per-image scale
    that CAM methods leave arbitrary.
    """
    flat = np.maximum(heatmaps.reshape(heatmaps.shape[0], -1), 0.0).astype(np.float32, copy=False)
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    return flat / np.maximum(norms, np.float32(1e-12))
