"""One decode path for image trees: every file decoded once into a memory-mapped cache in the run dir.

FFCV-style: the cache keeps each image with its shorter side capped at ``CACHE_SIDE_FACTOR`` x the
output size (448 px for 224; an image already smaller is kept at its own resolution, pixel for
pixel), and every consumer crops from it: random resized crops draw their box in the file's
full-resolution coordinates and scale it to the stored image (engine.data.views.crop_image), the
eval transform resizes and center-crops the stored image. So a crop from the cache shows the same
region as one from the file; it is resampled from fewer pixels only for images larger than the cap
(bilinear, antialiased: a downscale by PIL before the crop's own resampling).

On disk, one folder per split (engine.artifacts.layout.RunLayout.decode_cache):

    images.u8    every stored image, HWC (HW for gray) uint8, back to back
    table.npy    int64 [N, 5]: byte offset, stored height, stored width, full height, full width
    meta.json    written last: format, the tree's fingerprint digest, count, bytes, channels, cap

The fingerprint is the list of files with their sizes and modification times (plus channels and
the cap), so adding, removing or modifying a file makes the cache stale: it is rebuilt, and the
rebuild is announced. A cache that is unreadable or inconsistent (truncated, wrong size, bad
table) is rebuilt, announced in one line. A tree whose stored pixels exceed the budget
(``data.cache_mb``) is not cached: it streams from the files through the loaders' workers.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from engine.data.views import CACHE_SIDE_FACTOR, open_image
from engine.errors import ConfigError
from engine.io import atomic_write, save_json

FORMAT = "scdd-decode-cache-v1"
IMAGES_FILE, TABLE_FILE, META_FILE = "images.u8", "table.npy", "meta.json"


def max_short_side(image_size: int) -> int:
    """The written-down maximum shorter side of a cached image for output size ``image_size``."""
    return CACHE_SIDE_FACTOR * image_size


def stored_shape(height: int, width: int, max_short: int) -> tuple[int, int]:
    """(height, width) an image of that full size is stored at under the cap (its own when smaller)."""
    f = min(1.0, max_short / min(height, width))
    return (max(1, round(height * f)), max(1, round(width * f))) if f < 1.0 else (height, width)


def tree_fingerprint(files: Sequence[Path], channels: int, max_short: int) -> str:
    """Digest of (path, size, mtime_ns) of every file, the channel count and the cap.

    A file rewritten with the same size within the same nanosecond timestamp is not noticed; every
    other add, remove or modify is."""
    h = hashlib.sha256(f"{FORMAT}|{channels}|{max_short}|{len(files)}".encode())
    for path in files:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise ConfigError(f"image file {path} is missing or unreadable ({exc}); rescan the tree") from exc
        h.update(f"\n{path}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def header_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file's header; one ConfigError line for a bad file."""
    try:
        with Image.open(path) as img:
            return img.size[1], img.size[0]
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ConfigError(f"image file {path} is corrupt or unreadable ({exc}); remove or replace it") from exc


class DecodeCache:
    """A built cache of one split, read through a read-only memory map (opened lazily, per process,
    so DataLoader workers share the page cache instead of pickling pixels). The source interface
    of engine.data.views: ``get(i)`` -> (PIL image, full (height, width), shrink factor)."""

    def __init__(self, folder: Path, indices: Optional[np.ndarray] = None) -> None:
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / META_FILE).read_text())
        self.channels = int(self.meta["channels"])
        self.table = np.load(self.folder / TABLE_FILE)
        self.indices = indices
        self._map: Optional[np.memmap] = None
        self._sizes: Optional[list[tuple[int, int]]] = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_map"] = None
        return state

    def __len__(self) -> int:
        return len(self.table) if self.indices is None else len(self.indices)

    def subset(self, indices: Optional[Sequence[int]]) -> "DecodeCache":
        """The same cache seen through ``indices`` (positions of this view), nothing copied."""
        if indices is None:
            return self
        chosen = np.asarray(indices, dtype=np.int64)
        view = DecodeCache.__new__(DecodeCache)
        view.__dict__.update(self.__getstate__())
        view.indices = chosen if self.indices is None else self.indices[chosen]
        view._sizes = None
        return view

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """Full-resolution (height, width) of every image of this view (the crop boxes' frame)."""
        if self._sizes is None:
            rows = self.table if self.indices is None else self.table[self.indices]
            self._sizes = [(int(h), int(w)) for h, w in rows[:, 3:5]]
        return self._sizes

    def array(self, index: int) -> np.ndarray:
        """The stored uint8 image, HWC (HW for gray); a copy, safe to keep."""
        if self._map is None:
            self._map = np.memmap(self.folder / IMAGES_FILE, dtype=np.uint8, mode="r")
        row = self.table[index if self.indices is None else self.indices[index]]
        offset, h, w = int(row[0]), int(row[1]), int(row[2])
        flat = self._map[offset:offset + h * w * self.channels]
        return np.array(flat.reshape((h, w) if self.channels == 1 else (h, w, self.channels)))

    def uniform_images(self, max_size: int) -> Optional[np.ndarray]:
        """Every image of this view as one uint8 array [N, C, S, S] when each file is one S x S size with
        S <= ``max_size``, stored pixel for pixel (a tree kept at or below its working size, like MNIST or
        CIFAR written as PNGs); None otherwise."""
        rows = self.table if self.indices is None else self.table[self.indices]
        if len(rows) == 0:
            return None
        side = int(rows[0, 1])
        if side > max_size or not (rows[:, 1:5] == side).all():
            return None
        if self._map is None:
            self._map = np.memmap(self.folder / IMAGES_FILE, dtype=np.uint8, mode="r")
        per_image = side * side * self.channels
        if self.indices is None and (rows[:, 0] == np.arange(len(rows)) * per_image).all():
            flat = np.asarray(self._map[:len(rows) * per_image])
        else:
            flat = np.concatenate([self._map[o:o + per_image] for o in rows[:, 0].tolist()])
        return np.ascontiguousarray(flat.reshape(len(rows), side, side, self.channels).transpose(0, 3, 1, 2))

    def get(self, index: int) -> tuple[Image.Image, tuple[int, int], float]:
        row = self.table[index if self.indices is None else self.indices[index]]
        array = self.array(index)
        return Image.fromarray(array), (int(row[3]), int(row[4])), array.shape[1] / int(row[4])


def _check(folder: Path, fingerprint: str, count: int) -> Optional[str]:
    """None when the cache in ``folder`` is complete and made from this tree, else why not."""
    meta_file = folder / META_FILE
    if not meta_file.is_file():
        return f"{META_FILE} is missing (an interrupted build)"
    try:
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != FORMAT:
            return f"format {meta.get('format')!r} is not {FORMAT}"
        if meta.get("fingerprint") != fingerprint:
            return "the image tree changed since it was built (files added, removed or modified)"
        table = np.load(folder / TABLE_FILE)
        size = (folder / IMAGES_FILE).stat().st_size
    except (OSError, ValueError, KeyError) as exc:
        return f"it is unreadable ({type(exc).__name__}: {exc})"
    if table.ndim != 2 or table.shape != (count, 5) or table.dtype != np.int64:
        return f"its table has shape {table.shape}, not ({count}, 5)"
    if size != meta.get("bytes") or (count and int(table[-1, 0] + table[-1, 1] * table[-1, 2] * meta["channels"]) != size):
        return f"its pixel file holds {size} bytes, not the {meta.get('bytes')} its table describes"
    return None


def build(folder: Path, files: Sequence[Path], channels: int, max_short: int, fingerprint: str,
          workers: int = 0) -> None:
    """Decode every file once into ``folder`` (meta.json last: its presence means complete)."""
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    table = np.zeros((len(files), 5), dtype=np.int64)
    offset = 0
    for i, path in enumerate(files):
        full = header_size(path)
        h, w = stored_shape(*full, max_short)
        table[i] = (offset, h, w, full[0], full[1])
        offset += h * w * channels
    data = np.memmap(folder / IMAGES_FILE, dtype=np.uint8, mode="w+", shape=(max(offset, 1),))
    for i, array in _decoded(files, channels, table, workers):
        data[table[i, 0]:table[i, 0] + array.size] = array.reshape(-1)
    data.flush()
    del data
    if offset == 0:
        os.truncate(folder / IMAGES_FILE, 0)
    def write_table(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, table)

    atomic_write(folder / TABLE_FILE, write_table)
    save_json({"format": FORMAT, "fingerprint": fingerprint, "count": len(files), "bytes": offset,
               "channels": channels, "max_short": max_short}, folder / META_FILE)


def _decode_one(path: Path, channels: int, h: int, w: int) -> np.ndarray:
    img = open_image(path, channels)
    if img.size != (w, h):
        img = img.resize((w, h), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


class _Decode:
    """Picklable per-index decode for DataLoader workers."""

    def __init__(self, files, channels, table) -> None:
        self.files, self.channels, self.table = files, channels, table

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        return i, _decode_one(self.files[i], self.channels, int(self.table[i, 1]), int(self.table[i, 2]))


def _identity(item):
    return item


def _decoded(files, channels, table, workers):
    job = _Decode(list(files), channels, table)
    if workers <= 0:
        for i in range(len(job)):
            yield job[i]
        return
    from torch.utils.data import DataLoader

    loader = DataLoader(job, batch_size=None, num_workers=workers, collate_fn=_identity)
    for i, array in loader:
        yield int(i), np.asarray(array)


def cache_bytes(files: Sequence[Path], channels: int, max_short: int, budget: int) -> Optional[int]:
    """Bytes the cache of ``files`` takes, or None as soon as the headers read so far exceed ``budget``
    (a large tree is not scanned to the end)."""
    total = 0
    for path in files:
        h, w = stored_shape(*header_size(path), max_short)
        total += h * w * channels
        if total > budget:
            return None
    return total


def open_or_build(folder: Path, files: Sequence[Path], channels: int, image_size: int, budget_bytes: int,
                  what: str, workers: int = 0, announce=print) -> Optional[DecodeCache]:
    """The cache of ``files`` in ``folder``: reused when it matches the tree, else (re)built, announced
    in one line. None (announced) when it would exceed ``budget_bytes``: the tree then streams."""
    folder = Path(folder)
    max_short = max_short_side(image_size)
    fingerprint = reason = None
    if folder.exists():
        fingerprint = tree_fingerprint(files, channels, max_short)
        reason = _check(folder, fingerprint, len(files))
        if reason is None:
            return DecodeCache(folder)
    need = cache_bytes(files, channels, max_short, budget_bytes)  # a large tree stops early, unstat'ed
    if need is None:
        announce(f"decode cache: {what} ({len(files)} files) exceeds data.cache_mb={budget_bytes >> 20} once "
                 f"decoded (shorter side <= {max_short} px); streaming it from the files")
        if folder.exists():
            shutil.rmtree(folder)
        return None
    if reason is not None and folder.exists():
        announce(f"decode cache {folder} is stale or corrupt ({reason}); rebuilding it")
    # built beside, then renamed: ranks or runs building the same cache at once never see half of one
    fingerprint = fingerprint or tree_fingerprint(files, channels, max_short)
    building = folder.with_name(f".{folder.name}.{os.getpid()}.building")
    build(building, files, channels, max_short, fingerprint, workers)
    if folder.exists():
        if _check(folder, fingerprint, len(files)) is None:  # another process finished first
            shutil.rmtree(building)
            return DecodeCache(folder)
        shutil.rmtree(folder, ignore_errors=True)
    try:
        os.rename(building, folder)
    except OSError:  # another process renamed its build in between
        shutil.rmtree(building, ignore_errors=True)
        if _check(folder, fingerprint, len(files)) is not None:
            raise ConfigError(f"decode cache {folder} could not be written (another process holds a different "
                              f"one); remove {folder} and rerun") from None
    announce(f"decode cache: {what} decoded once into {folder} ({len(files)} images, {need / 2**20:.1f} MiB, "
             f"shorter side <= {max_short} px)")
    return DecodeCache(folder)


def eval_images(dataset, budget_bytes: int, workers: int = 0):
    """A split's eval-transform images decoded once into one uint8 tensor (a TensorImageDataset) when
    they fit ``budget_bytes``; ``dataset`` itself otherwise, or when it is in memory already.

    The eval transform is deterministic, so every later test pass (every eval_every epochs of every
    row) slices this tensor instead of decoding the split again."""
    import torch
    from torch.utils.data import DataLoader

    from engine.data.tensor_dataset import TensorImageDataset

    if isinstance(getattr(dataset, "images", None), torch.Tensor) or len(dataset) == 0:
        return dataset
    first = dataset[0][0]
    if len(dataset) * first.numel() > budget_bytes:
        return dataset
    images = torch.empty((len(dataset), *first.shape), dtype=torch.uint8)
    position = 0
    for batch, _ in DataLoader(dataset, batch_size=256, num_workers=workers):
        images[position:position + len(batch)] = (batch * 255).round().to(torch.uint8)
        position += len(batch)
    return TensorImageDataset(images, torch.as_tensor(list(dataset.labels)))
