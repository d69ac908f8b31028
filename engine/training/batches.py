"""Batch iteration over index orders: one path for in-memory and streamed datasets."""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


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
            yield images[index], labels[index]
        return
    loader = DataLoader(dataset, batch_sampler=_IndexBatches(batches), num_workers=workers)
    for x, y in loader:
        yield x, torch.as_tensor(y)


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float in [0, 1]; float images pass through as float32."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
