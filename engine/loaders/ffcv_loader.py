"""FFCV path: reads the .beton files written by ``python -m engine.loaders.convert_ffcv``.

FFCV stores RGB only; gray data was written with its channel replicated, so channel 0 is exact.
FFCV's own augmentation randomness (numba np.random) is not tied to ``seed``; the sample order is.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from engine.data.views import eval_resize_side
from engine.errors import ConfigError
from engine.loaders.common import BatchLoader, LoaderSpec, normalizer, shard_indices

SPLIT_FILES = {"train": "train.beton", "test": "val.beton", "val": "val.beton"}
META_FILE = "meta.json"


def beton_path(beton_dir: Optional[str], split: str) -> Path:
    if not beton_dir:
        raise ConfigError("loader=ffcv needs beton_dir=DIR; write it with "
                          "`python -m engine.loaders.convert_ffcv --out DIR ...`")
    if split not in SPLIT_FILES:
        raise ConfigError(f"split={split!r} is not one of {sorted(SPLIT_FILES)}")
    path = Path(beton_dir).expanduser() / SPLIT_FILES[split]
    if not path.is_file():
        raise ConfigError(f"FFCV file {path} is missing; write it with "
                          f"`python -m engine.loaders.convert_ffcv --out {path.parent} ...`")
    return path


def read_meta(beton_dir: str) -> dict:
    path = Path(beton_dir).expanduser() / META_FILE
    if not path.is_file():
        raise ConfigError(f"{path} is missing (written last by convert_ffcv, so the conversion did "
                          f"not finish); rerun `python -m engine.loaders.convert_ffcv`")
    return json.loads(path.read_text())


def _shard_order_class():
    from ffcv.traversal_order.base import TraversalOrder

    class ShardOrder(TraversalOrder):
        """Our epoch order and rank shard, so FFCV visits what the other loaders visit."""

        def __init__(self, owner: "FFCVLoader") -> None:  # noqa: D107 - FFCV calls us instead
            self.owner = owner

        def __call__(self, loader) -> "ShardOrder":
            # ffcv.Loader calls order(loader) on an instance it is given.
            return self

        def sample_order(self, epoch: int):
            o, s = self.owner, self.owner.spec
            return shard_indices(o.num_samples, o.rank, o.world_size, shuffle=s.shuffle,
                                 seed=s.seed, epoch=epoch, drop_last=s.drop_last,
                                 batch_size=s.batch_size).astype(np.uint64)

    return ShardOrder


class FFCVLoader(BatchLoader):
    def __init__(self, beton: Path, mean, std, channels: int, stored_channels: int,
                 image_size: int, spec: LoaderSpec, rank: int, world_size: int, eval_ratio: float = 1.0) -> None:
        from ffcv.reader import Reader

        try:
            num_samples = int(Reader(str(beton)).num_samples)
        except Exception as exc:  # noqa: BLE001 - any header failure has one fix
            raise ConfigError(f"FFCV file {beton} is unreadable ({type(exc).__name__}); "
                              f"rewrite it with convert_ffcv") from exc
        super().__init__(num_samples, spec, rank, world_size, str(beton))
        self.beton = beton
        self.channels = channels
        self.stored_channels = stored_channels
        self.image_size = image_size
        self.eval_ratio = eval_ratio
        self.normalize = normalizer(mean, std, spec.normalize)
        self._loader = None

    def _pipelines(self) -> dict:
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import (CenterCropRGBImageDecoder,
                                           RandomResizedCropRGBImageDecoder, SimpleRGBImageDecoder)
        from ffcv.pipeline import PipelineSpec
        from ffcv.reader import Reader
        from ffcv.transforms import RandomHorizontalFlip, ToTensor, ToTorchImage

        s, size = self.spec, (self.image_size, self.image_size)
        label = [IntDecoder(), ToTensor()]
        if s.transform == "eval":
            meta = Reader(str(self.beton)).metadata["f0"]
            exact = bool((meta["width"] == size[1]).all() and (meta["height"] == size[0]).all())
            # Built-in data already at the size: decode as stored (bit-exact for raw), no resampling.
            # Image files: the center crop of eval_ratio of the shorter side (224/256), resized.
            # FFCV crops int(ratio * shorter side) then resizes: ratio size / round(size / eval_ratio)
            # (224/256) shows the region Resize(round(size / eval_ratio)) + CenterCrop(size) shows.
            ratio = size[0] / eval_resize_side(size[0], self.eval_ratio)
            decoder = (SimpleRGBImageDecoder() if exact and self.eval_ratio == 1.0
                       else CenterCropRGBImageDecoder(size, ratio=ratio))
            return {"image": [decoder, ToTensor(), ToTorchImage()], "label": label}

        def view():
            return [RandomResizedCropRGBImageDecoder(size, scale=s.crop_scale, ratio=s.crop_ratio),
                    RandomHorizontalFlip(s.flip), ToTensor(), ToTorchImage()]

        pipelines = {"image": view(), "label": label}
        for k in range(1, s.views):
            ops = view()
            pipelines[f"image_{k}"] = PipelineSpec("image", decoder=ops[0], transforms=ops[1:])
        return pipelines

    def _build(self):
        from ffcv.loader import Loader

        # drop_last is applied by our shard (trimmed to whole batches); FFCV's default True would
        # silently lose the tail, so it is always off here.
        return Loader(str(self.beton), batch_size=self.spec.batch_size,
                      num_workers=max(1, self.spec.num_workers), order=_shard_order_class()(self),
                      drop_last=False, pipelines=self._pipelines(), batches_ahead=2)

    def _to_model(self, images: torch.Tensor) -> torch.Tensor:
        # FFCV reuses its output buffers; normalizing makes the copy we hand out.
        if self.channels == 1:
            if self.stored_channels == 1:
                images = images[:, :1]
            else:
                weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
                images = (images.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
        return self.normalize(images.contiguous())

    def __iter__(self) -> Iterator:
        # FFCV sets torch's intra-op thread count to its worker count, for the whole process, when
        # a Loader is built and when an epoch starts; the caller's setting is put back each time.
        threads = torch.get_num_threads()
        if self._loader is None:
            self._loader = self._build()
        self._loader.next_epoch = self.epoch
        batches = iter(self._loader)
        torch.set_num_threads(threads)
        for batch in batches:
            image, label, *extra = batch
            labels = label.reshape(-1).to(torch.int64, copy=True)
            if self.spec.views == 1:
                yield self._to_model(image), labels
            else:
                yield [self._to_model(v) for v in (image, *extra)], labels
