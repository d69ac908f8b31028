"""Class-per-folder trees (ImageNet-1K, Tiny-ImageNet, user data), streamed from disk."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from engine.data.bundle import DataBundle, DataConfig
from engine.data.decode_cache import DecodeCache, header_size, open_or_build
from engine.data.tensor_dataset import TensorImageDataset, resize_uint8
from engine.data.views import CropSpec, CropViews, FileSource, eval_crop, open_image, to_chw
from engine.errors import ConfigError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


def _images_under(folder: Path) -> list[Path]:
    # Recursive because Tiny-ImageNet keeps train images in <class>/images/.
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def scan_class_folders(split_dir: Path) -> dict[str, list[Path]]:
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    return {c: _images_under(split_dir / c) for c in classes}


def scan_tiny_imagenet_val(val_dir: Path) -> dict[str, list[Path]]:
    """Tiny-ImageNet's val/images + val_annotations.txt (file<TAB>wnid<TAB>box...)."""
    per_class: dict[str, list[Path]] = {}
    annotations = val_dir / "val_annotations.txt"
    for line_no, line in enumerate(annotations.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2:
            raise ConfigError(f"{annotations}:{line_no} is malformed (expected 'file<TAB>class'); "
                              f"fix or regenerate the annotation file")
        per_class.setdefault(parts[1], []).append(val_dir / "images" / parts[0])
    return {c: sorted(v) for c, v in sorted(per_class.items())}


def load_image(path: Path, channels: int, size: int, ratio: float = 1.0) -> torch.Tensor:
    """Decode, convert to gray/RGB, Resize(round(size / ratio)) + CenterCrop(size) (engine.data.views);
    float [C,S,S] in [0,1]. ratio 1 keeps a size x size file's pixels exactly."""
    return to_chw(eval_crop(open_image(path, channels), size, ratio)).float().div_(255.0)


class ImageFolderDataset(Dataset):
    """Lists files at construction, decodes one image per __getitem__ (never all in memory).

    Items are the eval transform of the file (``crop_ratio``: see engine.data.views.eval_crop);
    ``crop_views(spec)`` gives the random-resized-crop views of the full-resolution files instead.
    """

    def __init__(self, files: list[Path], labels: list[int], channels: int, image_size: int,
                 crop_ratio: float = 1.0, cache: Optional[DecodeCache] = None) -> None:
        self.files = files
        self.labels = labels
        self.channels = channels
        self.image_size = image_size
        self.crop_ratio = crop_ratio
        self.cache = cache
        """The split decoded once (engine.data.decode_cache); None: every read decodes the file."""

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        if self.cache is None:
            return load_image(self.files[index], self.channels, self.image_size, self.crop_ratio), self.labels[index]
        img = self.cache.get(index)[0]
        return to_chw(eval_crop(img, self.image_size, self.crop_ratio)).float().div_(255.0), self.labels[index]

    def source(self, indices: Optional[Sequence[int]] = None):
        """Where crops of ``indices`` (default all) come from: the decode cache when the split has one,
        else the full-resolution files (both the source interface of engine.data.views)."""
        if self.cache is not None:
            return self.cache.subset(indices)
        files = self.files if indices is None else [self.files[i] for i in indices]
        return FileSource(files, self.channels)

    def crop_views(self, spec: CropSpec) -> CropViews:
        return CropViews(self.source(), self.labels, spec)


class InMemoryTree(TensorImageDataset):
    """A split of an image-folder tree held as one uint8 tensor at the working size: training crops are cut
    on the device from it, exactly as for the built-in sets, instead of one file crop per image in loader
    workers. ``files`` stays for the FFCV/DALI converters, which read the files themselves."""

    def __init__(self, images: torch.Tensor, labels: Sequence[int], files: list[Path]) -> None:
        super().__init__(images, torch.as_tensor(list(labels)))
        self.files = files


def _in_memory_splits(train: ImageFolderDataset, val: ImageFolderDataset, image_size: int, crop_ratio: float,
                      budget_bytes: int) -> Optional[tuple[InMemoryTree, InMemoryTree]]:
    """Both splits as InMemoryTree when both are cached, the eval transform is a plain resize
    (data.eval_crop_ratio 1.0, the setting for data stored at its working size) and every file of both
    splits is one square size S <= image_size; None otherwise (the tree streams file crops).

    Files smaller than image_size are upscaled once, as the built-in sets are: a crop of the upscaled
    image shows what a crop of the file upscaled would. A larger file would lose pixels in memory, and a
    center-crop eval transform would show the test split zoomed against every unaugmented train read
    (the feature probe, real starts, random real rows), which the streaming path zooms too."""
    if train.cache is None or val.cache is None or crop_ratio != 1.0:
        return None
    train_pixels = train.cache.uniform_images(image_size)
    test_pixels = val.cache.uniform_images(image_size)
    if train_pixels is None or test_pixels is None:
        return None
    if (len(train_pixels) + len(test_pixels)) * train.channels * image_size ** 2 > budget_bytes:
        return None
    return tuple(InMemoryTree(resize_uint8(torch.from_numpy(pixels), image_size, split.channels), split.labels,
                              split.files)
                 for split, pixels in ((train, train_pixels), (val, test_pixels)))


def _verify(files: list[Path], mode: str) -> None:
    for path in files:
        try:
            with Image.open(path) as img:
                if mode == "full":
                    img.load()
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise ConfigError(f"image file {path} is corrupt or unreadable ({type(exc).__name__}); "
                              f"remove or replace it") from exc


def _flatten(per_class: dict[str, list[Path]], class_index: dict[str, int]):
    files, labels = [], []
    for name, paths in per_class.items():
        files.extend(paths)
        labels.extend([class_index[name]] * len(paths))
    return files, labels


def _stats_from_sample(dataset: ImageFolderDataset, samples: int, seed: int):
    rng = np.random.default_rng(seed)
    picks = rng.permutation(len(dataset))[: min(samples, len(dataset))]
    total = torch.zeros(dataset.channels, dtype=torch.float64)
    total_sq = torch.zeros(dataset.channels, dtype=torch.float64)
    count = 0
    for i in picks:
        x = dataset[int(i)][0].double()
        total += x.sum(dim=(1, 2))
        total_sq += (x * x).sum(dim=(1, 2))
        count += x.shape[1] * x.shape[2]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(1e-12).sqrt()
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


def _caches(cfg: DataConfig, cache_dirs: Optional[dict[str, Path]], splits: dict[str, list[Path]],
            channels: int, image_size: int) -> dict[str, Optional[DecodeCache]]:
    if not cache_dirs or cfg.cache_mb <= 0:
        return {split: None for split in splits}
    return {split: open_or_build(cache_dirs[split], files, channels, image_size, cfg.cache_mb << 20,
                                 f"the {split} split of {cfg.root}", workers=cfg.cache_workers)
            for split, files in splits.items()}


def load_imagefolder(cfg: DataConfig, cache_dirs: Optional[dict[str, Path]] = None) -> DataBundle:
    """``cache_dirs`` ({'train': folder, 'test': folder}, from the run layout): decode each split once
    into a cache there when it fits ``data.cache_mb`` (engine.data.decode_cache)."""
    if not cfg.root:
        raise ConfigError("data=imagefolder needs data.root=DIR holding train/ and val/ class folders")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data.root={root} does not exist; point it at a folder with train/ and val/")
    train_dir, val_dir = root / "train", root / "val"
    for split_dir in (train_dir, val_dir):
        if not split_dir.is_dir():
            raise ConfigError(f"{split_dir} is missing; data.root needs train/ and val/ subfolders")
    train_classes = scan_class_folders(train_dir)
    if not train_classes:
        raise ConfigError(f"{train_dir} has no class folders; put one folder of images per class there")
    if (val_dir / "val_annotations.txt").is_file():
        val_classes = scan_tiny_imagenet_val(val_dir)
    else:
        val_classes = scan_class_folders(val_dir)
    for split_name, per_class in (("train", train_classes), ("val", val_classes)):
        empty = [c for c, paths in per_class.items() if not paths]
        if empty:
            raise ConfigError(f"class folder(s) {empty[:5]} in {root / split_name} hold no images; "
                              f"add images or remove the folder")
    unknown = sorted(set(val_classes) - set(train_classes))
    if unknown:
        raise ConfigError(f"val class(es) {unknown[:5]} have no train folder in {train_dir}; "
                          f"make val/ use the same class names as train/")
    class_names = sorted(train_classes)
    class_index = {c: i for i, c in enumerate(class_names)}
    train_files, train_labels = _flatten(train_classes, class_index)
    val_files, val_labels = _flatten(val_classes, class_index)
    channels = cfg.channels or 3
    image_size = cfg.image_size or min(header_size(train_files[0]))
    caches = _caches(cfg, cache_dirs, {"train": train_files, "test": val_files}, channels, image_size)
    if cfg.verify != "none":  # a split in the cache was decoded whole when it was built, unchanged since
        _verify([f for split, files in (("train", train_files), ("test", val_files)) if caches[split] is None
                 for f in files], cfg.verify)
    train = ImageFolderDataset(train_files, train_labels, channels, image_size, cfg.eval_crop_ratio, caches["train"])
    val = ImageFolderDataset(val_files, val_labels, channels, image_size, cfg.eval_crop_ratio, caches["test"])
    if cfg.mean is not None and cfg.std is not None:
        mean, std = list(cfg.mean), list(cfg.std)
    else:
        mean, std = _stats_from_sample(train, cfg.stats_samples, cfg.split_seed)
    in_memory = _in_memory_splits(train, val, image_size, cfg.eval_crop_ratio, cfg.cache_mb << 20)
    if in_memory is not None:
        train, val = in_memory
        print(f"decode cache: every image of {root} has one square size, at most the working size {image_size}: "
              f"both splits held in memory at {image_size} px ({len(train)} + {len(val)} images), training "
              f"crops taken on the device as for the built-in sets")
    return DataBundle(name="imagefolder", train=train, test=val, num_classes=len(class_names),
                      image_size=image_size, channels=channels, mean=mean, std=std,
                      class_names=class_names)
