"""Batch iteration over index orders: one path for in-memory and streamed datasets."""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from engine.training.precision import to_device

DEVICE_SET_BYTES = 2**30
"""In-memory sets up to this many bytes of uint8 pixels are held on the GPU while a student trains on them
(``on_device``): distilled sets are a few MB, the tree benchmark's full 64 px split 196 MB."""


def epoch_order(seed: int, epoch: int, count: int) -> np.ndarray:
    """The permutation of ``count`` items for ``epoch``: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch, 2**31 - 1]).permutation(count)


def batches_of(order: Sequence[int] | np.ndarray | torch.Tensor, batch_size: int,
               drop_last: bool = False) -> list[np.ndarray]:
    order = np.asarray(order.cpu() if isinstance(order, torch.Tensor) else order, dtype=np.int64)
    count = len(order) // batch_size * batch_size if drop_last else len(order)
    return [order[i:i + batch_size] for i in range(0, count, batch_size)]


class _IndexBatches(Sampler):
    def __init__(self, batches: list[np.ndarray]):
        self.batches = batches

    def __iter__(self):
        return iter([b.tolist() for b in self.batches])

    def __len__(self) -> int:
        return len(self.batches)


def load_batches(dataset: Dataset, batches: list[np.ndarray], workers: int = 0
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images [B,C,H,W] as stored: uint8 or float in [0, 1], labels [B]) for each index batch, in order.

    Datasets holding an in-memory tensor (``.images``) are sliced directly, so a small set costs
    no per-item Python; all others stream through a DataLoader with these batches as its sampler,
    so both paths yield the same sequence.
    """
    images = getattr(dataset, "images", None)
    if isinstance(images, torch.Tensor):
        labels = torch.as_tensor(dataset.labels)
        for idx in batches:
            index = torch.from_numpy(np.asarray(idx, dtype=np.int64))
            if images.device.type != "cpu":  # a set held on the device (DeviceImages): gathered there
                index = to_device(index, images.device)
            yield images[index], labels[index]
        return
    loader = DataLoader(dataset, batch_sampler=_IndexBatches(batches), num_workers=workers)
    for x, y in loader:
        yield x, torch.as_tensor(y)


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float in [0, 1]; float images pass through as float32."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


class DeviceImages(Dataset):
    """An in-memory uint8 image set (``.images`` [N,C,H,W], ``.labels``) copied to ``device`` once: a batch is
    gathered there from the indices alone (load_batches), so a training step moves no pixels and the host
    does not gather them (small distilled-set batches are bound by the host's work per step)."""

    def __init__(self, images: torch.Tensor, labels, device: torch.device) -> None:
        self.images = images.to(device)
        self.labels = torch.as_tensor(labels, dtype=torch.int64).to(device)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index].float().div_(255.0), int(self.labels[index])


def on_device(dataset: Optional[Dataset], device: torch.device, max_bytes: int = DEVICE_SET_BYTES) -> Optional[Dataset]:
    """``dataset`` held on a CUDA ``device`` (DeviceImages) when it is an in-memory uint8 set of at most
    ``max_bytes`` that hands out whole images (not its own crops); anything else unchanged. Batches from
    either hold the same values."""
    images = getattr(dataset, "images", None)
    if (torch.device(device).type != "cuda" or not isinstance(images, torch.Tensor) or images.dtype != torch.uint8
            or images.device.type != "cpu" or images.numel() > max_bytes
            or getattr(dataset, "crops_in_data", False) or hasattr(dataset, "at_epoch")):
        return dataset
    return DeviceImages(images, dataset.labels, device)
