"""torch DataLoader path: PIL decode for image-folder trees, tensor ops for in-memory data."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from engine.data.imagefolder import load_image
from engine.errors import ConfigError
from engine.loaders.common import BatchLoader, LoaderSpec, normalizer


class _ViewDataset(Dataset):
    """Yields (uint8 or float [C,S,S] image, or a list of ``views`` of them, label)."""

    def __init__(self, dataset: Dataset, spec: LoaderSpec, size: int, channels: int) -> None:
        self.dataset = dataset
        self.spec = spec
        self.size = size
        self.channels = channels
        self.files = getattr(dataset, "files", None)
        self.images = getattr(dataset, "images", None)
        self.labels = list(dataset.labels)
        self.crop = v2.Compose([
            v2.RandomResizedCrop(size, scale=spec.crop_scale, ratio=spec.crop_ratio, antialias=True),
            v2.RandomHorizontalFlip(spec.flip),
        ])

    def __len__(self) -> int:
        return len(self.dataset)

    def _source(self, index: int):
        """The full-resolution image the train crop samples from."""
        if self.files is not None:
            try:
                with Image.open(self.files[index]) as img:
                    img = img.convert("RGB" if self.channels == 3 else "L")
                    array = np.asarray(img, dtype=np.uint8)
            except OSError as exc:
                raise ConfigError(f"image file {self.files[index]} is corrupt or unreadable ({exc}); "
                                  f"remove or replace it") from exc
            if array.ndim == 2:
                array = array[:, :, None]
            return torch.from_numpy(array.copy()).permute(2, 0, 1)
        if self.images is not None:
            return self.images[index]
        return self.dataset[index][0]

    def __getitem__(self, index: int):
        label = self.labels[index]
        if self.spec.transform == "eval":
            if self.files is not None:
                return load_image(self.files[index], self.channels, self.size), label
            image = self.images[index] if self.images is not None else self.dataset[index][0]
            if image.shape[-1] != self.size or image.shape[-2] != self.size:
                image = v2.functional.center_crop(
                    v2.functional.resize(image, self.size, antialias=True), self.size)
            return image, label
        source = self._source(index)
        views = [self.crop(source) for _ in range(self.spec.views)]
        return (views[0] if self.spec.views == 1 else views), label


class _ListSampler(Sampler):
    def __init__(self, owner: "TorchLoader") -> None:
        self.owner = owner

    def __iter__(self):
        return iter(self.owner.indices().tolist())

    def __len__(self) -> int:
        return len(self.owner.indices())


class TorchLoader(BatchLoader):
    def __init__(self, dataset: Dataset, mean, std, channels: int, image_size: int,
                 spec: LoaderSpec, rank: int, world_size: int, where: str) -> None:
        super().__init__(len(dataset), spec, rank, world_size, where)
        self.views = _ViewDataset(dataset, spec, image_size, channels)
        self.normalize = normalizer(mean, std, spec.normalize)

    def __iter__(self) -> Iterator:
        s = self.spec
        # Seeded per (seed, epoch, rank): worker augmentation streams repeat for a repeated epoch.
        generator = torch.Generator().manual_seed(s.seed * 1_000_003 + self.epoch * 1_009 + self.rank)
        loader = DataLoader(self.views, batch_size=s.batch_size, sampler=_ListSampler(self),
                            num_workers=s.num_workers, drop_last=s.drop_last, generator=generator,
                            pin_memory=False)
        for images, labels in loader:
            labels = labels.long()
            if isinstance(images, list):
                yield [self.normalize(v) for v in images], labels
            else:
                yield self.normalize(images), labels
