"""Loader throughput benchmark (not a test): each loader's sustained images/s next to the training rates
it must feed (train transform).

    python -m engine.loaders.bench --image-size 64 --files 2000 --batch 64 --workers 2 [--json F]
        [--student-rate N --pretrain-rate N]   (images/s; default: measured by a quick step here)

Loaders: torch (DataLoader + PIL decoding every file every epoch), torch-cache (the same DataLoader
cropping from the run's decode cache, engine.data.decode_cache: decoded once, build time reported
apart), ffcv, dali (on the CPU here; DALI's GPU decoding needs a GPU and cannot be measured without).

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


def training_rates(model: str, image_size: int, batch: int, steps: int = 3) -> dict:
    """Images/s of a quick student step (student forward + backward + AdamW, the teacher's soft-label
    forward) and a quick MoCo-style pretraining step (two views: query forward + backward, key
    forward) of ``model`` on this machine's device, fp32; the first step is not timed."""
    import torch

    from engine.models import ModelConfig, build_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    student = build_model(ModelConfig(name=model), 1000, 3, image_size).to(device)
    teacher = build_model(ModelConfig(name=model), 1000, 3, image_size).to(device).eval()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, image_size, image_size, device=device)  # timing only: pixel values do not matter

    def student_step():
        with torch.no_grad():
            target = teacher(x).softmax(1)
        loss = -(target * student(x).log_softmax(1)).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    def pretrain_step():
        with torch.no_grad():
            teacher(x), teacher(x)
        loss = student(x).square().mean() + student(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    rates = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "model": model}
    for name, step in (("student", student_step), ("pretrain", pretrain_step)):
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates[name] = round(batch * steps / (time.perf_counter() - start), 1)
    return rates


def run(image_size: int, files: int, batch: int, workers: int, epochs: int,
        loaders: list[str], workdir: Optional[Path] = None, stored_size: Optional[int] = None) -> dict:
    from engine.loaders.convert_ffcv import convert

    tmp = tempfile.TemporaryDirectory(prefix="scdd-bench-") if workdir is None else None
    root = Path(tmp.name) if tmp else workdir
    try:
        tree = build_jpeg_tree(root / "tree", files, stored_size)
        cfg = DataConfig(name="imagefolder", root=str(tree), image_size=image_size, verify="none",
                         mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
        bundle = build_data(cfg)
        results = {"image_size": image_size, "stored_size": stored_size, "files": files, "batch": batch,
                   "workers": workers, "cpu_cores": os.cpu_count(), "epochs": epochs, "images_per_s": {}}
        cached = None
        if "torch-cache" in loaders:
            start = time.perf_counter()
            cached = build_data(cfg, {split: root / "cache" / split for split in ("train", "test")})
            results["cache_build_s"] = round(time.perf_counter() - start, 1)
        spec = LoaderSpec(batch_size=batch, shuffle=True, transform="train", num_workers=workers,
                          beton_dir=str(root / "ffcv"))
        if "ffcv" in loaders:
            start = time.perf_counter()
            convert(bundle, root / "ffcv", fmt="jpg", workers=workers)
            results["ffcv_convert_s"] = round(time.perf_counter() - start, 1)
        for kind in loaders:
            if kind == "dali" and importlib.util.find_spec("nvidia.dali") is None:
                results["images_per_s"][kind] = None  # not installed here
                continue
            source, back_end = (cached, "torch") if kind == "torch-cache" else (bundle, kind)
            loader = build_loader(back_end, source, "train", spec, rank=0, world_size=1)
            results["images_per_s"][kind] = round(time_loader(loader, epochs), 1)
        return results
    finally:
        if tmp:
            tmp.cleanup()


def table(results: dict, rates: Optional[dict] = None) -> str:
    base = results["images_per_s"].get("torch")
    stored = results.get("stored_size") or "~410-512 (own)"
    lines = [f"image size {results['image_size']}, {results['files']} JPEG files stored at {stored} px, batch "
             f"{results['batch']}, {results['workers']} workers, {results['cpu_cores']} CPU cores, "
             f"train transform (random resized crop of the whole file + flip), {results['epochs']} timed epoch(s)",
             f"{'loader':<12}{'images/s':>8}{'vs torch':>10}"]
    needs = [(k, v) for k, v in (rates or {}).items() if k in ("student", "pretrain")]
    lines[-1] += "".join(f"{'feeds ' + k:>16}" for k, _ in needs)
    for kind, rate in results["images_per_s"].items():
        if rate is None:
            lines.append(f"{kind:<12}{'-':>8}  not installed here; DALI's GPU decoding needs a GPU and cannot be "
                         f"measured on this machine")
            continue
        ratio = f"{rate / base:.2f}x" if base else "-"
        lines.append(f"{kind:<12}{rate:>8.1f}{ratio:>10}"
                     + "".join(f"{('yes' if rate >= need else 'NO') + f' ({rate / need:.1f}x)':>16}" for _, need in needs))
    if needs:
        lines.append("training rates to feed (images/s): " + ", ".join(f"{k} {v:.1f}" for k, v in needs)
                     + f" ({rates.get('source', 'given')})")
    if "cache_build_s" in results:
        lines.append(f"(decode cache build, once per run dir and tree, not timed above: {results['cache_build_s']} s)")
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
    p.add_argument("--loaders", default="torch,torch-cache,ffcv,dali",
                   help="comma list of torch,torch-cache,ffcv,dali")
    p.add_argument("--student-rate", type=float, default=None,
                   help="images/s the student step trains at (default: measured by a quick step here)")
    p.add_argument("--pretrain-rate", type=float, default=None,
                   help="images/s SSL pretraining trains at (default: measured by a quick step here)")
    p.add_argument("--model", default="resnet18", help="model of the quick steps that measure the rates")
    p.add_argument("--workdir", default=None, help="keep the tree and .beton here (default: temp)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    workdir = Path(args.workdir) if args.workdir else None
    results = run(args.image_size, args.files, args.batch, args.workers, args.epochs,
                  [k.strip() for k in args.loaders.split(",") if k.strip()], workdir, args.stored_size)
    if args.student_rate is None or args.pretrain_rate is None:
        measured = training_rates(args.model, args.image_size, args.batch)
        rates = {"student": args.student_rate or measured["student"],
                 "pretrain": args.pretrain_rate or measured["pretrain"],
                 "source": f"quick {args.model} steps on {measured['device']}, fp32, batch {args.batch}"}
    else:
        rates = {"student": args.student_rate, "pretrain": args.pretrain_rate, "source": "given"}
    results["training_rates"] = rates
    print(table(results, rates))
    if args.json:
        from engine.io import save_json

        save_json(results, args.json)


if __name__ == "__main__":
    main()
