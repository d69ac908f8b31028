"""Distilled sets and real-subset baselines on disk: image trees plus an index, read as streams.

A distilled set is the layout users know from the reference scripts, plus an index:

    <set>/images/<class name>/ipcNNNN.png     8-bit images (JPEG with recover.image_format=jpeg)
    <set>/index.json                          files, labels, ipc indices, source teacher, fingerprint
    <set>/fingerprint.json                    written first: what the set is being made from
    <set>/batches/bNNNNNN.json                one record per finished class batch (resume)
    <set>/grid.png, loss_log.csv, summary.json

``index.json`` is written last: its presence means the set is complete. Nothing here holds a whole
set in memory: batches write their images as they finish, the index lists files, and
``DistilledSet.dataset`` streams them (a set small enough for ``cache_bytes`` is decoded once
into a uint8 tensor instead; see ``should_cache``).

A random real subset is an index list into the real training split (``real_subset.json``), served
through the same codec as the distilled sets (8-bit, PNG or JPEG), so a report's rows differ only
in their images. From an image-folder tree it is served at the files' own resolution: each item is
a random resized crop of the full file (engine.data.views), put through the codec at the output
size; see ``real_subset_dataset`` for what its memory cache keeps.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.utils import make_grid

from engine.artifacts.fingerprint import announce_overwrite, digest, require_match
from engine.data.imagefolder import ImageFolderDataset
from engine.data.views import CACHE_SIDE_FACTOR, CropSpec, CropViews, FileSource, MemorySource, cached_bytes
from engine.data.tensor_dataset import TensorImageDataset
from engine.errors import ConfigError
from engine.io import atomic_write, save_json

log = logging.getLogger("scdd.artifacts")

FORMAT = "scdd-distilled-v2"
INDEX_FILE = "index.json"
FINGERPRINT_FILE = "fingerprint.json"
REAL_SUBSET_FORMAT = "scdd-real-subset-v1"


# ----------------------------------------------------------------------------------------- codec
@dataclass(frozen=True)
class Codec:
    """How images are stored: ``png`` (lossless 8-bit) or ``jpeg`` at ``quality`` (>= 90)."""

    format: str = "png"
    quality: int = 95

    def __post_init__(self) -> None:
        if self.format not in ("png", "jpeg"):
            raise ConfigError(f"image format {self.format!r} is not one of png|jpeg")
        if self.format == "jpeg" and not 90 <= self.quality <= 100:
            raise ConfigError(f"jpeg quality {self.quality} must be in [90, 100] (lower visibly changes "
                              f"the distilled images)")

    @property
    def suffix(self) -> str:
        return ".png" if self.format == "png" else ".jpg"

    def _save(self, array: np.ndarray, target) -> None:
        image = Image.fromarray(array)
        if self.format == "png":
            image.save(target, format="PNG")
        else:
            image.save(target, format="JPEG", quality=self.quality, subsampling=0)

    def write(self, array: np.ndarray, path: Path) -> None:
        atomic_write(path, lambda tmp: self._save(array, tmp))

    def roundtrip(self, array: np.ndarray) -> np.ndarray:
        """What a reader of a file written from ``array`` gets back (identity for PNG)."""
        if self.format == "png":
            return array
        buffer = io.BytesIO()
        self._save(array, buffer)
        buffer.seek(0)
        with Image.open(buffer) as img:
            return np.asarray(img.convert(Image.fromarray(array).mode), dtype=np.uint8)


def to_uint8(images01: torch.Tensor) -> np.ndarray:
    """[N,C,H,W] in [0,1] -> uint8 [N,H,W,C] (or [N,H,W] for gray): the 8-bit quantization of a file."""
    arr = (images01.detach().cpu().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return arr[..., 0] if arr.shape[-1] == 1 else arr


def _to_chw(array: np.ndarray) -> torch.Tensor:
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(np.array(array, dtype=np.uint8)).permute(2, 0, 1)


# ----------------------------------------------------------------------- writing a set, batchwise
def image_relpath(class_name: str, ipc_index: int, codec: Codec) -> str:
    return f"images/{class_name}/ipc{ipc_index:04d}{codec.suffix}"


def prepare_set_dir(folder: Path, fingerprint: dict, resume: bool) -> None:
    """Rank 0, before synthesis: reuse a folder made with the same fingerprint (resume=true), refuse
    one made with other settings, or replace it (resume=false, announced)."""
    saved_file = folder / FINGERPRINT_FILE
    if folder.exists() and any(folder.iterdir()):
        if resume:
            saved = json.loads(saved_file.read_text())["fingerprint"] if saved_file.is_file() else None
            require_match(folder, saved, fingerprint, "distilled set")
        else:
            announce_overwrite(folder, "distilled set")
            shutil.rmtree(folder)
    (folder / "batches").mkdir(parents=True, exist_ok=True)
    save_json({"fingerprint": fingerprint, "digest": digest(fingerprint)}, saved_file)


def batch_record_path(folder: Path, index: int) -> Path:
    return folder / "batches" / f"b{index:06d}.json"


def write_batch(folder: Path, index: int, *, images01: torch.Tensor, labels: Sequence[int],
                ipc_index: Sequence[int], class_names: Sequence[str], codec: Codec, set_digest: str,
                log_rows: list[dict], first_ratio: float, init01: Optional[torch.Tensor] = None,
                task: Optional[dict] = None) -> None:
    """Write one finished class batch: its image files, then its record (the batch's 'done' mark)."""
    files = []
    arrays = to_uint8(images01)
    for array, label, k in zip(arrays, labels, ipc_index):
        rel = image_relpath(class_names[label], k, codec)
        codec.write(array, folder / rel)
        files.append(rel)
    if init01 is not None:
        for array, label, k in zip(to_uint8(init01), labels, ipc_index):
            codec.write(array, folder / "init" / image_relpath(class_names[label], k, codec))
    save_json({"digest": set_digest, "labels": list(map(int, labels)), "ipc_index": list(map(int, ipc_index)),
               "files": files, "log": log_rows, "first_ratio": first_ratio, "init": init01 is not None,
               "task": task or {"index": 0, "count": 1}},
              batch_record_path(folder, index))


def read_batch(folder: Path, index: int, set_digest: str) -> Optional[dict]:
    """A finished batch's record, or None (absent; unreadable or from other settings: said, then redone)."""
    path = batch_record_path(folder, index)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("recover batch record %s is unreadable (%s); redoing the batch", path, exc)
        print(f"scdd: recover batch record {path} is unreadable ({type(exc).__name__}); redoing the batch")
        return None
    if record.get("digest") != set_digest:
        raise ConfigError(f"recover batch record {path} belongs to a set made with other settings; "
                          f"delete {folder} to recompute it")
    return record


def finalize_set(folder: Path, records: list[dict], meta: dict, fingerprint: dict) -> None:
    """Rank 0, after every batch: index.json (+ the same for init/ when present), grid, loss log."""
    labels = [label for r in records for label in r["labels"]]
    ipc_index = [k for r in records for k in r["ipc_index"]]
    files = [f for r in records for f in r["files"]]
    sets = [(folder, files, False)]
    if records and all(r.get("init") for r in records):
        sets.append((folder / "init", files, True))
    for target, target_files, unrefined in sets:
        index = {"format": FORMAT, **meta, "unrefined": unrefined, "fingerprint": fingerprint,
                 "digest": digest({**fingerprint, "unrefined": unrefined}),
                 "files": target_files, "labels": labels, "ipc_index": ipc_index}
        write_grid(target, target_files, labels, ipc_index, meta["channels"], target / "grid.png")
        save_json(index, target / INDEX_FILE)  # last: its presence means the set is complete


def write_grid(folder: Path, files: Sequence[str], labels: Sequence[int], ipc_index: Sequence[int],
               channels: int, path: Path, max_classes: int = 100, max_ipc: int = 10) -> None:
    """One row per class (up to ``max_classes``), one column per ipc index (up to ``max_ipc``), read from
    the files (so the grid shows exactly what students see)."""
    if not files:
        return
    rows = min(max(labels) + 1, max_classes)
    cols = min(max(ipc_index) + 1, max_ipc)
    cells = None
    for rel, label, k in zip(files, labels, ipc_index):
        if label < rows and k < cols:
            with Image.open(folder / rel) as img:
                image = _to_chw(np.asarray(img.convert("RGB" if channels == 3 else "L"))).float() / 255
            if cells is None:
                cells = torch.ones(rows * cols, *image.shape)
            cells[label * cols + k] = image
    grid = make_grid(cells, nrow=cols, padding=1, pad_value=1.0)
    array = to_uint8(grid.unsqueeze(0))[0]
    if max(array.shape[:2]) < 256:  # upscale tiny images so a person can see them
        scale = 256 // max(array.shape[0], array.shape[1]) + 1
        array = np.kron(array, np.ones((scale, scale) + (() if array.ndim == 2 else (1,)), dtype=np.uint8))
    Codec("png").write(array, path)


def write_loss_log(rows: list[dict], path: Path) -> None:
    if not rows:
        return
    fields = list(rows[0].keys())
    for row in rows:
        fields.extend(k for k in row if k not in fields)

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


# --------------------------------------------------------------------------------- reading a set
def decode_all(dataset: Dataset) -> torch.Tensor:
    """Every image of an 8-bit dataset (items: float [C,H,W] in [0, 1]) as one uint8 [N,C,H,W] tensor."""
    return torch.stack([(dataset[i][0] * 255).round().to(torch.uint8) for i in range(len(dataset))])


def should_cache(count: int, channels: int, image_size: int, cache_bytes: int) -> bool:
    """The size rule: a set is decoded once into memory when its 8-bit pixels fit ``cache_bytes``
    (evaluate.cache_mb); otherwise every epoch streams it from disk."""
    return count * channels * image_size * image_size <= cache_bytes


def is_complete(folder: Path) -> bool:
    return (Path(folder) / INDEX_FILE).is_file()


@dataclass
class DistilledSet:
    folder: Path
    index: dict[str, Any]

    @classmethod
    def open(cls, folder: str | Path) -> "DistilledSet":
        folder = Path(folder)
        path = folder / INDEX_FILE
        if not path.is_file():
            raise ConfigError(f"{folder} holds no complete distilled set ({INDEX_FILE} missing); run "
                              f"`scdd stage=recover` (resume=true finishes an interrupted one)")
        try:
            index = json.loads(path.read_text())
        except ValueError as exc:
            raise ConfigError(f"{path} is corrupt ({exc}); rerun `scdd stage=recover` for this set") from exc
        if index.get("format") != FORMAT:
            raise ConfigError(f"{path} is not an SC-DD distilled set of format {FORMAT}; recreate it with "
                              f"`scdd stage=recover`")
        return cls(folder, index)

    @property
    def digest(self) -> str:
        return self.index["digest"]

    @property
    def num_classes(self) -> int:
        return self.index["num_classes"]

    def selection(self, max_ipc: Optional[int]) -> tuple[list[Path], list[int]]:
        keep = [i for i, k in enumerate(self.index["ipc_index"]) if max_ipc is None or k < max_ipc]
        return ([self.folder / self.index["files"][i] for i in keep], [self.index["labels"][i] for i in keep])

    def tensors(self, max_ipc: Optional[int] = None) -> dict[str, torch.Tensor]:
        """The whole selection decoded at once: uint8 images [N,C,H,W], labels, ipc indices (small sets)."""
        files, labels = self.selection(max_ipc)
        streamed = ImageFolderDataset(files, labels, self.index["channels"], self.index["image_size"])
        images = decode_all(streamed)
        ipc = [k for k in self.index["ipc_index"] if max_ipc is None or k < max_ipc]
        return {"images": images, "labels": torch.tensor(labels), "ipc_index": torch.tensor(ipc)}

    def dataset(self, max_ipc: Optional[int], cache_bytes: int) -> Dataset:
        """Images with ipc index below ``max_ipc``: streamed from the files (the image-tree reader
        real data uses), or decoded once into uint8 memory under the size rule."""
        files, labels = self.selection(max_ipc)
        channels, size = self.index["channels"], self.index["image_size"]
        streamed = ImageFolderDataset(files, labels, channels, size)
        if not should_cache(len(files), channels, size, cache_bytes):
            return streamed
        decoded = self.tensors(max_ipc)
        return TensorImageDataset(decoded["images"], decoded["labels"])


# ------------------------------------------------------------------------- random real baselines
def real_subset_indices(labels: Sequence[int], num_classes: int, ipc: int, seed: int) -> list[int]:
    """``ipc`` random training indices per class (seeded), class by class."""
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, ipc, 7])
    picks: list[int] = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) < ipc:
            raise ConfigError(f"class {c} has {len(idx)} training images, fewer than ipc={ipc}; lower ipc")
        picks.extend(idx[rng.permutation(len(idx))[:ipc]].tolist())
    return picks


def real_subset_record(indices: list[int], labels: list[int], fingerprint: dict) -> dict:
    """The baseline's index list with its digest (which names it in the student row's fingerprint)."""
    return {"format": REAL_SUBSET_FORMAT, "fingerprint": fingerprint,
            "digest": digest({**fingerprint, "indices": indices}), "indices": indices, "labels": labels}


class CodecSubset(Dataset):
    """Real training images at ``indices``, as a reader of files written with ``codec`` sees them."""

    def __init__(self, base: Dataset, indices: Sequence[int], labels: Sequence[int], codec: Codec) -> None:
        self.base, self.indices, self.labels, self.codec = base, list(indices), list(labels), codec

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        image = self.base[self.indices[i]][0]
        array = self.codec.roundtrip(to_uint8(image.unsqueeze(0))[0])
        return _to_chw(array).float().div_(255.0), self.labels[i]


def real_subset_dataset(base: Dataset, indices: Sequence[int], labels: Sequence[int], codec: Codec,
                        channels: int, image_size: int, cache_bytes: int,
                        crops: Optional[CropSpec] = None) -> Dataset:
    """The real images at ``indices``; ``crops`` (an image-folder ``base``): random resized crops of the
    full-resolution files instead (``CropViews``, each view through ``codec``).

    Memory: with ``crops`` a tree in the run's decode cache (engine.data.decode_cache) is cropped from
    it as it is; otherwise the cache here keeps every image decoded once with its shorter side capped at
    ``CACHE_SIDE_FACTOR`` x ``crops.size`` (448 px for 224; smaller images as they are) when those
    8-bit pixels fit ``cache_bytes``; crops are then cut per sample from the cached image (the same
    box as from the file, scaled). Otherwise the files are decoded per sample. Without ``crops``:
    the eval-size images, decoded once into one uint8 tensor under the same size rule."""
    if crops is not None:
        source = base.source(indices)
        max_short = CACHE_SIDE_FACTOR * crops.size
        # a tree in the run's decode cache is already decoded once under the same cap
        if (isinstance(source, FileSource) and cache_bytes > 0
                and cached_bytes(source.full_sizes(), channels, max_short) <= cache_bytes):
            source = MemorySource(source, max_short)
        return CropViews(source, labels, crops, finish=codec.roundtrip)
    subset = CodecSubset(base, indices, labels, codec)
    if not should_cache(len(subset), channels, image_size, cache_bytes):
        return subset
    images = decode_all(subset)
    return TensorImageDataset(images, torch.tensor(list(labels)))
