"""Adapters for the supported ViT families: edgeshort's tiny ViT, torchvision, timm, transformers."""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from edgeshort.errors import UnsupportedModelError
from edgeshort.models.base import (
    Preprocessing,
    ViTAdapter,
    attention_with_keep,
    grid_from_sizes,
    merge_heads,
    split_heads,
)
from edgeshort.models.tiny import TinyViT
from edgeshort.runtime.preprocess import CROP_MODES

logger = logging.getLogger(__name__)


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


class TinyViTAdapter(ViTAdapter):
    family = "tiny"

    # The demo data is drawn on a neutral background, so the tiny ViT normalises to [-1, 1].
    DEFAULT_PREPROCESSING = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear")

    def __init__(self, model: TinyViT, preprocessing: Preprocessing | None = None) -> None:
        super().__init__(model)
        cfg = model.config
        self.num_prefix = model.num_prefix_tokens
        self.grid = model.grid
        self.num_heads = cfg.num_heads
        self.preprocessing = preprocessing or Preprocessing(
            size=(cfg.image_size, cfg.image_size), **self.DEFAULT_PREPROCESSING
        )

    def embed(self, images):
        self.check_images(images)
        return self.model.embed(images)

    def encode(self, tokens, keep=None):
        return self.model.encode(tokens, keep)

    def pre_logits(self, encoded, keep=None):
        return self.model.forward_head(encoded, pre_logits=True)

    def head_linear(self):
        return self.model.head

    def key_weights(self, layer=-1):
        attn = self.model.blocks[layer].attn
        d = attn.qkv.in_features
        return attn.qkv.weight[d : 2 * d], attn.qkv.bias[d : 2 * d], attn.num_heads


class TorchvisionViTAdapter(ViTAdapter):
    family = "torchvision"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.num_prefix = 1
        self.grid = grid_from_sizes(_pair(model.image_size), _pair(model.patch_size))
        self.num_heads = model.encoder.layers[0].self_attention.num_heads
        self.preprocessing = Preprocessing(size=_pair(model.image_size))
        self.preprocessing_assumed = "a torchvision model, which carries no normalisation of its own (ImageNet's assumed)"

    def embed(self, images):
        self.check_images(images)
        patches = self.model._process_input(images)
        cls = self.model.class_token.expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches], dim=1) + self.model.encoder.pos_embedding

    def encode(self, tokens, keep=None):
        padding = None if keep is None else ~keep
        x = tokens
        for layer in self.model.encoder.layers:
            y = layer.ln_1(x)
            y, _ = layer.self_attention(y, y, y, key_padding_mask=padding, need_weights=False)
            x = x + y
            x = x + layer.mlp(layer.ln_2(x))
        return x

    def pre_logits(self, encoded, keep=None):
        x = self.model.encoder.ln(encoded)[:, 0]
        heads = self.model.heads
        if hasattr(heads, "pre_logits"):
            x = heads.act(heads.pre_logits(x))
        return x

    def head_linear(self):
        return self.model.heads.head

    def key_weights(self, layer=-1):
        attn = self.model.encoder.layers[layer].self_attention
        d = attn.embed_dim
        bias = None if attn.in_proj_bias is None else attn.in_proj_bias[d : 2 * d]
        return attn.in_proj_weight[d : 2 * d], bias, attn.num_heads


def _timm_crop(cfg: dict) -> dict:
    """The crop of timm's own evaluation transform (`resolve_data_config` + `create_transform`)."""
    mode = cfg.get("crop_mode") or "center"
    crop_pct = cfg.get("crop_pct")
    if crop_pct is None or (mode == "squash" and crop_pct == 1.0):  # squash without a crop is a plain stretch
        return {"crop_pct": None}
    if mode not in CROP_MODES:
        logger.warning(
            "timm crop_mode %r is not supported; using a centre crop of %s. If the model was evaluated "
            "otherwise, pass its geometry with set_preprocessing(crop_pct=..., crop_mode=...)", mode, crop_pct,
        )
        mode = "center"
    return {"crop_pct": float(crop_pct), "crop_mode": mode}


class TimmViTAdapter(ViTAdapter):
    """timm `VisionTransformer` incl. register tokens and DeiT's distillation token."""

    family = "timm"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        if getattr(model, "attn_pool", None) is not None or model.global_pool not in ("token", "avg"):
            raise UnsupportedModelError(
                f"expected a timm ViT with global_pool 'token' or 'avg', got {model.global_pool!r}; "
                "create it with global_pool='token' (or 'avg')"
            )
        if getattr(model, "dynamic_img_size", False):
            raise UnsupportedModelError(
                "expected a timm ViT with a fixed image size, got dynamic_img_size=True; "
                "create it with dynamic_img_size=False"
            )
        self.distilled = getattr(model, "dist_token", None) is not None
        self._merged_head = None  # the cls and distillation heads as one layer (head_linear)
        self.num_prefix = model.num_prefix_tokens
        self.grid = tuple(model.patch_embed.grid_size)
        self.num_heads = model.blocks[0].attn.num_heads
        cfg = getattr(model, "pretrained_cfg", None) or {}
        self.preprocessing = Preprocessing(
            size=tuple(model.patch_embed.img_size),
            mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
            std=tuple(cfg.get("std", (0.229, 0.224, 0.225))),
            interpolation=cfg.get("interpolation", "bicubic"),
            **_timm_crop(cfg),
        )
        if "mean" not in cfg:
            self.preprocessing_assumed = "a timm model without a pretrained_cfg (ImageNet's normalisation assumed)"

    def embed(self, images):
        self.check_images(images)
        m = self.model
        return m.norm_pre(m._pos_embed(m.patch_embed(images)))

    def encode(self, tokens, keep=None):
        mask = None if keep is None else keep[:, None, None, :]
        x = tokens
        for block in self.model.blocks:
            x = block(x, attn_mask=mask) if mask is not None else block(x)
        return x

    def pre_logits(self, encoded, keep=None):
        m = self.model
        x = m.norm(encoded)
        if self.distilled:
            # DeiT averages head(cls) and head_dist(dist); as one linear map on [cls, dist].
            return torch.cat([x[:, 0], x[:, 1]], dim=-1)
        if m.global_pool == "avg":
            patches = x[:, self.num_prefix :]
            if keep is None:
                x = patches.mean(dim=1)
            else:
                weights = keep[:, self.num_prefix :, None].to(patches.dtype)
                x = (patches * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        else:
            x = x[:, 0]
        return m.fc_norm(x)

    def head_linear(self):
        if not self.distilled:
            return self.model.head
        # Built once: every caller (export graphs, DFR, predictions) shares one layer.
        if self._merged_head is None:
            head, dist = self.model.head, self.model.head_dist
            merged = nn.Linear(head.in_features * 2, head.out_features).requires_grad_(False)
            with torch.no_grad():
                merged.weight.copy_(torch.cat([head.weight, dist.weight], dim=1) / 2)
                merged.bias.copy_((head.bias + dist.bias) / 2)
            self._merged_head = merged.eval()
        return self._merged_head

    def key_weights(self, layer=-1):
        attn = self.model.blocks[layer].attn
        d = attn.qkv.in_features
        bias = None if attn.qkv.bias is None else attn.qkv.bias[d : 2 * d]
        return attn.qkv.weight[d : 2 * d], bias, attn.num_heads


class TransformersViTAdapter(ViTAdapter):
    """transformers `ViTForImageClassification` (module names of 4.x and 5.x)."""

    family = "transformers"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        cfg = model.config
        self.num_prefix = 1
        self.grid = grid_from_sizes(_pair(cfg.image_size), _pair(cfg.patch_size))
        self.num_heads = cfg.num_attention_heads
        self.preprocessing = Preprocessing(
            size=_pair(cfg.image_size), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear"
        )
        # A save_pretrained folder's preprocessor_config.json replaces it (load_adapter_file).
        self.preprocessing_assumed = "a transformers model without a preprocessor_config.json (ViT's 0.5 assumed)"

    @property
    def class_names(self) -> tuple[str, ...] | None:
        labels = getattr(self.model.config, "id2label", None) or {}
        names = tuple(str(labels[i]) for i in sorted(labels, key=int))
        # transformers names unnamed classes LABEL_0, LABEL_1, ...: those say nothing about the order.
        if len(names) != self.num_classes or all(re.fullmatch(r"LABEL_\d+", n) for n in names):
            return None
        return names

    @staticmethod
    def _projections(layer) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
        attn = layer.attention
        if hasattr(attn, "q_proj"):  # transformers >= 5
            return attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        inner = attn.attention
        return inner.query, inner.key, inner.value, attn.output.dense

    @staticmethod
    def _mlp(layer, x):
        if hasattr(layer, "mlp"):  # transformers >= 5
            return layer.mlp(x)
        return layer.output.dense(layer.intermediate(x))

    def _layers(self):
        vit = self.model.vit
        return vit.layers if hasattr(vit, "layers") else vit.encoder.layer  # >= 5 / 4.x

    def embed(self, images):
        self.check_images(images)
        return self.model.vit.embeddings(images)

    def encode(self, tokens, keep=None):
        x = tokens
        for layer in self._layers():
            q_proj, k_proj, v_proj, o_proj = self._projections(layer)
            y = layer.layernorm_before(x)
            heads = [split_heads(p(y), self.num_heads) for p in (q_proj, k_proj, v_proj)]
            x = x + o_proj(merge_heads(attention_with_keep(*heads, keep)))
            x = x + self._mlp(layer, layer.layernorm_after(x))
        return x

    def pre_logits(self, encoded, keep=None):
        return self.model.vit.layernorm(encoded)[:, 0]

    def head_linear(self):
        return self.model.classifier

    def key_weights(self, layer=-1):
        _, k_proj, _, _ = self._projections(self._layers()[layer])
        return k_proj.weight, k_proj.bias, self.num_heads
