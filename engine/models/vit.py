"""ViT-Tiny: a small Vision Transformer student, written with torch.nn (LayerNorm, no BatchNorm).

Width 192, depth 12, 3 heads, MLP 768 (DeiT-Tiny's shape), pre-norm blocks, learned position
embeddings, no class token: the features are the mean of the final (LayerNorm-ed) patch tokens, the
global-average-pooling head of Beyer et al. 2022, "Better plain ViT baselines for ImageNet-1k".
Having no BatchNorm, it cannot be a recover teacher (BN matching); it is meant as a student
(``evaluate.student=vit_tiny``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MAX_PATCH = 16
"""ImageNet's patch (224 px -> a 14x14 token grid)."""
MIN_GRID = 7
"""Fewest tokens per side: 28 px MNIST then keeps its customary patch 4 (7x7), not 2 (14x14)."""


def patch_size_for(image_size: int) -> int:
    """The patch side for square images of ``image_size`` px: the largest divisor p of the side with
    p <= 16 and side / p >= 7 tokens per side. 224 -> 16 (14x14 tokens), 64 -> 8 (8x8), 32 -> 4 (8x8),
    28 -> 4 (7x7), 8 -> 1 (8x8). A side with no other divisor in range gets p = 1 (one token per pixel,
    quadratic attention cost), and a side under 7 px has none at all."""
    if image_size < MIN_GRID:
        raise ValueError(f"a ViT needs images of at least {MIN_GRID}px (a {MIN_GRID}x{MIN_GRID} token grid); "
                         f"got {image_size}px")
    return max(p for p in range(1, MAX_PATCH + 1) if image_size % p == 0 and image_size // p >= MIN_GRID)


class Attention(nn.Module):
    """Multi-head self-attention through F.scaled_dot_product_attention. Under ``deterministic=true``
    PyTorch's dispatcher leaves out the fused kernels without a deterministic backward (cuDNN's): on an
    H200 (torch 2.11) two backward passes at 197 tokens were bitwise equal in fp32 and bf16."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head dim)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x)) with GELU."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Patch embedding (a conv with kernel = stride = patch), position embeddings, ``depth`` blocks, final
    LayerNorm, mean over tokens. Returns pooled features [N, width]; the classifier lives outside.

    The position embeddings are learned for the ``image_size`` it is built for; other input sizes are
    refused (every stage resamples its crops to the data's image size)."""

    def __init__(self, in_channels: int, image_size: int, width: int = 192, depth: int = 12, heads: int = 3,
                 mlp_dim: int = 768) -> None:
        super().__init__()
        self.image_size = image_size
        self.patch = patch_size_for(image_size)
        self.grid = image_size // self.patch
        self.patch_embed = nn.Conv2d(in_channels, width, kernel_size=self.patch, stride=self.patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid, width))
        self.blocks = nn.Sequential(*[Block(width, heads, mlp_dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.out_dim = width
        self._init_weights()

    def _init_weights(self) -> None:
        # timm's ViT init: truncated normal (std 0.02) for the position embeddings and linear weights.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"this ViT was built for {self.image_size}px images (patch {self.patch}) but got "
                             f"{tuple(x.shape[-2:])}")
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        return self.norm(self.blocks(tokens)).mean(dim=1)


def vit_tiny(in_channels: int, image_size: int) -> ViT:
    """ViT-Tiny (width 192, depth 12, 3 heads, MLP 768) with the patch of ``patch_size_for``."""
    return ViT(in_channels, image_size, width=192, depth=12, heads=3, mlp_dim=768)
