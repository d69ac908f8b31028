"""NVIDIA DALI path: decodes the class-per-folder files (or in-memory uint8 images) itself.

Files are fed by an external source in per-batch mode (``batch_info=True``), ordered by our shard
of the epoch: that keeps the order identical to the other loaders and delivers the short tail
batch (DALI's per-sample mode and its readers' shard padding do not give both). A fresh pipeline
is built per epoch so ``set_epoch`` takes effect even though DALI prefetches.
"""
from __future__ import annotations

import re
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from engine.data.views import eval_resize_side
from engine.errors import ConfigError
from engine.loaders.common import BatchLoader, LoaderSpec


_MEMORY = ("out of memory", "cuda allocation failed", "can't allocate", "cannot allocate", "failed to allocate",
           "bad_alloc", "cudaerrormemoryallocation", "cuda_error_out_of_memory")
_SETUP = ("cuda is not available", "device_id", "dlopen", "pipeline build", "error when constructing operator",
          "pipeline is not built", "no cuda-capable device", "cuda driver", "could not load library")
_DECODE = ("nvimagecodec failure", "unrecognized image format", "unsupported image type", "decod", "corrupt",
           "not a valid image")


def _parts(message: str) -> tuple[str, str]:
    """(failing operator, what it encountered) of a DALI message; DALI's banner lines and the pipeline
    definition traceback it quotes are left out (that traceback names other operators too)."""
    operator = re.search(r"operator `([^`]+)`", message)
    found = re.search(r"encountered:\s*(.*?)(?:C\+\+ context|Current pipeline object|$)", message, re.S)
    if found and found.group(1).strip():
        detail = found.group(1)
    else:
        lines = [line for line in message.splitlines() if line.strip() and not line.startswith("Critical error")]
        detail = lines[0] if lines else message
    return (operator.group(1) if operator else ""), " ".join(detail.split())


def classify_dali_error(message: str) -> str:
    """What a DALI error message says failed: ``memory`` (an allocation, on the device or the host),
    ``setup`` (the pipeline could not be built: CUDA/driver/library, device, operator arguments checked at
    build), ``decode`` (a decoder operator rejected an image: a bad file) or ``other``. Checked in that
    order: a decoder that runs out of memory is a memory error, not a bad file."""
    operator, detail = _parts(message)
    text = detail.lower()
    if any(needle in text for needle in _MEMORY):
        return "memory"
    if "when building pipeline" in message.lower() or any(needle in text for needle in _SETUP):
        return "setup"
    if "decoders" in operator or any(needle in text for needle in _DECODE):
        return "decode"
    return "other"


def _summary(message: str) -> str:
    operator, detail = _parts(message)
    return f"{operator}: {detail[:200]}" if operator else detail[:200]


def dali_error(exc: BaseException, where: str) -> BaseException:
    """The one-line ConfigError for a DALI failure while reading ``where``, saying what failed; an error of
    no known kind comes back unchanged (raised as is, with its traceback)."""
    message = str(exc).strip() or type(exc).__name__
    kind, summary = classify_dali_error(message), _summary(message)
    if kind == "decode":
        return ConfigError(f"DALI could not decode an image of {where} ({summary}); a file is corrupt or not an "
                           f"image: find it with data.verify=full")
    if kind == "memory":
        return ConfigError(f"DALI ran out of memory reading {where} ({summary}); lower the batch size or "
                           f"loader.num_workers, or decode on the CPU with loader.device=cpu")
    if kind == "setup":
        return ConfigError(f"DALI could not build its pipeline for {where} ({summary}); a setup problem, not a "
                           f"bad file: check the DALI/CUDA install, loader.device (cpu needs no GPU) and loader.*")
    return exc


class DALILoader(BatchLoader):
    def __init__(self, dataset: Dataset, mean, std, channels: int, image_size: int,
                 spec: LoaderSpec, rank: int, world_size: int, where: str) -> None:
        super().__init__(len(dataset), spec, rank, world_size, where)
        self.files = getattr(dataset, "files", None)
        images = getattr(dataset, "images", None)
        if self.files is None and images is None:
            raise ConfigError(f"loader=dali reads image files or in-memory uint8 images; {where} "
                              f"has neither; use loader=torch")
        # HWC uint8, the layout DALI's image operators expect.
        self.arrays = None if images is None else images.permute(0, 2, 3, 1).contiguous().numpy()
        self.labels = np.asarray(list(dataset.labels), dtype=np.int64)
        if not spec.normalize:
            mean, std = [0.0] * len(mean), [1.0] * len(std)
        self.mean = [255.0 * m for m in mean]
        self.std = [255.0 * s for s in std]
        self.channels = channels
        self.image_size = image_size
        self.eval_ratio = getattr(dataset, "crop_ratio", 1.0)
        self.where = where
        use_gpu = spec.device != "cpu" and torch.cuda.is_available()
        if spec.device == "cuda" and not use_gpu:
            raise ConfigError("loader device=cuda but no CUDA GPU is visible; use device=cpu")
        self.device_id = torch.cuda.current_device() if use_gpu else None

    def _source(self, order: np.ndarray):
        batch_size = self.spec.batch_size
        files, arrays, labels, where = self.files, self.arrays, self.labels, self.where

        def source(info):
            start = info.iteration * batch_size
            if start >= len(order):
                raise StopIteration
            picks = order[start:start + batch_size]
            if files is not None:
                try:
                    data = [np.fromfile(files[i], dtype=np.uint8) for i in picks]
                except OSError as exc:
                    raise ConfigError(f"DALI failed reading {where} ({exc}); the image tree "
                                      f"changed after it was listed, rebuild the data") from exc
            else:
                data = [arrays[i] for i in picks]
            return data, [labels[i:i + 1] for i in picks]

        return source

    def _pipeline(self, order: np.ndarray):
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline

        s, size = self.spec, self.image_size
        seed = (s.seed * 1_000_003 + self.epoch * 1_009 + self.rank) % (2**31 - 1)
        pipe = Pipeline(batch_size=s.batch_size, num_threads=max(1, s.num_workers),
                        device_id=self.device_id, seed=seed, prefetch_queue_depth=2)
        encoded = self.files is not None
        decode_device = "mixed" if self.device_id is not None else "cpu"
        color = types.GRAY if self.channels == 1 else types.RGB
        with pipe:
            data, labels = fn.external_source(
                source=self._source(order), num_outputs=2, batch=True, batch_info=True,
                layout=["" if encoded else "HWC", ""], dtype=[types.UINT8, types.INT64])
            if not encoded and self.device_id is not None:
                data = data.gpu()
            norm = dict(mean=self.mean, std=self.std, dtype=types.FLOAT, output_layout="CHW")
            outputs = []
            if s.transform == "eval":
                images = fn.decoders.image(data, device=decode_device, output_type=color) if encoded else data
                # Image files: Resize(round(size / ratio)) + CenterCrop(size), as engine.data; DALI rounds
                # a half-pixel crop offset up where torchvision rounds it to even (a 1 px shift at most).
                if encoded:
                    images = fn.resize(images, resize_shorter=eval_resize_side(size, self.eval_ratio), antialias=True)
                elif self.arrays.shape[1:3] != (size, size):
                    images = fn.resize(images, resize_shorter=size, antialias=True)
                outputs.append(fn.crop_mirror_normalize(images, crop=(size, size), **norm))
            else:
                crop = dict(random_area=list(s.crop_scale), random_aspect_ratio=list(s.crop_ratio))
                if encoded and s.views == 1:
                    # Decodes only the crop's region: the fast path for one view.
                    views = [fn.resize(fn.decoders.image_random_crop(
                        data, device=decode_device, output_type=color, **crop), size=(size, size),
                        antialias=True)]
                else:
                    images = (fn.decoders.image(data, device=decode_device, output_type=color)
                              if encoded else data)
                    views = [fn.random_resized_crop(images, size=(size, size), antialias=True, **crop)
                             for _ in range(s.views)]
                for view in views:
                    mirror = fn.random.coin_flip(probability=s.flip)
                    outputs.append(fn.crop_mirror_normalize(view, mirror=mirror, **norm))
            pipe.set_outputs(*outputs, labels)
        return pipe

    def __iter__(self) -> Iterator:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        order = self.indices()
        if len(order) == 0:
            return
        count = self.spec.views if self.spec.transform == "train" else 1
        names = [f"view{k}" for k in range(count)]
        pipe = None
        try:
            pipe = self._pipeline(order)
            iterator = DALIGenericIterator(pipe, names + ["label"],
                                           last_batch_policy=LastBatchPolicy.PARTIAL)
            for (batch,) in iterator:
                labels = batch["label"].reshape(-1).to(torch.int64)
                views = [batch[n] for n in names]
                if self.device_id is not None:
                    labels = labels.to(views[0].device)
                # DALI reuses its output buffers only within the iterator's copy; these are ours.
                yield (views[0] if len(views) == 1 else views), labels
        except RuntimeError as exc:
            error = dali_error(exc, self.where)
            if error is exc:
                raise
            raise error from exc
        finally:
            del pipe
