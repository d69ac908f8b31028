"""What every loader shares: its options, the rank shard of an epoch, and normalization.

All three loaders (torch, ffcv, dali) draw an epoch's order from ``epoch_order`` and split it with
``shard_indices``, so for the same (seed, epoch, rank, world) they visit the same samples in the
same order; only decoding and augmentation differ.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from engine.errors import ConfigError

TRANSFORMS = ("eval", "train")


@dataclass
class LoaderSpec:
    """Options of one loader; library code and tests build it directly, the CLI from config."""

    batch_size: int = 256
    shuffle: bool = False
    """Permute samples each epoch with ``seed + epoch`` (the same permutation on every rank)."""
    seed: int = 0
    drop_last: bool = False
    """False: every sample of an epoch is delivered exactly once across ranks, the last batch of a
    rank may be short, and ranks may differ by one sample (no padding duplicates). True: each rank
    yields only full batches of an equal-length shard (floor(n / world) samples)."""
    transform: str = "eval"
    """'eval': resize the shorter side and center-crop to the image size (as engine.data does: image
    files Resize(round(size / data.eval_crop_ratio)) + CenterCrop(size)); 'train': random resized
    crop of the whole full-resolution image (``crop_scale``, ``crop_ratio``) + horizontal flip
    (``flip``), as engine.data.views."""
    views: int = 1
    """Independently augmented views per image (2 for SSL pretraining); >1 needs transform='train'.
    With views > 1 a batch is ([view_1, ..., view_k], labels)."""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """Area fraction range of the random resized crop (torchvision/FFCV/DALI convention)."""
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5
    """Probability of a horizontal flip in the train transform."""
    num_workers: int = 2
    """torch: DataLoader worker processes (0 = main process); ffcv: threads; dali: CPU threads."""
    image_size: Optional[int] = None
    """Output side length; None uses the data bundle's image size."""
    beton_dir: Optional[str] = None
    """ffcv only: folder holding train.beton / val.beton written by engine.loaders.convert_ffcv."""
    normalize: bool = True
    """True: (x - mean) / std with the bundle's statistics; False: floats in [0, 1] (for batched
    photometric augmentation such as engine.squeeze.augment, which expects [0, 1])."""
    device: str = "cpu"
    """dali only: 'cpu' decodes on the CPU; 'auto'/'cuda' decode with device='mixed' on this
    rank's GPU when CUDA is present (batches then arrive on the GPU)."""

    @classmethod
    def from_augment(cls, augment, **overrides) -> "LoaderSpec":
        """Geometric part of an engine.squeeze.augment.AugmentSpec (crop scale/ratio, flip, size)
        for transform='train'; its photometric steps stay with augment_batch on the batches."""
        fields = dict(transform="train", image_size=augment.image_size,
                      crop_scale=tuple(augment.crop_scale), crop_ratio=tuple(augment.crop_ratio),
                      flip=0.5 if augment.flip else 0.0)
        fields.update(overrides)
        return cls(**fields)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"loader batch_size={self.batch_size} must be >= 1")
        if self.transform not in TRANSFORMS:
            raise ConfigError(f"loader transform={self.transform!r} is not one of {'|'.join(TRANSFORMS)}")
        if self.views < 1:
            raise ConfigError(f"loader views={self.views} must be >= 1")
        if self.views > 1 and self.transform != "train":
            raise ConfigError(f"loader views={self.views} needs transform=train "
                              f"(identical eval views carry no information)")
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ConfigError(f"loader crop_scale={tuple(self.crop_scale)} must satisfy "
                              f"0 < low <= high <= 1")
        if not 0 <= self.flip <= 1:
            raise ConfigError(f"loader flip={self.flip} must be a probability in [0, 1]")
        if self.num_workers < 0:
            raise ConfigError(f"loader num_workers={self.num_workers} must be >= 0")
        if self.device not in ("cpu", "auto", "cuda"):
            raise ConfigError(f"loader device={self.device!r} is not one of cpu|auto|cuda")
        self.crop_scale = (float(low), float(high))
        self.crop_ratio = (float(self.crop_ratio[0]), float(self.crop_ratio[1]))


def check_world(num_samples: int, rank: int, world_size: int, where: str) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank={rank} is outside world_size={world_size}; check the launcher's "
                          f"RANK/WORLD_SIZE")
    if num_samples < world_size:
        raise ConfigError(f"world size {world_size} is larger than the {num_samples} samples of "
                          f"{where}; use fewer processes or more data")


def epoch_order(num_samples: int, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    """The global visiting order of one epoch (identical on every rank)."""
    if not shuffle:
        return np.arange(num_samples, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(num_samples).astype(np.int64)


def shard_indices(num_samples: int, rank: int, world_size: int, *, shuffle: bool = False,
                  seed: int = 0, epoch: int = 0, drop_last: bool = False,
                  batch_size: int = 1) -> np.ndarray:
    """Sample indices this rank visits in ``epoch``, in order.

    Strided split of the epoch order: rank r takes positions r, r+world, ... so shards are disjoint
    and, with ``drop_last=False``, their union is every sample exactly once (shard lengths differ
    by at most one; nothing is padded). With ``drop_last=True`` every rank gets the same number of
    full batches, so collective ops stay in step.
    """
    order = epoch_order(num_samples, shuffle, seed, epoch)
    shard = order[rank::world_size]
    if drop_last:
        per_rank = (num_samples // world_size) // batch_size * batch_size
        shard = shard[:per_rank]
    return shard


def num_batches(shard_len: int, batch_size: int, drop_last: bool) -> int:
    return shard_len // batch_size if drop_last else math.ceil(shard_len / batch_size)


def normalizer(mean: Sequence[float], std: Sequence[float], enabled: bool = True):
    """(x uint8 or float in [0,1] [B,C,H,W]) -> float32 normalized, the same for every loader."""
    if not enabled:
        mean, std = [0.0] * len(mean), [1.0] * len(std)
    mean_t = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)

    def apply(x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        return (x - mean_t.to(x.device)) / std_t.to(x.device)

    return apply


class BatchLoader:
    """Base of the three loaders: an iterable of batches for one rank's shard of one split.

    ``set_epoch(e)`` picks the shuffle permutation (as DistributedSampler does); iterating without
    calling it again repeats the same epoch.
    """

    def __init__(self, num_samples: int, spec: LoaderSpec, rank: int, world_size: int,
                 where: str) -> None:
        check_world(num_samples, rank, world_size, where)
        self.num_samples = num_samples
        self.spec = spec
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def indices(self) -> np.ndarray:
        s = self.spec
        return shard_indices(self.num_samples, self.rank, self.world_size, shuffle=s.shuffle,
                             seed=s.seed, epoch=self.epoch, drop_last=s.drop_last,
                             batch_size=s.batch_size)

    def __len__(self) -> int:
        return num_batches(len(self.indices()), self.spec.batch_size, self.spec.drop_last)

    def __iter__(self) -> Iterator:  # pragma: no cover - abstract
        raise NotImplementedError
