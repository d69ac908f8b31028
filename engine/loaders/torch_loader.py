"""torch DataLoader path: image-folder trees from their decode cache (or PIL decode of the files), tensor ops
for in-memory data."""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from engine.data.views import CropSpec, draw, eval_crop, render, tensor_views, to_chw, view_rng
from engine.loaders.common import BatchLoader, LoaderSpec, normalizer


class _ViewDataset(Dataset):
    """Yields (uint8 or float [C,S,S] image, or a list of ``views`` of them, label).

    Image-folder files: eval is the data's Resize + CenterCrop (engine.data.views.eval_crop), train
    crops the full-resolution file; in-memory images are resized/cropped as tensors. Train crops
    and flips follow engine.data.views, seeded by (spec.seed, epoch, index).
    """

    def __init__(self, dataset: Dataset, spec: LoaderSpec, size: int, channels: int) -> None:
        self.dataset = dataset
        self.spec = spec
        self.size = size
        self.channels = channels
        self.epoch = 0
        # an image tree: its decode cache when it has one, else its files (engine.data.views sources)
        self.source = dataset.source() if hasattr(dataset, "source") else None
        self.images = getattr(dataset, "images", None)
        self.labels = list(dataset.labels)
        self.ratio = getattr(dataset, "crop_ratio", 1.0)
        self.crop = CropSpec(size=size, scale=spec.crop_scale, ratio=spec.crop_ratio, views=spec.views,
                             flip=spec.flip, seed=spec.seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        label = self.labels[index]
        if self.spec.transform == "eval":
            if self.source is not None:
                return to_chw(eval_crop(self.source.get(index)[0], self.size, self.ratio)), label
            image = self.images[index] if self.images is not None else self.dataset[index][0]
            if image.shape[-1] != self.size or image.shape[-2] != self.size:
                image = v2.functional.center_crop(
                    v2.functional.resize(image, self.size, antialias=True), self.size)
            return image, label
        rng = view_rng(self.crop.seed, self.epoch, index)
        if self.source is not None:  # boxes in full-resolution coordinates, scaled to a cached image
            img, (height, width), shrink = self.source.get(index)
            views = render(img, draw(rng, height, width, self.crop), self.size, shrink)
        else:
            source = self.images[index] if self.images is not None else self.dataset[index][0]
            views = tensor_views(source, self.crop, rng)
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
        self.views.epoch = self.epoch  # crops are drawn from (seed, epoch, index); workers get a copy
        loader = DataLoader(self.views, batch_size=s.batch_size, sampler=_ListSampler(self),
                            num_workers=s.num_workers, drop_last=s.drop_last, generator=generator,
                            pin_memory=False)
        for images, labels in loader:
            labels = labels.long()
            if isinstance(images, list):
                yield [self.normalize(v) for v in images], labels
            else:
                yield self.normalize(images), labels
