"""Small real test data built from images that ship inside PyPI packages (foolbox's samples).

foolbox is installed with --no-deps only for these files, so it is located, never imported.
"""
from __future__ import annotations

import importlib.util
import pickle
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image


def foolbox_samples(prefix: str) -> list[tuple[Path, int]]:
    """(path, label) of foolbox's real samples, e.g. prefix 'cifar10' or 'imagenet'."""
    spec = importlib.util.find_spec("foolbox")
    assert spec is not None, "foolbox is installed by `make setup` (pip install --no-deps foolbox)"
    folder = Path(spec.submodule_search_locations[0]) / "data"
    out = []
    for path in sorted(folder.iterdir()):
        parts = path.stem.split("_")
        if parts[0] == prefix and len(parts) == 3:
            out.append((path, int(parts[2])))
    assert out, f"no foolbox samples named {prefix}_*"
    return out


def make_imagefolder_tree(root: Path, prefix: str = "cifar10", layout: str = "imagenet",
                          copies: int = 1, ext: str | None = None) -> dict[str, list[Path]]:
    """Write train/ and val/ class folders from real samples; returns train files per class.

    layout 'imagenet': val/<class>/*.ext; layout 'tiny': train/<class>/images/* and
    val/images + val_annotations.txt as Tiny-ImageNet ships it. Every image goes to train (x copies);
    every other image also to val.
    """
    per_class: dict[str, list[Path]] = defaultdict(list)
    samples = foolbox_samples(prefix)
    for i, (src, label) in enumerate(samples):
        cls = f"c{label:03d}"
        suffix = ext or src.suffix
        train_dir = root / "train" / cls / ("images" if layout == "tiny" else "")
        train_dir.mkdir(parents=True, exist_ok=True)
        for k in range(copies):
            dst = train_dir / f"{src.stem}_{k}{suffix}"
            _copy_image(src, dst)
            per_class[cls].append(dst)
        if i % 2 == 0:
            if layout == "tiny":
                (root / "val" / "images").mkdir(parents=True, exist_ok=True)
                dst = root / "val" / "images" / f"val_{i}{suffix}"
                _copy_image(src, dst)
                with open(root / "val" / "val_annotations.txt", "a") as ann:
                    ann.write(f"{dst.name}\t{cls}\t0\t0\t10\t10\n")
            else:
                (root / "val" / cls).mkdir(parents=True, exist_ok=True)
                _copy_image(src, root / "val" / cls / f"{src.stem}{suffix}")
    return dict(per_class)


def _copy_image(src: Path, dst: Path) -> None:
    if src.suffix == dst.suffix:
        shutil.copyfile(src, dst)
    else:
        with Image.open(src) as img:
            img.convert("RGB").save(dst)


def write_cifar_batches(root: Path, name: str = "cifar10") -> tuple[np.ndarray, np.ndarray]:
    """Write real CIFAR samples as official-format pickle batches; returns (images, labels)."""
    samples = foolbox_samples(name)
    images = np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.uint8) for p, _ in samples])
    labels = np.array([label for _, label in samples], dtype=np.int64)
    flat = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    root.mkdir(parents=True, exist_ok=True)
    key = b"labels" if name == "cifar10" else b"fine_labels"
    files = (["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"]
             if name == "cifar10" else ["train"])
    chunks = np.array_split(np.arange(len(images)), len(files))
    for file, idx in zip(files, chunks):
        with open(root / file, "wb") as handle:
            pickle.dump({b"data": flat[idx], key: labels[idx].tolist()}, handle)
    test_file = "test_batch" if name == "cifar10" else "test"
    with open(root / test_file, "wb") as handle:
        pickle.dump({b"data": flat[:6], key: labels[:6].tolist()}, handle)
    return images, labels
