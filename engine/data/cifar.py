"""CIFAR-10/100 from the official python pickle batches in a folder."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from engine.data.bundle import DataBundle, DataConfig
from engine.data.tensor_dataset import TensorImageDataset, resize_uint8
from engine.errors import ConfigError

# Standard statistics used across the literature for these two sets.
CIFAR_STATS = {
    "cifar10": ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),
    "cifar100": ([0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]),
}
_LAYOUT = {
    "cifar10": (["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"],
                ["test_batch"], b"labels", 10),
    "cifar100": (["train"], ["test"], b"fine_labels", 100),
}


def _find_batch_dir(root: Path, name: str) -> Path:
    train_files = _LAYOUT[name][0]
    for candidate in (root, root / "cifar-10-batches-py", root / "cifar-100-python"):
        if all((candidate / f).is_file() for f in train_files):
            return candidate
    raise ConfigError(
        f"data.root={root} holds no {name} pickle batches (expected {train_files[0]} ...); "
        f"point data.root at the extracted official python version"
    )


def _read_batches(folder: Path, files: list[str], label_key: bytes, num_classes: int):
    images, labels = [], []
    for file in files:
        path = folder / file
        if not path.is_file():
            raise ConfigError(f"CIFAR batch file {path} is missing; re-extract the official archive")
        try:
            with open(path, "rb") as handle:
                batch = pickle.load(handle, encoding="bytes")
            data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            batch_labels = np.asarray(batch[label_key], dtype=np.int64)
        except Exception as exc:  # noqa: BLE001 - any decode failure means the same fix
            raise ConfigError(f"CIFAR batch file {path} is corrupt ({type(exc).__name__}); "
                              f"re-extract the official archive") from exc
        if len(data) != len(batch_labels) or batch_labels.min() < 0 or batch_labels.max() >= num_classes:
            raise ConfigError(f"CIFAR batch file {path} has inconsistent labels; re-extract it")
        images.append(data)
        labels.append(batch_labels)
    return np.concatenate(images), np.concatenate(labels)


def load_cifar(cfg: DataConfig, name: str) -> DataBundle:
    if not cfg.root:
        raise ConfigError(f"data={name} needs data.root=DIR pointing at the CIFAR python batches")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data.root={root} does not exist; download and extract {name} there")
    train_files, test_files, label_key, num_classes = _LAYOUT[name]
    folder = _find_batch_dir(root, name)
    train_x, train_y = _read_batches(folder, train_files, label_key, num_classes)
    test_x, test_y = _read_batches(folder, test_files, label_key, num_classes)
    train = TensorImageDataset(resize_uint8(torch.from_numpy(train_x), cfg.image_size, cfg.channels),
                               torch.from_numpy(train_y))
    test = TensorImageDataset(resize_uint8(torch.from_numpy(test_x), cfg.image_size, cfg.channels),
                              torch.from_numpy(test_y))
    mean, std = CIFAR_STATS[name]
    if cfg.mean is not None and cfg.std is not None:
        mean, std = cfg.mean, cfg.std
    channels = int(train.images.shape[1])
    if channels == 1 and len(mean) == 3:
        mean, std = [sum(mean) / 3], [sum(std) / 3]
    return DataBundle(name=name, train=train, test=test, num_classes=num_classes,
                      image_size=int(train.images.shape[-1]), channels=channels,
                      mean=list(mean), std=list(std), class_names=[str(c) for c in range(num_classes)])
