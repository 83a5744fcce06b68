"""The ViT adapter interface: everything model-specific sits behind it.

The detector, the export and the runtime only speak to a `ViTAdapter`; one subclass per model
family maps the family's modules onto these few operations.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from edgeshort.errors import InputError, UnsupportedModelError
from edgeshort.runtime.preprocess import Preprocessing

# `set_preprocessing(crop_pct=KEEP)` leaves the crop alone; None is a choice of its own (stretch).
KEEP = object()


class ViTAdapter(ABC):
    """One Vision Transformer seen as: embed -> encoder blocks (with a keep mask) -> head.

    Subclasses set `model`, `family`, `num_prefix`, `grid`, `num_heads`, `preprocessing` and
    implement the abstract methods. `keep` is a (B, P+N) bool tensor; excluded tokens are
    masked out of attention as keys in every block, which equals dropping them.
    """

    family: str = "unknown"

    def __init__(self, model: nn.Module) -> None:
        patch_embedding = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        if patch_embedding is not None and patch_embedding.in_channels != 3:
            # Images reach every model as RGB (grayscale repeated over three channels, as convert("RGB") does).
            raise UnsupportedModelError(
                f"expected a model that takes RGB images (3 input channels), got one whose patch embedding takes "
                f"{patch_embedding.in_channels}; edgeshort feeds grayscale images as RGB with equal channels. For a "
                "model trained on one channel, rebuild it with three and load its weights with the patch embedding's "
                "spread over them (weight.repeat(1, 3, 1, 1) / 3 gives the same outputs on such images)"
            )
        self.model = model.eval()

    # -- model structure ------------------------------------------------------------------
    num_prefix: int
    grid: tuple[int, int]
    num_heads: int
    preprocessing: Preprocessing
    # What the normalisation was guessed for, where the model carries none of its own (e.g. "a timm model without
    # pretrained_cfg"); None once it is the model's or the caller's (set_preprocessing with mean or std).
    preprocessing_assumed: str | None = None

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        return self.num_prefix + self.num_patches

    @property
    def image_size(self) -> tuple[int, int]:
        return self.preprocessing.size

    @property
    def num_classes(self) -> int:
        return self.head_linear().out_features

    @property
    def embed_dim(self) -> int:
        """Width of a token (the key projection's input)."""
        return int(self.key_weights()[0].shape[1])

    @property
    def head_width(self) -> int:
        """Width of the head's input: the token width, twice it for a distilled model's two tokens."""
        return self.head_linear().in_features

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """The class names the model carries in its output order, when it carries real ones."""
        return None

    # -- the interface --------------------------------------------------------------------
    @abstractmethod
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> tokens (B, P+N, D), the first encoder block's input."""

    @abstractmethod
    def encode(self, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens -> output of the last encoder block (before the final norm)."""

    @abstractmethod
    def pre_logits(self, encoded: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Last block output -> the vector the classification head consumes (B, D)."""

    @abstractmethod
    def head_linear(self) -> nn.Linear:
        """The final classification layer (what DFR retrains)."""

    @abstractmethod
    def key_weights(self, layer: int = -1) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """(W_K (D_k, D), b_K or None, num_heads) of the attention in block `layer`."""

    # -- derived operations -----------------------------------------------------------------
    def forward_tokens(
        self, tokens: torch.Tensor, keep: torch.Tensor | None = None, head: nn.Linear | None = None
    ) -> torch.Tensor:
        """Tokens (+ keep mask) -> logits, with `head` in place of the model's own when given."""
        features = self.head_features(tokens, keep)
        return (head or self.head_linear())(features)

    def head_features(self, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        return self.pre_logits(self.encode(tokens, self._check_keep(tokens, keep)), keep)

    def pooled_features(self, images: torch.Tensor) -> torch.Tensor:
        """Mean of the last block's patch-token outputs: the seed's clustering feature."""
        return self.pool(self.encode(self.embed(images)))

    def pool(self, encoded: torch.Tensor) -> torch.Tensor:
        """The clustering feature of already encoded tokens: the mean over the patch tokens (prefix left out)."""
        return encoded[:, self.num_prefix :].mean(dim=1)

    def keys(self, tokens: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """The seed's patch keys: `tokens[:, P:] @ W_K^T`, split per head, mean over heads -> (B, N, d_head).

        As in the seed, the key projection of block `layer` is applied to the embedding tokens
        and its bias is left out: the bias shifts every key by the same vector, so the
        distances the detector uses do not change.
        """
        w_k, _, heads = self.key_weights(layer)
        patches = tokens[:, self.num_prefix :]
        k = patches @ w_k.T
        return k.reshape(k.shape[0], k.shape[1], heads, -1).mean(dim=2)

    def check_images(self, images: torch.Tensor) -> None:
        """Raise a clear error unless `images` is (B, C, H, W) at the model's input size."""
        expected = self.image_size
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != tuple(expected):
            raise InputError(
                f"expected images of shape (B, 3, {expected[0]}, {expected[1]}) for this {self.family} model, "
                f"got {tuple(images.shape)}; bring them to 3 channels (grayscale repeated) at {expected[0]}x"
                f"{expected[1]} (edgeshort's datasets do this from the adapter's preprocessing)"
            )

    def _check_keep(self, tokens: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor | None:
        if keep is None:
            return None
        if keep.shape != tokens.shape[:2] or keep.dtype != torch.bool:
            raise InputError(
                f"expected a bool keep mask of shape {tuple(tokens.shape[:2])}, got "
                f"{keep.dtype} {tuple(keep.shape)}; pass one entry per token (prefix tokens included)"
            )
        if not bool(keep[:, : self.num_prefix].all()):
            raise InputError("expected every prefix (class/register) token to be kept; mask only patch tokens")
        return keep

    def set_preprocessing(self, mean=None, std=None, interpolation: str | None = None, crop_pct=KEEP,
                          crop_mode: str | None = None) -> ViTAdapter:
        """Use the normalisation, resize filter and crop the model was trained with (the size is the model's).

        `crop_pct` None stretches the whole image to the input size; a fraction takes a centre crop
        (see `Preprocessing`); left out, the current choice stays."""
        from dataclasses import replace

        current = self.preprocessing
        if mean is not None or std is not None:
            self.preprocessing_assumed = None
        self.preprocessing = replace(
            current,
            mean=current.mean if mean is None else tuple(mean),
            std=current.std if std is None else tuple(std),
            interpolation=interpolation or current.interpolation,
            crop_pct=current.crop_pct if crop_pct is KEEP else crop_pct,
            crop_mode=crop_mode or current.crop_mode,
        )
        return self

    def describe(self) -> dict:
        """What export writes into a bundle manifest about this model."""
        return {
            "family": self.family,
            "grid": list(self.grid),
            "num_prefix": self.num_prefix,
            "num_heads": self.num_heads,
            "embed_dim": self.embed_dim,
            "head_width": self.head_width,
            "num_classes": self.num_classes,
            "preprocessing": self.preprocessing.to_dict(),
        }


def grid_from_sizes(image_size: tuple[int, int], patch_size: tuple[int, int]) -> tuple[int, int]:
    """Token grid of a ViT derived from image and patch size (never assumed)."""
    return (image_size[0] // patch_size[0], image_size[1] // patch_size[1])


def attention_with_keep(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None
) -> torch.Tensor:
    """Scaled dot-product attention over (B, H, T, d) with excluded tokens masked out as keys."""
    mask = None if keep is None else keep[:, None, None, :].to(torch.bool)
    return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, t, d = x.shape
    return x.reshape(b, t, num_heads, d // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)
