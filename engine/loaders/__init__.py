"""Loader registry: ``build_loader(kind, ...)`` -> batches of (normalized float32 [B,C,H,W], int64 [B]).

Three back ends share one contract (see engine/loaders/common.py):
  torch  torch DataLoader over the data bundle (image-folder trees: crops of the run's decode cache,
         engine.data.decode_cache, or PIL decode of the files when the tree is not cached)
  ffcv   .beton files written by ``python -m engine.loaders.convert_ffcv``
  dali   NVIDIA DALI decoding the bundle's image files (or in-memory images) on CPU or GPU
"""
from __future__ import annotations

from typing import Callable, Optional

from engine.data import DataBundle
from engine.errors import ConfigError
from engine.loaders.common import BatchLoader, LoaderSpec, epoch_order, shard_indices

SPLITS = ("train", "test")


def _split_dataset(bundle: Optional[DataBundle], split: str, kind: str):
    if bundle is None:
        raise ConfigError(f"loader={kind} needs a data bundle (build_data(...)) for split {split}")
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is not one of {'|'.join(SPLITS)}")
    return bundle.train if split == "train" else bundle.test


def _torch(bundle, split, spec, rank, world_size):
    from engine.loaders.torch_loader import TorchLoader

    dataset = _split_dataset(bundle, split, "torch")
    return TorchLoader(dataset, bundle.mean, bundle.std, bundle.channels,
                       spec.image_size or bundle.image_size, spec, rank, world_size,
                       f"{bundle.name} {split} split")


def _dali(bundle, split, spec, rank, world_size):
    from engine.loaders.dali_loader import DALILoader

    dataset = _split_dataset(bundle, split, "dali")
    return DALILoader(dataset, bundle.mean, bundle.std, bundle.channels,
                      spec.image_size or bundle.image_size, spec, rank, world_size,
                      f"{bundle.name} {split} split")


def _ffcv(bundle, split, spec, rank, world_size):
    from engine.loaders.ffcv_loader import FFCVLoader, beton_path, read_meta

    path = beton_path(spec.beton_dir, split)
    meta = read_meta(spec.beton_dir)
    mean, std = (bundle.mean, bundle.std) if bundle is not None else (meta["mean"], meta["std"])
    channels = bundle.channels if bundle is not None else meta["channels"]
    size = spec.image_size or (bundle.image_size if bundle is not None else meta["image_size"])
    # betons of image files hold them at full resolution; eval takes meta's center-crop ratio
    ratio = 1.0 if meta.get("fixed_size", True) else meta.get("eval_crop_ratio", 1.0)
    return FFCVLoader(path, mean, std, channels, meta["channels"], size, spec, rank, world_size, ratio)


LOADERS: dict[str, Callable[..., BatchLoader]] = {"torch": _torch, "ffcv": _ffcv, "dali": _dali}


def build_loader(kind: str, bundle: Optional[DataBundle], split: str = "train",
                 spec: Optional[LoaderSpec] = None, rank: Optional[int] = None,
                 world_size: Optional[int] = None) -> BatchLoader:
    """A loader of one rank's shard of ``split`` ('train' or 'test').

    rank/world_size default to engine.distributed.current() (one process when never initialized).
    ffcv reads ``spec.beton_dir``; its bundle may be None (mean/std then come from meta.json).
    """
    if kind not in LOADERS:
        raise ConfigError(f"unknown loader '{kind}'; choose one of {sorted(LOADERS)}")
    if rank is None or world_size is None:
        from engine.distributed import current

        env = current()
        rank = env.rank if rank is None else rank
        world_size = env.world_size if world_size is None else world_size
    return LOADERS[kind](bundle, split, spec or LoaderSpec(), rank, world_size)


__all__ = ["LOADERS", "BatchLoader", "LoaderSpec", "build_loader", "epoch_order", "shard_indices"]
