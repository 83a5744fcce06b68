"""Batched extraction of what the detector needs from a model on a dataset, cached to `.npz`."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from edgeshort._progress import progress_bar
from edgeshort.data import ImageDataset
from edgeshort.data.dataset import input_digests
from edgeshort.models import ViTAdapter

logger = logging.getLogger(__name__)


@dataclass
class Features:
    pooled: np.ndarray  # (N, D) mean of the last block's patch tokens
    keys: np.ndarray  # (N, gh*gw, d_head) seed keys
    logits: np.ndarray  # (N, C)
    head_features: np.ndarray  # (N, F) what the classification head reads (pre-logits), unmasked
    digests: np.ndarray  # (N,) `input_digests` of the images as the model saw them: an order of their own

    def save(self, path: Path, fingerprint: str) -> None:
        # Uncompressed: float features barely compress (7% on vit_b_16's keys), and compressing took 27x as long.
        np.savez(path, pooled=self.pooled, keys=self.keys, logits=self.logits, head_features=self.head_features,
                 digests=self.digests, fingerprint=fingerprint)

    @classmethod
    def load(cls, path: Path, fingerprint: str | None = None) -> Features | None:
        if not path.is_file():
            return None
        with np.load(path) as data:
            if fingerprint is not None and str(data["fingerprint"]) != fingerprint:
                return None
            if not {"head_features", "digests"} <= set(data.files):  # a cache from before they were kept: again
                return None
            return cls(data["pooled"], data["keys"], data["logits"], data["head_features"], data["digests"])


def weights_fingerprint(model) -> str:
    """sha256 of a model's weights (every state-dict tensor, in order)."""
    h = hashlib.sha256()
    for tensor in model.state_dict().values():
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def fingerprint(adapter: ViTAdapter, dataset: ImageDataset, key_layer: int, weights: str | None = None) -> str:
    """Hash of everything the features depend on: the model's weights and preprocessing, the
    images (pixels, or each file's path, size and modification time) and labels, and the key layer.
    `weights` is the model's `weights_fingerprint` when the caller has it already."""
    h = hashlib.sha256((weights or weights_fingerprint(adapter.model)).encode())
    h.update(json.dumps(adapter.preprocessing.to_dict(), sort_keys=True).encode())
    h.update(dataset.labels.tobytes())
    h.update(str(key_layer).encode())
    if isinstance(dataset.sources, np.ndarray):
        h.update(dataset.sources.tobytes())
    else:
        for source in dataset.sources:
            h.update(_source_stamp(source))
    return h.hexdigest()


def _source_stamp(source) -> bytes:
    """One image's identity: a file's path, size and mtime (so an image replaced under the same
    name is read again), or an in-memory image's pixels."""
    if isinstance(source, (str, Path)):
        try:
            stat = Path(source).stat()
        except OSError:
            return f"{source}\n".encode()  # reading it will raise the error that names the file
        return f"{source}|{stat.st_size}|{stat.st_mtime_ns}\n".encode()
    if isinstance(source, np.ndarray):
        return f"{source.shape}{source.dtype}".encode() + source.tobytes()
    if isinstance(source, Image.Image):
        return f"{source.size}{source.mode}".encode() + source.tobytes()
    return f"{source!r}\n".encode()


def extract(
    adapter: ViTAdapter,
    dataset: ImageDataset,
    batch_size: int = 64,
    key_layer: int = -1,
    progress: bool = True,
    cache: Path | None = None,
    weights: str | None = None,
) -> Features:
    """Pooled features, seed keys, logits and head features for every image, one batched forward per batch."""
    import torch

    stamp = fingerprint(adapter, dataset, key_layer, weights) if cache is not None else None
    if cache is not None:
        cached = Features.load(cache, stamp)
        if cached is not None:
            logger.info("reusing cached features from %s", cache)
            return cached
    pooled, keys, logits, head_features, digests = [], [], [], [], []
    batches = dataset.batches(adapter.preprocessing, batch_size)
    total = (len(dataset) + batch_size - 1) // batch_size
    with torch.inference_mode():
        for _, images in progress_bar(batches, progress, f"extracting {dataset.name}", total):
            digests.append(input_digests(images))
            x = torch.from_numpy(images)
            tokens = adapter.embed(x)
            encoded = adapter.encode(tokens)
            pooled.append(adapter.pool(encoded).numpy())
            keys.append(adapter.keys(tokens, key_layer).numpy())
            pre_logits = adapter.pre_logits(encoded)
            head_features.append(pre_logits.numpy())
            logits.append(adapter.head_linear()(pre_logits).numpy())
    features = Features(np.concatenate(pooled), np.concatenate(keys), np.concatenate(logits),
                        np.concatenate(head_features), np.concatenate(digests))
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        features.save(cache, stamp)
    return features
