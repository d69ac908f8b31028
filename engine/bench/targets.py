"""Full runs the bench can project: published dataset shapes and the paper's schedule."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    name: str
    num_classes: int
    train_images: int
    image_size: int
    channels: int
    model: str
    """Teacher and student architecture (engine.models registry name)."""
    ssl_epochs: int
    eval_epochs: int


# Paper schedule (MoCo v2 200 epochs, students 300 epochs) for every named target; Tiny-ImageNet and
# CIFAR use the CIFAR-style ResNet-18 stem (3x3 conv, no max-pool), as SRe2L/SC-DD do.
TARGETS: dict[str, Target] = {
    "imagenet1k": Target("imagenet1k", 1000, 1_281_167, 224, 3, "resnet18", 200, 300),
    "tinyimagenet": Target("tinyimagenet", 200, 100_000, 64, 3, "resnet18_cifar", 200, 300),
    "cifar100": Target("cifar100", 100, 50_000, 32, 3, "resnet18_cifar", 200, 300),
}

TARGET_NAMES = ("current", *TARGETS)
