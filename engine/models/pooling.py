"""The heads' global average pooling as a plain mean over H and W.

``x.mean((2, 3))`` is what ``nn.AdaptiveAvgPool2d(1)`` computes (the same value to float rounding),
but its CUDA backward is an expand-and-divide, deterministic, while adaptive_avg_pool2d's CUDA
backward accumulates with atomics: ``torch.use_deterministic_algorithms(True)``
(``deterministic=true``) refuses it, and recover and squeeze differentiate through the head.
"""
from __future__ import annotations

import torch
from torch import nn


class GlobalAvgPool(nn.Module):
    """[N, C, H, W] -> [N, C, 1, 1] mean over H, W (drop-in for ``nn.AdaptiveAvgPool2d(1)``; no state)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3), keepdim=True)
