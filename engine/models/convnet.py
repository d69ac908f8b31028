"""Small ConvNet with BatchNorm for CPU runs on small images (the dataset-distillation classic)."""
from __future__ import annotations

import torch
from torch import nn

from engine.models.pooling import GlobalAvgPool


class ConvNetBN(nn.Module):
    """``depth`` blocks of conv3x3 -> BN -> ReLU -> avgpool2, then global average pooling.

    Returns pooled features [N, width]; the classifier head lives outside the backbone.
    """

    def __init__(self, in_channels: int, width: int = 64, depth: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(depth):
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True), nn.AvgPool2d(2)]
            channels = width
        self.body = nn.Sequential(*layers)
        self.pool = GlobalAvgPool()  # = AdaptiveAvgPool2d(1), deterministic CUDA backward
        self.out_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.body(x)), 1)
