"""Loader throughput benchmark (not a test): torch DataLoader+PIL vs FFCV vs DALI, train transform.

    python -m engine.loaders.bench --image-size 64 --files 2000 --batch 64 --workers 2 [--json F]

Builds a class-per-folder JPEG tree by repeating foolbox's 20 real ImageNet samples (each copy a
slightly different crop, stored at --stored-size, default its own resolution of about 410-512 px,
as ImageNet files are decoded at full resolution), converts it to FFCV once, then times each loader
over whole epochs after one warm-up epoch (FFCV's numba compilation and DALI's start-up are
excluded; torch's worker start-up is included, as each epoch pays it).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from engine.data import DataConfig, build_data
from engine.loaders import LOADERS, LoaderSpec, build_loader


def foolbox_imagenet() -> list[tuple[Path, int]]:
    spec = importlib.util.find_spec("foolbox")  # located, never imported (installed --no-deps)
    if spec is None:
        raise SystemExit("the benchmark needs foolbox's sample images: pip install --no-deps foolbox")
    folder = Path(spec.submodule_search_locations[0]) / "data"
    out = []
    for path in sorted(folder.glob("imagenet_*.*")):
        parts = path.stem.split("_")
        out.append((path, int(parts[2])))
    return out


def build_jpeg_tree(root: Path, files: int, size: Optional[int], seed: int = 0) -> Path:
    """train/ with ``files`` JPEGs and val/ with one per class, real content: each a random crop of
    80-100% of a sample, resized to size x size (None: kept at its own resolution)."""
    rng = np.random.default_rng(seed)
    samples = foolbox_imagenet()
    sources = [(Image.open(p).convert("RGB"), label) for p, label in samples]
    for k in range(files):
        img, label = sources[k % len(sources)]
        w, h = img.size
        frac = rng.uniform(0.8, 1.0)
        cw, ch = int(w * frac), int(h * frac)
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        copy = img.crop((left, top, left + cw, top + ch))
        if size is not None:
            copy = copy.resize((size, size), Image.BILINEAR)
        for split in (("train",) if k >= len(sources) else ("train", "val")):
            folder = root / split / f"n{label:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            copy.save(folder / f"img_{k:06d}.jpg", quality=90)
    return root


def time_loader(loader, epochs: int) -> float:
    for _ in loader:  # warm-up epoch
        pass
    count, start = 0, time.perf_counter()
    for epoch in range(epochs):
        loader.set_epoch(epoch + 1)
        for images, labels in loader:
            count += len(labels)
    return count / (time.perf_counter() - start)


def run(image_size: int, files: int, batch: int, workers: int, epochs: int,
        loaders: list[str], workdir: Optional[Path] = None, stored_size: Optional[int] = None) -> dict:
    from engine.loaders.convert_ffcv import convert

    tmp = tempfile.TemporaryDirectory(prefix="scdd-bench-") if workdir is None else None
    root = Path(tmp.name) if tmp else workdir
    try:
        tree = build_jpeg_tree(root / "tree", files, stored_size)
        bundle = build_data(DataConfig(name="imagefolder", root=str(tree), image_size=image_size,
                                       verify="none", mean=[0.485, 0.456, 0.406],
                                       std=[0.229, 0.224, 0.225]))
        results = {"image_size": image_size, "stored_size": stored_size, "files": files, "batch": batch,
                   "workers": workers, "cpu_cores": os.cpu_count(), "epochs": epochs, "images_per_s": {}}
        spec = LoaderSpec(batch_size=batch, shuffle=True, transform="train", num_workers=workers,
                          beton_dir=str(root / "ffcv"))
        if "ffcv" in loaders:
            start = time.perf_counter()
            convert(bundle, root / "ffcv", fmt="jpg", workers=workers)
            results["ffcv_convert_s"] = round(time.perf_counter() - start, 1)
        for kind in loaders:
            loader = build_loader(kind, bundle, "train", spec, rank=0, world_size=1)
            results["images_per_s"][kind] = round(time_loader(loader, epochs), 1)
        return results
    finally:
        if tmp:
            tmp.cleanup()


def table(results: dict) -> str:
    base = results["images_per_s"].get("torch")
    stored = results.get("stored_size") or "~410-512 (own)"
    lines = [f"image size {results['image_size']}, {results['files']} JPEG files stored at {stored} px, batch "
             f"{results['batch']}, {results['workers']} workers, {results['cpu_cores']} CPU cores, "
             f"train transform (random resized crop of the whole file + flip), {results['epochs']} timed epoch(s)",
             f"{'loader':<8}{'images/s':>12}{'vs torch':>10}"]
    for kind, rate in results["images_per_s"].items():
        ratio = f"{rate / base:.2f}x" if base else "-"
        lines.append(f"{kind:<8}{rate:>12.1f}{ratio:>10}")
    if "ffcv_convert_s" in results:
        lines.append(f"(FFCV conversion, not timed above: {results['ffcv_convert_s']} s)")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m engine.loaders.bench", description=__doc__.split("\n")[0])
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--files", type=int, default=2000)
    p.add_argument("--stored-size", type=int, default=None,
                   help="store the JPEGs at N x N (default: each sample crop at its own resolution)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs after one warm-up epoch")
    p.add_argument("--loaders", default=",".join(LOADERS), help="comma list of torch,ffcv,dali")
    p.add_argument("--workdir", default=None, help="keep the tree and .beton here (default: temp)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    workdir = Path(args.workdir) if args.workdir else None
    results = run(args.image_size, args.files, args.batch, args.workers, args.epochs,
                  [k.strip() for k in args.loaders.split(",") if k.strip()], workdir, args.stored_size)
    print(table(results))
    if args.json:
        from engine.io import save_json

        save_json(results, args.json)


if __name__ == "__main__":
    main()
