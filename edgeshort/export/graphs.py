"""The torch modules that become a bundle's graphs: the guard as tensors, the split ViT, the fused model.

The key-KNN is written as a distance MatMul + TopK + a vote over the reference labels, with the
reference keys as constants: OpenVINO loads that graph, while skl2onnx's KNN needs operators
it lacks (`ai.onnx.ml.ArrayFeatureExtractor`, `com.microsoft.CDist`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class KeyGuard(nn.Module):
    """Keys (B, N, d) -> flags (dilated, where present), raw flags, shortcut present, keep mask, saliency."""

    def __init__(self, result) -> None:
        super().__init__()
        cfg = result.config
        self.grid = tuple(result.grid)
        self.num_prefix = result.adapter.num_prefix
        self.k = int(result.knn.k)
        self.radius = int(cfg.dilation_radius)
        self.min_patches = int(cfg.min_patches)
        self.saliency_scale = float(result.saliency_scale)
        reference = torch.from_numpy(result.knn.reference).float()
        self.register_buffer("reference", reference)
        self.register_buffer("reference_sq", (reference**2).sum(1))
        self.register_buffer("reference_labels", torch.from_numpy(result.knn.labels).float())
        self.saliency = cfg.saliency
        if self.saliency == "mean":
            self.register_buffer("clean_keys", torch.from_numpy(result.clean_keys).float())
        else:  # the tint's nearest clean key is one of the KNN's negatives (DetectionResult.saliency_maps)
            clean = torch.from_numpy(np.flatnonzero(result.knn.labels == 0))
            self.register_buffer("clean_columns", clean)
            self.register_buffer("clean_reference", reference[clean])

    def forward(self, keys: torch.Tensor):
        b, n, d = keys.shape
        flat = keys.reshape(b * n, d)
        # Squared distances up to the per-query constant |q|^2, which does not change the ranking.
        dist = self.reference_sq[None, :] - 2.0 * flat @ self.reference.T
        _, nearest = torch.topk(dist, self.k, dim=1, largest=False)
        votes = self.reference_labels[nearest].sum(1)
        # Majority of k; a tie goes to "clean", as scikit-learn's vote picks the lower label.
        raw = (votes * 2 > self.k).reshape(b, 1, *self.grid)
        if self.radius > 0:
            size = 2 * self.radius + 1
            dilated = F.max_pool2d(raw.float(), size, stride=1, padding=self.radius) > 0.5
        else:
            dilated = raw
        raw = raw.reshape(b, *self.grid)
        present = raw.reshape(b, n).sum(1) >= self.min_patches
        flags = dilated.reshape(b, *self.grid) & present[:, None, None]
        drop = flags.reshape(b, n)
        keep = torch.cat([torch.ones(b, self.num_prefix, dtype=torch.bool, device=keys.device), ~drop], dim=1)
        if self.saliency == "mean":
            distance = torch.linalg.vector_norm(keys - self.clean_keys[None], dim=-1)
        else:  # DetectionResult.saliency_maps: distance to the nearest clean reference key
            # The KNN's distances rank the clean keys; the nearest one's distance is then measured directly,
            # since from the expansion a key at or next to a clean key (the validation images' own) would get
            # the square root of a rounding error.
            nearest_clean = dist.index_select(1, self.clean_columns).argmin(1)
            distance = torch.linalg.vector_norm(flat - self.clean_reference[nearest_clean], dim=-1).reshape(b, n)
        saliency = (distance / self.saliency_scale).clamp(0.0, 1.0).reshape(b, *self.grid)
        return flags, raw, present, keep, saliency


class EmbedGraph(nn.Module):
    def __init__(self, adapter) -> None:
        super().__init__()
        self.adapter = adapter
        self.model = adapter.model

    def forward(self, images):
        return self.adapter.embed(images)


class PlainGraph(EmbedGraph):
    def __init__(self, adapter) -> None:
        super().__init__(adapter)
        # A submodule, so its weights export with the graph (a distilled model's merged head is no model part).
        self.head = adapter.head_linear()

    def forward(self, images):
        return self.adapter.forward_tokens(self.adapter.embed(images), head=self.head)


class GuardGraph(nn.Module):
    def __init__(self, adapter, guard: KeyGuard, key_layer: int) -> None:
        super().__init__()
        self.adapter, self.model, self.guard, self.key_layer = adapter, adapter.model, guard, key_layer

    def forward(self, tokens):
        return self.guard(self.adapter.keys(tokens, self.key_layer))


class EncoderHeadGraph(nn.Module):
    def __init__(self, adapter, dfr_head: nn.Linear | None) -> None:
        super().__init__()
        self.adapter, self.model, self.dfr_head = adapter, adapter.model, dfr_head
        self.head = adapter.head_linear()

    def forward(self, tokens, keep):
        features = self.adapter.pre_logits(self.adapter.encode(tokens, keep), keep)
        if self.dfr_head is None:
            return self.head(features)
        return self.head(features), self.dfr_head(features)


class GuardedGraph(nn.Module):
    """Image -> ablated logits (+ DFR), flags, raw flags, present, saliency, in one graph.

    Flagged tokens are masked out of attention, which batches naturally; where no shortcut is
    present the keep mask is all true and the ablated logits are the plain ones.
    """

    def __init__(self, adapter, guard: KeyGuard, key_layer: int, dfr_head: nn.Linear | None) -> None:
        super().__init__()
        self.adapter, self.model, self.guard, self.key_layer = adapter, adapter.model, guard, key_layer
        self.head, self.dfr_head = adapter.head_linear(), dfr_head

    def forward(self, images):
        tokens = self.adapter.embed(images)
        flags, raw, present, keep, saliency = self.guard(self.adapter.keys(tokens, self.key_layer))
        features = self.adapter.pre_logits(self.adapter.encode(tokens, keep), keep)
        logits = self.head(features)
        if self.dfr_head is None:
            return logits, flags, raw, present, saliency
        return logits, self.dfr_head(features), flags, raw, present, saliency


def graph_specs(result) -> dict:
    """name -> (module, example inputs, input names, output names, dynamic axes)."""
    adapter = result.adapter
    h, w = adapter.image_size
    dfr = None if result.dfr_head is None else result.dfr_head.to_torch()
    guard = KeyGuard(result).eval()
    key_layer = result.config.key_layer
    dfr_out = ["dfr_logits"] if dfr is not None else []
    images = torch.randn(2, 3, h, w)
    tokens = adapter.embed(images).detach()
    keep = torch.ones(tokens.shape[:2], dtype=torch.bool)
    return {
        "guarded": (GuardedGraph(adapter, guard, key_layer, dfr), (images,), ["images"],
                    ["ablated_logits", *dfr_out, "flags", "raw_flags", "present", "saliency"], {"images": {0: "batch"}}),
        "plain": (PlainGraph(adapter), (images,), ["images"], ["logits"], {"images": {0: "batch"}}),
        "embed": (EmbedGraph(adapter), (images,), ["images"], ["tokens"], {"images": {0: "batch"}}),
        "guard": (GuardGraph(adapter, guard, key_layer), (tokens,), ["tokens"],
                  ["flags", "raw_flags", "present", "keep", "saliency"], {"tokens": {0: "batch"}}),
        "encoder_head": (EncoderHeadGraph(adapter, dfr), (tokens, keep), ["tokens", "keep"], ["logits", *dfr_out],
                         {"tokens": {0: "batch", 1: "tokens"}, "keep": {0: "batch", 1: "tokens"}}),
    }
