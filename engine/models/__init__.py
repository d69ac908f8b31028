"""Model registry: ``model=<name>`` builds a backbone + linear head; all but the ViT have BatchNorm.

Models never place or wrap themselves (.cuda(), DDP, DeepSpeed happen elsewhere).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from engine.errors import ConfigError
from engine.models.convnet import ConvNetBN
from engine.models.mobilenet import mobilenet_v2_imagenet, mobilenet_v2_small
from engine.models.resnet import resnet_cifar, resnet_imagenet
from engine.models.vit import MIN_GRID, vit_tiny


@dataclass
class ModelConfig:
    """Config of the ``model=`` group; each option is a preset in ``MODEL_PRESETS``."""

    name: str = "convnet"
    """A ``MODELS`` entry: convnet | resnet18_cifar | resnet18 | resnet50 | resnet101_cifar | resnet101 |
    mobilenet_v2_cifar | mobilenet_v2 | vit_tiny."""
    width: int = 64
    """ConvNet channels per block (ignored by the other models)."""
    depth: int = 3
    """ConvNet blocks; each halves the image side (ignored by the other models)."""


MODEL_PRESETS: dict[str, ModelConfig] = {
    # Small ConvNet-BN for CPU runs on small images (28x28 MNIST, 8x8 digits with depth<=3).
    "convnet": ModelConfig(name="convnet"),
    # The others ignore width/depth. A *_cifar name is the small-image (32 px) variant of the model
    # without the suffix, which is torchvision's ImageNet network.
    "resnet18": ModelConfig(name="resnet18"),
    "resnet18_cifar": ModelConfig(name="resnet18_cifar"),
    "resnet50": ModelConfig(name="resnet50"),
    "resnet101": ModelConfig(name="resnet101"),
    "resnet101_cifar": ModelConfig(name="resnet101_cifar"),
    "mobilenet_v2": ModelConfig(name="mobilenet_v2"),
    "mobilenet_v2_cifar": ModelConfig(name="mobilenet_v2_cifar"),
    # No BatchNorm: a student only (evaluate.student=vit_tiny); recover refuses it as a teacher.
    "vit_tiny": ModelConfig(name="vit_tiny"),
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
    build_backbone: Callable[[ModelConfig, int, int], nn.Module]
    """(config, in_channels, image_size) -> backbone with ``out_dim``, returning pooled features."""
    min_image_size: Callable[[ModelConfig], int]
    """Smallest side for which every stage keeps >= 1 pixel (the ViT: a 7x7 token grid)."""
    batchnorm: bool = True
    """Whether the backbone has BatchNorm2d layers (recover's BN matching needs them in its teacher)."""


MODELS: dict[str, ModelSpec] = {
    "convnet": ModelSpec(lambda cfg, ch, size: ConvNetBN(ch, cfg.width, cfg.depth), lambda cfg: 2 ** cfg.depth),
    # Small-image stems keep total stride 8 (ResNet: 3x3 stride-1 stem, no max-pool; MobileNet-V2: see
    # mobilenet_v2_small); the ImageNet networks have stride 32.
    "resnet18_cifar": ModelSpec(lambda cfg, ch, size: resnet_cifar("resnet18", ch), lambda cfg: 8),
    "resnet18": ModelSpec(lambda cfg, ch, size: resnet_imagenet("resnet18", ch), lambda cfg: 32),
    "resnet50": ModelSpec(lambda cfg, ch, size: resnet_imagenet("resnet50", ch), lambda cfg: 32),
    "resnet101_cifar": ModelSpec(lambda cfg, ch, size: resnet_cifar("resnet101", ch), lambda cfg: 8),
    "resnet101": ModelSpec(lambda cfg, ch, size: resnet_imagenet("resnet101", ch), lambda cfg: 32),
    "mobilenet_v2_cifar": ModelSpec(lambda cfg, ch, size: mobilenet_v2_small(ch), lambda cfg: 8),
    "mobilenet_v2": ModelSpec(lambda cfg, ch, size: mobilenet_v2_imagenet(ch), lambda cfg: 32),
    "vit_tiny": ModelSpec(lambda cfg, ch, size: vit_tiny(ch, size), lambda cfg: MIN_GRID, batchnorm=False),
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
    return ClassifierNet(spec.build_backbone(cfg, in_channels, image_size), num_classes)


def has_batchnorm(cfg: ModelConfig) -> bool:
    """Whether ``cfg``'s model has BatchNorm2d layers (an unknown name is left to ``build_model`` to refuse)."""
    spec = MODELS.get(cfg.name)
    return spec is None or spec.batchnorm


def bn_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    """BatchNorm2d layers in registration order (= forward order for these architectures)."""
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


__all__ = ["MODELS", "MODEL_PRESETS", "ClassifierNet", "ModelConfig", "bn_layers", "build_model", "has_batchnorm"]
