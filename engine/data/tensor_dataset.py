"""In-memory image datasets for the small built-ins, plus the split and statistics helpers."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset


class TensorImageDataset(Dataset):
    """uint8 images [N,C,H,W] held in memory; yields (float [C,H,W] in [0,1], label)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        assert images.dtype == torch.uint8 and images.ndim == 4, images.shape
        assert len(images) == len(labels)
        self.images = images
        self.labels = labels.long().tolist()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index].float().div_(255.0), self.labels[index]


def resize_uint8(images: torch.Tensor, size: int | None, channels: int | None) -> torch.Tensor:
    """Resize a uint8 batch once at load time (bilinear, antialiased) and convert channels."""
    if channels is not None and channels != images.shape[1]:
        if channels == 3:
            images = images.expand(-1, 3, -1, -1).contiguous()
        else:
            weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            images = (images.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    if size is not None and size != images.shape[-1]:
        images = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True,
                               align_corners=False)
        images = images.round().clamp(0, 255).to(torch.uint8)
    return images


def stratified_split(labels: np.ndarray, test_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed per-class hold-out: the same indices for the same (labels, seed) on every machine."""
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        test_idx.append(np.sort(idx[:test_per_class]))
        train_idx.append(np.sort(idx[test_per_class:]))
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(test_idx))


def channel_stats(images_uint8: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of a uint8 batch [N,C,H,W], in [0,1] units."""
    x = images_uint8.double().div(255.0)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3))
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]
