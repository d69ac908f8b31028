"""MobileNet-V2 backbones: torchvision's ImageNet network and a small-image variant for 32 px inputs."""
from __future__ import annotations

import torch
import torchvision
from torch import nn

from engine.models.pooling import GlobalAvgPool

SMALL_IMAGE_SETTING = [
    # t (expansion), c (channels), n (blocks), s (stride of the first block); torchvision's ImageNet
    # setting except the 24-channel stage, whose stride is 1 here instead of 2.
    [1, 16, 1, 1],
    [6, 24, 2, 1],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]


class MobileNetV2Backbone(nn.Module):
    """torchvision's MobileNet-V2 ``features`` (inverted residual blocks, BN + ReLU6, 1x1 conv to 1280
    channels) and global average pooling; returns pooled features [N, 1280]."""

    def __init__(self, net: torchvision.models.MobileNetV2) -> None:
        super().__init__()
        self.features = net.features
        self.pool = GlobalAvgPool()  # = AdaptiveAvgPool2d(1), deterministic CUDA backward
        self.out_dim = net.last_channel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)


def _first_conv(net: torchvision.models.MobileNetV2, in_channels: int, stride: int) -> None:
    old = net.features[0][0]
    conv = nn.Conv2d(in_channels, old.out_channels, kernel_size=3, stride=stride, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out")  # torchvision's init of every MobileNet conv
    net.features[0][0] = conv


def mobilenet_v2_imagenet(in_channels: int) -> nn.Module:
    """torchvision MobileNet-V2 (stride-2 first conv, total stride 32), randomly initialised; weights are
    never downloaded. The classifier (dropout + linear) is dropped: ClassifierNet adds ``fc``."""
    net = torchvision.models.mobilenet_v2(weights=None)
    if in_channels != 3:
        _first_conv(net, in_channels, stride=2)
    return MobileNetV2Backbone(net)


def mobilenet_v2_small(in_channels: int) -> nn.Module:
    """MobileNet-V2 for 32x32 inputs (CIFAR). Two changes to torchvision's network, both strides 2 -> 1:
    the first 3x3 conv and the first block of the 24-channel stage (``SMALL_IMAGE_SETTING``). The total
    stride drops from 32 to 8, so a 32 px image ends at 4x4 (the ImageNet network has it at 4x4 already
    in the 32-channel stage and at 1x1 from the 160-channel stage on). Widths, depths and the
    1280-channel head are unchanged."""
    net = torchvision.models.mobilenet_v2(weights=None, inverted_residual_setting=SMALL_IMAGE_SETTING)
    _first_conv(net, in_channels, stride=1)
    return MobileNetV2Backbone(net)
