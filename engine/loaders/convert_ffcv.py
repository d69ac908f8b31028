"""Write a data entry to FFCV: ``<out>/train.beton``, ``<out>/val.beton`` and ``<out>/meta.json``.

    python -m engine.loaders.convert_ffcv --data imagefolder --root DIR --out DIR \
        [--image-size N] [--channels 1|3] [--format jpg|raw] [--max-resolution N] [--workers N]

Works for every entry of engine.data (imagefolder, cifar10, cifar100, mnist5k, digits). Image-folder
files are stored at their own resolution (the longer side capped by --max-resolution when given):
the loader's train transform takes random resized crops of the whole image, its eval transform
the center crop of ratio data.eval_crop_ratio (224/256), as engine.data.views does. --image-size
is the output size recorded in meta.json (built-in data is resized to it, as engine.data does).
Each file is written under a temporary name and renamed when complete; meta.json (statistics,
channels, size, eval crop ratio) is written last, so a directory without it is unfinished.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import sys
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from engine.data import DATASETS, DataBundle, DataConfig, build_data
from engine.errors import ConfigError
from engine.io import atomic_write, save_json
from engine.loaders.ffcv_loader import META_FILE


class _WriterDataset:
    """(uint8 HWC RGB image, label) per index; gray is replicated to 3 channels (FFCV is RGB-only).

    Runs inside FFCV's writer processes: a failing image is recorded in shared memory and replaced
    by a black pixel, because FFCV's writer waits forever on a worker that died.
    """

    def __init__(self, dataset, channels: int) -> None:
        self.files = getattr(dataset, "files", None)
        self.images = getattr(dataset, "images", None)
        self.dataset = dataset
        self.labels = list(dataset.labels)
        self.channels = channels
        self.failures = mp.Value("i", 0)
        self.first_error = mp.Array("c", 400)

    def __len__(self) -> int:
        return len(self.labels)

    def _image(self, index: int) -> np.ndarray:
        if self.files is not None:  # full resolution
            with Image.open(self.files[index]) as img:
                array = np.asarray(img.convert("RGB" if self.channels == 3 else "L"), dtype=np.uint8)
        elif self.images is not None:
            array = self.images[index].permute(1, 2, 0).numpy()
        else:
            image = self.dataset[index][0]
            array = image.mul(255.0).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
        if array.ndim == 2:
            array = array[:, :, None]
        if array.shape[2] == 1:
            array = np.repeat(array, 3, axis=2)
        return np.ascontiguousarray(array)

    def __getitem__(self, index: int):
        try:
            return self._image(index), int(self.labels[index])
        except Exception as exc:  # noqa: BLE001 - reported by the parent as one ConfigError
            with self.failures.get_lock():
                if self.failures.value == 0:
                    where = self.files[index] if self.files is not None else f"sample {index}"
                    self.first_error.value = f"{where}: {type(exc).__name__}: {exc}"[:399].encode(
                        "utf-8", "replace")
                self.failures.value += 1
            return np.zeros((1, 1, 3), dtype=np.uint8), int(self.labels[index])


def write_beton(dataset, path: Path, channels: int, fmt: str, max_resolution: Optional[int], workers: int,
                jpeg_quality: int = 90) -> Path:
    """Write one split atomically; raises ConfigError (and leaves no file) if any image fails."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    source = _WriterDataset(dataset, channels)

    def write(tmp: str) -> None:
        fields = {"image": RGBImageField(write_mode=fmt, max_resolution=max_resolution,
                                         jpeg_quality=jpeg_quality),
                  "label": IntField()}
        print(f"writing {path} ({len(source)} images, {fmt})", file=sys.stderr)
        try:
            DatasetWriter(tmp, fields, num_workers=workers).from_indexed_dataset(source, chunksize=64)
        except BaseException:
            for child in mp.active_children():  # FFCV's writer processes outlive an interrupt
                child.terminate()
            raise
        if source.failures.value:
            raise ConfigError(f"{source.failures.value} image(s) failed while writing {path.name}, "
                              f"first {source.first_error.value.decode('utf-8', 'replace')}; "
                              f"remove or replace them and rerun")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a shared data set needs the umask's

    return atomic_write(path, write)


def convert(bundle: DataBundle, out: Path, fmt: str = "jpg", max_resolution: Optional[int] = None,
            workers: int = 2, jpeg_quality: int = 90) -> Path:
    if fmt not in ("jpg", "raw"):
        raise ConfigError(f"--format {fmt} is not one of jpg|raw")
    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).unlink(missing_ok=True)  # unfinished until rewritten below
    for split, dataset in (("train", bundle.train), ("val", bundle.test)):
        write_beton(dataset, out / f"{split}.beton", bundle.channels, fmt, max_resolution, workers, jpeg_quality)
    save_json({"data": bundle.name, "channels": bundle.channels, "image_size": bundle.image_size,
               "mean": list(bundle.mean), "std": list(bundle.std), "num_classes": bundle.num_classes,
               "class_names": list(bundle.class_names), "format": fmt,
               "fixed_size": not hasattr(bundle.train, "files"),
               "eval_crop_ratio": getattr(bundle.train, "crop_ratio", 1.0), "max_resolution": max_resolution,
               "num_train": len(bundle.train), "num_val": len(bundle.test)}, out / META_FILE)
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.loaders.convert_ffcv",
                                description="Write a data entry to FFCV train.beton/val.beton.")
    p.add_argument("--data", required=True, choices=sorted(DATASETS), help="data entry name")
    p.add_argument("--root", default=None, help="data folder (image-folder tree or CIFAR batches)")
    p.add_argument("--out", required=True, help="output folder for train.beton, val.beton, meta.json")
    p.add_argument("--image-size", type=int, default=None,
                   help="output size N (built-in data is stored resized to N; image files keep their resolution)")
    p.add_argument("--channels", type=int, default=None, choices=(1, 3))
    p.add_argument("--format", default="jpg", choices=("jpg", "raw"))
    p.add_argument("--max-resolution", type=int, default=None,
                   help="cap the longer side of stored image files (default: their full resolution)")
    p.add_argument("--eval-crop-ratio", type=float, default=0.875,
                   help="eval center crop share of the resized shorter side (data.eval_crop_ratio)")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--workers", type=int, default=2, help="writer processes")
    p.add_argument("--verify", default="header", choices=("header", "full", "none"))
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    # SIGTERM (a scheduler's kill) unwinds like Ctrl-C, so the temporary file is removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        bundle = build_data(DataConfig(name=args.data, root=args.root, image_size=args.image_size,
                                       channels=args.channels, verify=args.verify,
                                       eval_crop_ratio=args.eval_crop_ratio))
        out = convert(bundle, Path(args.out).expanduser(), args.format, args.max_resolution, args.workers,
                      args.jpeg_quality)
    except ConfigError as exc:
        print(f"convert_ffcv: error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit) as exc:
        # The temporary file is already gone; exit now, because interpreter shutdown would wait
        # forever on FFCV's work queue, whose reader processes were terminated.
        print("convert_ffcv: interrupted; no partial .beton was left behind", file=sys.stderr)
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(exc.code if isinstance(exc, SystemExit) and isinstance(exc.code, int) else 130)
    print(f"wrote {out}/train.beton, val.beton, {META_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
