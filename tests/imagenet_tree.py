"""A small tree laid out like ImageNet-1K (train/ and val/ with synset folders), from real ImageNet photos.

The photos are foolbox's bundled ImageNet validation samples (tests/realdata.py): JPEGs, 512x512 except
one 1024x683, the class index in the file name. They are kept at their own resolution, as ImageNet's are
(the reader resizes the shorter side and center-crops); val holds each photo as it ships, train holds it
and its mirror image, so train and val differ in pixels but not in content.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from PIL import Image, ImageOps

from realdata import foolbox_samples

SYNSETS = {22: "n01614925", 99: "n01855672", 129: "n02006656", 243: "n02108422", 251: "n02110341",
           305: "n02165105", 317: "n02256656", 438: "n02815834", 455: "n02877765", 471: "n02950826",
           541: "n03249569", 559: "n03376595", 609: "n03594945", 630: "n03680355", 741: "n03998194",
           853: "n04417672", 915: "n04613696", 949: "n07745940", 990: "n12267677"}
"""ImageNet-1K class index -> WordNet synset id (the folder name) of every class foolbox has a sample of;
ImageNet's class order is the sorted synset ids, and these sort in class-index order too."""

DEFAULT_CLASSES = (22, 541, 609)
"""bald eagle; drum (the 1024x683 photo); jeep (two photos)."""


def make_imagenet_tree(root: Path, classes: tuple[int, ...] = DEFAULT_CLASSES) -> dict[str, dict[str, list[Path]]]:
    """Write root/train/<synset>/*.JPEG and root/val/<synset>/*.JPEG; returns split -> synset -> files."""
    tree: dict[str, dict[str, list[Path]]] = {"train": {}, "val": {}}
    samples = [(path, label) for path, label in foolbox_samples("imagenet") if label in classes]
    missing = sorted(set(classes) - {label for _, label in samples})
    assert not missing, f"foolbox has no ImageNet sample of class(es) {missing}"
    for path, label in samples:
        synset = SYNSETS[label]
        stem = f"{synset}_{path.stem.split('_')[1]}"
        for split in ("train", "val"):
            (root / split / synset).mkdir(parents=True, exist_ok=True)
        val = root / "val" / synset / f"ILSVRC2012_val_{stem}.JPEG"
        shutil.copyfile(path, val)
        train = root / "train" / synset / f"{stem}.JPEG"
        shutil.copyfile(path, train)
        mirrored = root / "train" / synset / f"{stem}_mirror.JPEG"
        with Image.open(path) as img:
            ImageOps.mirror(img.convert("RGB")).save(mirrored, quality=95)
        tree["val"].setdefault(synset, []).append(val)
        tree["train"].setdefault(synset, []).extend([train, mirrored])
    return tree
