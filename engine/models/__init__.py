"""Model registry: ``model=<name>`` builds a backbone + linear head, all with BatchNorm.

Models never place or wrap themselves (.cuda(), DDP, DeepSpeed happen elsewhere).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from engine.errors import ConfigError
from engine.models.convnet import ConvNetBN
from engine.models.resnet import resnet18_cifar, resnet_imagenet


@dataclass
class ModelConfig:
    """Config of the ``model=`` group; each option is a preset in ``MODEL_PRESETS``."""

    name: str = "convnet"
    """A ``MODELS`` entry: convnet | resnet18_cifar | resnet18 | resnet50."""
    width: int = 64
    """ConvNet channels per block (ignored by ResNets)."""
    depth: int = 3
    """ConvNet blocks; each halves the image side (ignored by ResNets)."""


MODEL_PRESETS: dict[str, ModelConfig] = {
    # Small ConvNet-BN for CPU runs on small images (28x28 MNIST, 8x8 digits with depth<=3).
    "convnet": ModelConfig(name="convnet"),
    # The ResNets ignore width/depth.
    "resnet18": ModelConfig(name="resnet18"),
    "resnet18_cifar": ModelConfig(name="resnet18_cifar"),
    "resnet50": ModelConfig(name="resnet50"),
}
"""The ``model=`` options (``scdd model=NAME``), registered with Hydra by engine.config_store."""


class ClassifierNet(nn.Module):
    """A backbone that returns pooled features, plus the linear classifier ``fc`` on top."""

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_dim = int(backbone.out_dim)
        self.fc = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(x))


@dataclass(frozen=True)
class ModelSpec:
    build_backbone: Callable[[ModelConfig, int], nn.Module]
    min_image_size: Callable[[ModelConfig], int]


MODELS: dict[str, ModelSpec] = {
    "convnet": ModelSpec(lambda cfg, ch: ConvNetBN(ch, cfg.width, cfg.depth), lambda cfg: 2 ** cfg.depth),
    "resnet18_cifar": ModelSpec(lambda cfg, ch: resnet18_cifar(ch), lambda cfg: 8),
    "resnet18": ModelSpec(lambda cfg, ch: resnet_imagenet("resnet18", ch), lambda cfg: 32),
    "resnet50": ModelSpec(lambda cfg, ch: resnet_imagenet("resnet50", ch), lambda cfg: 32),
}


def build_model(cfg: ModelConfig, num_classes: int, in_channels: int, image_size: int) -> ClassifierNet:
    if cfg.name not in MODELS:
        raise ConfigError(f"unknown model '{cfg.name}'; choose one of {sorted(MODELS)}")
    spec = MODELS[cfg.name]
    if cfg.name == "convnet" and (cfg.depth < 1 or cfg.width < 1):
        raise ConfigError(f"model.depth={cfg.depth} and model.width={cfg.width} must be >= 1")
    smallest = spec.min_image_size(cfg)
    if image_size < smallest:
        hint = "lower model.depth or " if cfg.name == "convnet" else ""
        raise ConfigError(f"model={cfg.name} needs images of at least {smallest}px but data gives "
                          f"{image_size}px; {hint}set data.image_size>={smallest} or pick another model")
    return ClassifierNet(spec.build_backbone(cfg, in_channels), num_classes)


def bn_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    """BatchNorm2d layers in registration order (= forward order for these architectures)."""
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


__all__ = ["MODELS", "MODEL_PRESETS", "ClassifierNet", "ModelConfig", "bn_layers", "build_model"]
