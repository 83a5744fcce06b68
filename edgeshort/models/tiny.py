"""edgeshort's own tiny Vision Transformer (pure torch), used by the demo and the fast tests.

It mirrors timm's layout (fused `qkv`, pre-norm blocks, class token then register tokens) so
the same adapter code paths and the ONNX export are exercised on it, and every block takes a
`keep` mask that excludes tokens from attention.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from edgeshort.models.base import attention_with_keep


@dataclass(frozen=True)
class TinyViTConfig:
    image_size: int = 64
    patch_size: int = 8
    in_channels: int = 3
    dim: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 2.0
    num_classes: int = 2
    num_register_tokens: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = attention_with_keep(q, k, v, keep)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), keep)
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """A small ViT: `forward(images)` equals `forward_tokens(embed(images))`."""

    def __init__(self, config: TinyViTConfig | None = None, **overrides) -> None:
        super().__init__()
        config = config or TinyViTConfig()
        if overrides:
            config = TinyViTConfig(**{**config.to_dict(), **overrides})
        if config.image_size % config.patch_size:
            raise ValueError(
                f"image_size {config.image_size} must be a multiple of patch_size {config.patch_size}"
            )
        self.config = config
        self.grid = (config.image_size // config.patch_size,) * 2
        self.num_prefix_tokens = 1 + config.num_register_tokens
        num_patches = self.grid[0] * self.grid[1]
        self.patch_embed = nn.Conv2d(config.in_channels, config.dim, config.patch_size, config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.dim))
        self.reg_token = (
            nn.Parameter(torch.zeros(1, config.num_register_tokens, config.dim))
            if config.num_register_tokens
            else None
        )
        self.pos_embed = nn.Parameter(torch.randn(1, self.num_prefix_tokens + num_patches, config.dim) * 0.02)
        self.blocks = nn.ModuleList(
            Block(config.dim, config.num_heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(config.dim, eps=1e-6)
        self.head = nn.Linear(config.dim, config.num_classes)
        nn.init.normal_(self.cls_token, std=0.02)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=0.02)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed(images).flatten(2).transpose(1, 2)
        prefix = [self.cls_token.expand(images.shape[0], -1, -1)]
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(images.shape[0], -1, -1))
        return torch.cat([*prefix, patches], dim=1) + self.pos_embed

    def encode(self, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """The blocks' output (before the final norm)."""
        for block in self.blocks:
            tokens = block(tokens, keep)
        return tokens

    def forward_head(self, encoded: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        features = self.norm(encoded)[:, 0]
        return features if pre_logits else self.head(features)

    def forward_tokens(self, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_head(self.encode(tokens, keep))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(self.embed(images))
