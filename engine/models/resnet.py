"""ResNet backbones: torchvision's ImageNet ResNet-18/50/101 and their small-image (CIFAR-stem) variants."""
from __future__ import annotations

import torchvision
from torch import nn

from engine.models.pooling import GlobalAvgPool


def _strip_head(net: nn.Module) -> nn.Module:
    net.out_dim = net.fc.in_features
    net.fc = nn.Identity()
    net.avgpool = GlobalAvgPool()  # = AdaptiveAvgPool2d(1), deterministic CUDA backward
    return net


def resnet_imagenet(arch: str, in_channels: int) -> nn.Module:
    """torchvision ResNet (7x7 stem, max-pool), randomly initialised; weights are never downloaded."""
    net = getattr(torchvision.models, arch)(weights=None)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return _strip_head(net)


def resnet_cifar(arch: str, in_channels: int) -> nn.Module:
    """torchvision ResNet ``arch`` for 32x32 inputs: 3x3 stride-1 stem and no max-pool, as in the CIFAR
    literature, so the four stages see 32, 16, 8 and 4 px instead of 8, 4, 2 and 1."""
    net = getattr(torchvision.models, arch)(weights=None)
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return _strip_head(net)


def resnet18_cifar(in_channels: int) -> nn.Module:
    """ResNet-18 with the small-image stem (see ``resnet_cifar``)."""
    return resnet_cifar("resnet18", in_channels)
