"""Images of an image tree at their own resolution: the eval crop and random-resized-crop views.

Image-folder trees (ImageNet, Tiny-ImageNet, user data) keep their files at full resolution. Two
ways to turn a file into a fixed-size tensor, used by every consumer (torch loader, SSL/supervised
pretraining, the probe's views, students on real images):

* eval: Resize(round(size / ratio)) of the shorter side + CenterCrop(size), torchvision's
  semantics (ratio 0.875: ImageNet's Resize(256) + CenterCrop(224)). ``data.eval_crop_ratio``.
* views: ``CropSpec.views`` random resized crops of the FULL image (torchvision's
  RandomResizedCrop rule: up to 10 tries of area ~ U(scale) x area, log aspect ~ U(log ratio),
  then the central crop), each resampled to ``size`` (PIL bilinear, antialiased on downscale),
  optionally flipped. Every random number comes from ``view_rng(seed, epoch, index)``, so a view
  depends only on those three: runs repeat, a resume replays its epoch, and DataLoader workers
  or ranks need no shared state.

The batched device augmentation (engine.squeeze.augment) then adds only the photometric steps
(``augment_color``); students (engine.evaluate.student) keep their flip and CutMix.
Built-in in-memory data (MNIST, digits, CIFAR) is already at its native size and has no views.

Sources: ``FileSource`` decodes the file per read; engine.data.decode_cache.DecodeCache (a run's
memory-mapped cache of the whole split, the default for trees that fit data.cache_mb) and
``MemorySource`` (a small subset decoded in memory, for trees not in a cache) hold images with the
shorter side capped at CACHE_SIDE_FACTOR x the output size; all three give the same boxes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from engine.errors import ConfigError

EVAL_CROP_RATIO = 0.875
"""Center-crop fraction of the eval transform: size / round(size / 0.875) (224 of 256)."""

CACHE_SIDE_FACTOR = 2
"""An in-memory source keeps the shorter side at most this many times the output size (448 px for
224): crops of a quarter of the image area or more are never upsampled from the cache."""


@dataclass(frozen=True)
class CropSpec:
    """What a crop-view dataset hands out per index."""

    size: int
    """Output side length."""
    scale: tuple[float, float] = (0.08, 1.0)
    """Area fraction range of the crop (of the full image)."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    views: int = 1
    """Independent crops per image: 1 gives [C,S,S], more give [views,C,S,S]."""
    flip: float = 0.0
    """Probability of a horizontal flip of each view (0: the consumer flips)."""
    seed: int = 0

    def __post_init__(self) -> None:
        low, high = self.scale
        if not 0 < low <= high <= 1:
            raise ConfigError(f"crop scale={tuple(self.scale)} must satisfy 0 < low <= high <= 1")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ConfigError(f"crop ratio={tuple(self.ratio)} must satisfy 0 < low <= high")
        if self.views < 1 or self.size < 1:
            raise ConfigError(f"crop views={self.views} and size={self.size} must be >= 1")


def view_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index, 0x5CDD])


def crop_box(rng: np.random.Generator, height: int, width: int, scale: Sequence[float],
             ratio: Sequence[float]) -> tuple[int, int, int, int]:
    """(top, left, height, width) of one crop: torchvision's RandomResizedCrop.get_params."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def eval_resize_side(size: int, ratio: float) -> int:
    return int(round(size / ratio))


def open_image(path: Path, channels: int) -> Image.Image:
    """The decoded file in gray (channels 1) or RGB; one ConfigError line for a bad file."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB" if channels == 3 else "L")
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ConfigError(f"image file {path} is corrupt or unreadable ({exc}); remove or replace it") from exc


def eval_crop(img: Image.Image, size: int, ratio: float = EVAL_CROP_RATIO) -> Image.Image:
    """Resize the shorter side to round(size / ratio), center-crop size x size (torchvision's rounding)."""
    resize = eval_resize_side(size, ratio)
    w, h = img.size
    if min(w, h) != resize:
        if w <= h:
            new = (resize, int(resize * h / w))
        else:
            new = (int(resize * w / h), resize)
        img = img.resize(new, Image.BILINEAR)
    w, h = img.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def to_chw(img: Image.Image | np.ndarray) -> torch.Tensor:
    """uint8 [C,H,W] of a PIL image or an HWC/HW array."""
    array = np.asarray(img, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def crop_image(img: Image.Image, box: tuple[int, int, int, int], size: int, shrink: float = 1.0) -> Image.Image:
    """The box (in full-resolution coordinates) resampled to size x size. ``shrink``: the source was
    stored downscaled by this factor (a cache), so the box is scaled to it."""
    top, left, h, w = box
    if shrink == 1.0:  # torchvision's resized_crop on a PIL image: crop, then resize
        return img.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)
    return img.resize((size, size), Image.BILINEAR,
                      box=(left * shrink, top * shrink, (left + w) * shrink, (top + h) * shrink))


def draw(rng: np.random.Generator, height: int, width: int, spec: CropSpec
         ) -> list[tuple[tuple[int, int, int, int], bool]]:
    """(box, flipped) of each of ``spec.views`` views of a height x width image."""
    out = []
    for _ in range(spec.views):
        box = crop_box(rng, height, width, spec.scale, spec.ratio)
        out.append((box, bool(rng.random() < spec.flip)))
    return out


def render(img: Image.Image, drawn, size: int, shrink: float = 1.0,
           finish: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> list[torch.Tensor]:
    """uint8 [C,S,S] views of ``img`` for ``drawn`` boxes (``draw``); ``finish`` post-processes each
    view's HWC/HW array (e.g. a codec round trip)."""
    views = []
    for box, flip in drawn:
        view = crop_image(img, box, size, shrink)
        if flip:
            view = view.transpose(Image.FLIP_LEFT_RIGHT)
        array = np.asarray(view, dtype=np.uint8)
        views.append(to_chw(finish(array) if finish is not None else array))
    return views


def tensor_views(image: torch.Tensor, spec: CropSpec, rng: np.random.Generator) -> list[torch.Tensor]:
    """The same rule on an in-memory uint8 [C,H,W] tensor (torchvision's antialiased resize)."""
    from torchvision.transforms.v2 import functional as TF

    out = []
    for (top, left, h, w), flip in draw(rng, image.shape[-2], image.shape[-1], spec):
        view = TF.resized_crop(image, top, left, h, w, [spec.size, spec.size], antialias=True)
        out.append(view.flip(-1) if flip else view)
    return out


class FileSource:
    """Full-resolution images decoded from files, one per index."""

    def __init__(self, files: Sequence[Path], channels: int) -> None:
        self.files, self.channels = list(files), channels

    def __len__(self) -> int:
        return len(self.files)

    def get(self, index: int) -> tuple[Image.Image, tuple[int, int], float]:
        """(image, full-resolution (height, width), shrink factor of the image against it)."""
        img = open_image(self.files[index], self.channels)
        return img, (img.size[1], img.size[0]), 1.0

    def full_sizes(self) -> list[tuple[int, int]]:
        sizes = []
        for path in self.files:
            try:
                with Image.open(path) as img:
                    sizes.append((img.size[1], img.size[0]))
            except (UnidentifiedImageError, OSError, SyntaxError) as exc:
                raise ConfigError(f"image file {path} is corrupt or unreadable ({exc}); remove or replace it") from exc
        return sizes


def cached_bytes(sizes: Sequence[tuple[int, int]], channels: int, max_short: int) -> int:
    """Bytes of 8-bit images of ``sizes`` after capping the shorter side at ``max_short``."""
    total = 0
    for h, w in sizes:
        f = min(1.0, max_short / min(h, w))
        total += channels * max(1, round(h * f)) * max(1, round(w * f))
    return total


class MemorySource:
    """Images decoded once into memory with the shorter side capped at ``max_short`` (see
    CACHE_SIDE_FACTOR); boxes are drawn in full-resolution coordinates and scaled, so a crop from
    the cache shows the same region as one from the file (only resampled from fewer pixels)."""

    def __init__(self, files: FileSource, max_short: int) -> None:
        self.channels = files.channels
        self.arrays, self.sizes, self.shrink = [], [], []
        for i in range(len(files)):
            img, full, _ = files.get(i)
            f = min(1.0, max_short / min(full))
            if f < 1.0:
                img = img.resize((max(1, round(full[1] * f)), max(1, round(full[0] * f))), Image.BILINEAR)
            self.arrays.append(np.asarray(img, dtype=np.uint8))
            self.sizes.append(full)
            # the exact factor of the stored array (rounding of its sides), per axis nearly equal
            self.shrink.append(self.arrays[-1].shape[1] / full[1])

    def __len__(self) -> int:
        return len(self.arrays)

    def get(self, index: int) -> tuple[Image.Image, tuple[int, int], float]:
        return Image.fromarray(self.arrays[index]), self.sizes[index], self.shrink[index]


class CropViews(Dataset):
    """(uint8 views of one image, label): [C,S,S] for one view, [views,C,S,S] for more.

    ``at_epoch(e)`` returns the same dataset drawing epoch e's crops (a DataLoader built afterwards
    carries it to its workers). ``finish`` (uint8 HWC/HW array -> array) post-processes each view,
    e.g. a codec round trip.
    """

    crops_in_data = True
    """Consumers that crop themselves (students' boxes) skip their crop for this dataset."""

    def __init__(self, source, labels: Sequence[int], spec: CropSpec, epoch: int = 0,
                 finish: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> None:
        self.source, self.labels, self.spec, self.epoch, self.finish = source, list(labels), spec, epoch, finish

    def __len__(self) -> int:
        return len(self.labels)

    def at_epoch(self, epoch: int) -> "CropViews":
        return CropViews(self.source, self.labels, self.spec, epoch, self.finish)

    def boxes(self, index: int, epoch: Optional[int] = None) -> list[tuple[tuple[int, int, int, int], bool]]:
        """(box in full-resolution coordinates, flipped) of each view of ``index`` (what __getitem__ uses)."""
        height, width = self._full_size(index)
        return draw(view_rng(self.spec.seed, self.epoch if epoch is None else epoch, index), height, width, self.spec)

    def _full_size(self, index: int) -> tuple[int, int]:
        sizes = getattr(self.source, "sizes", None)
        return sizes[index] if sizes is not None else self.source.get(index)[1]

    def __getitem__(self, index: int):
        img, (height, width), shrink = self.source.get(index)
        drawn = draw(view_rng(self.spec.seed, self.epoch, index), height, width, self.spec)
        views = render(img, drawn, self.spec.size, shrink, self.finish)
        return (views[0] if self.spec.views == 1 else torch.stack(views)), self.labels[index]


def at_epoch(dataset: Dataset, epoch: int) -> Dataset:
    """``dataset`` drawing ``epoch``'s crops when it crops itself, else ``dataset`` unchanged."""
    return dataset.at_epoch(epoch) if hasattr(dataset, "at_epoch") else dataset


def crops_in_data(dataset: Dataset) -> bool:
    """True when ``dataset`` hands out random crops itself (its consumer must not crop again)."""
    return bool(getattr(dataset, "crops_in_data", False))
