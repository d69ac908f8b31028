"""The whole pipeline on a 60,000-image PNG tree (issue 15's target: under 3 minutes on one GPU, with
evaluation taking less time than squeeze).

    PYTHONPATH=. python benchmarks/tree_pipeline.py --tree /tmp/tree60k [--copies 12] [--run-dir DIR] [-- OVERRIDES]

The tree is built once from MNIST-5k (real digits, 28 px gray, written as PNGs): the fixed stratified
train split (4,000) and test split (1,000) are each written ``--copies`` times, every copy shifted by
its own (dy, dx) of at most 2 px, so the tree holds 5,000 x copies distinct files (60,000 for 12):
``train/<digit>/...png`` and ``val/<digit>/...png`` (data=imagefolder's layout). Then it runs
``python -m engine.cli data=imagefolder data.root=TREE data.eval_crop_ratio=1.0 "ipc=[10,50]"`` (plus any
OVERRIDES; the tree is stored at its working size, so it is evaluated with a plain resize and held in
memory, see README "Image trees at their own resolution") and
prints the wall time of each stage (report.json's ``seconds``) and of the whole command.
"""
from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

SHIFTS = [(dy, dx) for dy, dx in itertools.product(range(-2, 3), repeat=2) if abs(dy) + abs(dx) <= 2]


def _write(job: tuple[str, np.ndarray]) -> None:
    from PIL import Image

    path, image = job
    Image.fromarray(image).save(path, compress_level=1)


def build_tree(root: Path, copies: int, workers: int) -> int:
    """Write the tree (skipped when ``root/DONE`` says it holds these copies); returns the file count."""
    done = root / "DONE"
    if done.is_file() and done.read_text().strip() == str(copies):
        return sum(1 for _ in root.glob("*/*/*.png"))
    if copies > len(SHIFTS):
        raise SystemExit(f"--copies {copies}: at most {len(SHIFTS)} distinct shifts")
    from engine.data import DataConfig, build_data

    bundle = build_data(DataConfig(name="mnist5k"))
    jobs = []
    for split, dataset in (("train", bundle.train), ("val", bundle.test)):
        images, labels = np.asarray(dataset.images), np.asarray(dataset.labels)
        for digit in range(10):
            (root / split / str(digit)).mkdir(parents=True, exist_ok=True)
        for copy, (dy, dx) in enumerate(SHIFTS[:copies]):
            shifted = np.roll(images.reshape(len(images), 28, 28), (dy, dx), axis=(1, 2)).astype(np.uint8)
            for i, (image, label) in enumerate(zip(shifted, labels)):
                jobs.append((str(root / split / str(int(label)) / f"{i:05d}_{copy:02d}.png"), image))
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write, jobs, chunksize=512))
    done.write_text(str(copies))
    return len(jobs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", required=True, type=Path)
    parser.add_argument("--copies", type=int, default=12)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--run-dir", type=Path, default=None)
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    start = time.perf_counter()
    files = build_tree(args.tree, args.copies, args.workers)
    print(f"tree {args.tree}: {files} PNG files ({time.perf_counter() - start:.1f} s to build or find)", flush=True)
    if args.build_only:
        return
    run_dir = args.run_dir or args.tree.parent / f"{args.tree.name}_run"
    command = [sys.executable, "-m", "engine.cli", "data=imagefolder", f"data.root={args.tree}",
               "data.eval_crop_ratio=1.0", "ipc=[10,50]",
               "progress=false", f"hydra.run.dir={run_dir}", *args.overrides]
    print(" ".join(command), flush=True)
    start = time.perf_counter()
    code = subprocess.call(command)
    total = time.perf_counter() - start
    report = run_dir / "report.json"
    if report.is_file():
        seconds = json.loads(report.read_text()).get("seconds", {})
        print("  " + ", ".join(f"{stage} {value:.1f} s" for stage, value in seconds.items()
                               if isinstance(value, (int, float))))
    print(f"pipeline: {total:.1f} s wall (exit {code})")
    raise SystemExit(code)


if __name__ == "__main__":
    main()
