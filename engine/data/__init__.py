"""Data registry: ``data=<name>`` picks a loader that returns a DataBundle."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from engine.data.builtin import load_digits, load_mnist5k
from engine.data.bundle import DATA_PRESETS, DataBundle, DataConfig
from engine.data.cifar import load_cifar
from engine.data.imagefolder import load_imagefolder
from engine.errors import ConfigError

DATASETS: dict[str, Callable[[DataConfig], DataBundle]] = {
    "mnist5k": load_mnist5k,
    "digits": load_digits,
    "imagefolder": load_imagefolder,
    "cifar10": lambda cfg: load_cifar(cfg, "cifar10"),
    "cifar100": lambda cfg: load_cifar(cfg, "cifar100"),
}


def build_data(cfg: DataConfig, cache_dirs: Optional[dict[str, Path]] = None) -> DataBundle:
    """``cache_dirs`` ({'train': folder, 'test': folder}): where an image-folder tree's decode cache lives
    (engine.artifacts.layout.RunLayout.decode_cache); built-in data is in memory already."""
    if cfg.name not in DATASETS:
        raise ConfigError(f"unknown data '{cfg.name}'; choose one of {sorted(DATASETS)}")
    if cfg.name == "imagefolder":
        return load_imagefolder(cfg, cache_dirs)
    return DATASETS[cfg.name](cfg)


__all__ = ["DATASETS", "DATA_PRESETS", "DataBundle", "DataConfig", "build_data"]
