"""Distilled sets in the reference layout that SRe2L, CDA, SC-DD and RDED publish: export ours, import theirs.

The reference recover scripts (VILA-Lab/SRe2L, e.g. SRe2L/recover/data_synthesis.py, ``save_images``) write

    <set>/new{class:03d}/class{class:03d}_id{ipc:03d}.jpg

from ``(x * 255).astype(uint8)`` with PIL's default JPEG settings (quality 75, 4:2:0 chroma), and their
students read the tree with torchvision's ImageFolder, whose class index is the folder's position among the
sorted names: with every class present and equal-width numbers, the NNN of ``newNNN``.

Export (``export_set``) writes that layout from one of our sets. Files are copied byte for byte when the
asked format is the set's own (a PNG set exported as PNG has exactly our pixels); PNG -> JPEG re-encodes
at the given quality (>= 90, 4:4:4 chroma, as our codec stores JPEG); JPEG -> PNG stores the decoded pixels.

Import (``import_set``) turns a reference-layout tree into our distilled-set format (index.json beside a copy
of the files, byte for byte) so a student reads it like any set we made. Its fingerprint is the digest of
the source files (names and bytes): a run reuses the import while the files are unchanged; a resumed run
refuses it, like any stale artifact, when they changed (resume=false replaces it, announced). Images are
used at their own resolution, never resized: a size other than data.image_size is refused (it almost always
means the set was distilled for other data, e.g. a Tiny-ImageNet set evaluated at 224 px). Gray or RGB files
are converted to the data's channels when read, as real image-folder data is.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from engine.artifacts.distilled import FORMAT, INDEX_FILE, Codec, DistilledSet, write_grid
from engine.artifacts.fingerprint import announce_overwrite, differences, digest, require_match
from engine.errors import ConfigError
from engine.io import save_json

log = logging.getLogger("scdd.artifacts")

LAYOUT = "reference-v1"
CLASS_FOLDER = re.compile(r"^new(\d+)$")
IMAGE_ID = re.compile(r"_id(\d+)")
SUFFIXES = {".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png"}
EXPORT_RECORD = "scdd_export.json"
"""Beside the class folders of an export: what it was made from (ImageFolder readers list folders only)."""


def class_folder(label: int, width: int) -> str:
    return f"new{label:0{width}d}"


def image_name(label: int, ipc_index: int, width: int, suffix: str) -> str:
    return f"class{label:0{width}d}_id{ipc_index:03d}{suffix}"


def class_width(num_classes: int) -> int:
    """Digits of the class number: 3 as the reference writes (new000..new999), more above 1000 classes, so
    that sorted folder names still give the class order."""
    return max(3, len(str(num_classes - 1)))


# ------------------------------------------------------------------------------------------------ export
def export_set(source: Path, out: Path, image_format: Optional[str] = None, quality: int = 95) -> dict:
    """Write distilled set ``source`` into ``out`` in the reference layout; returns the export record.

    ``image_format``: png | jpeg (at ``quality``); None or the set's own format copies the files' bytes."""
    source, out = Path(source), Path(out)
    if not (source / INDEX_FILE).is_file():
        sets = sorted(p.parent for p in source.glob(f"recover/*/{INDEX_FILE}"))
        if sets:
            raise ConfigError(f"{source} is a run dir, not a distilled set; pass one of its sets: "
                              f"{', '.join(str(s) for s in sets)}")
    distilled = DistilledSet.open(source)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"export folder {out} already exists and is not empty; pick a new folder or delete it")
    index = distilled.index
    stored = index.get("image_format", "png")  # "mixed" for an imported set holding PNG and JPEG files
    copy = image_format is None or image_format == stored
    codec = None if copy else Codec(image_format, quality)
    width = class_width(distilled.num_classes)
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    files = []
    for rel, label, k in zip(index["files"], index["labels"], index["ipc_index"]):
        src = distilled.folder / rel
        suffix = src.suffix.lower() if codec is None else codec.suffix
        target = staging / class_folder(label, width) / image_name(label, k, width, suffix)
        target.parent.mkdir(parents=True, exist_ok=True)
        if codec is None:
            shutil.copyfile(src, target)
        else:
            with Image.open(src) as img:
                array = np.asarray(img.convert("RGB" if index["channels"] == 3 else "L"), dtype=np.uint8)
            codec.write(array, target)
        files.append(str(target.relative_to(staging)))
    record = {"layout": LAYOUT, "source": str(source.resolve()), "source_digest": distilled.digest,
              "image_format": stored if codec is None else codec.format, "copied": codec is None,
              "jpeg_quality": ((index.get("jpeg_quality") if stored == "jpeg" else None) if codec is None
                               else codec.quality if codec.format == "jpeg" else None),
              "class_names": index.get("class_names", []), "num_classes": distilled.num_classes,
              "ipc": index.get("ipc"), "images": len(files)}
    save_json(record, staging / EXPORT_RECORD)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.rmdir()  # empty (checked above); the rename needs the name free
    os.replace(staging, out)
    return record


# ------------------------------------------------------------------------------------------------ import
@dataclass
class ReferenceSet:
    """A reference-layout tree, checked: every file, its class and its position within the class."""

    folder: Path
    files: list[Path] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    ipc_index: list[int] = field(default_factory=list)
    per_class: int = 0
    """The fewest images any class holds (the largest ipc it can serve)."""

    def source_digest(self) -> str:
        """SHA-256 (16 hex) over every file's path within the set and its bytes, in a fixed order."""
        hasher = hashlib.sha256()
        for path in self.files:
            hasher.update(str(path.relative_to(self.folder)).encode() + b"\0")
            with open(path, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    hasher.update(chunk)
            hasher.update(b"\0")
        return hasher.hexdigest()[:16]


def _image_order(path: Path) -> tuple:
    found = IMAGE_ID.search(path.stem)
    return (int(found.group(1)) if found else float("inf"), path.name)


def scan_set(folder: Path, what: str, num_classes: int, image_size: int, ipc: int) -> ReferenceSet:
    """Check a reference-layout tree against the data and teacher it will be evaluated with (every image's
    header read; ``what`` names the set in messages). One ConfigError line per problem."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"{what}: folder {folder} does not exist; point it at the set's folder (the one "
                          f"holding new000/, new001/, ...)")
    classes: dict[int, Path] = {}
    for child in folder.iterdir():
        found = CLASS_FOLDER.match(child.name)
        if found and child.is_dir():
            classes[int(found.group(1))] = child
    if not classes:
        raise ConfigError(f"{what}: {folder} holds no newNNN class folders (the reference layout is "
                          f"new000/class000_id000.jpg, ...); point it at the folder that holds them")
    top = max(classes)
    if top >= num_classes:
        raise ConfigError(f"{what}: {folder} has class folder {classes[top].name} (class {top}) but the teacher "
                          f"and data have {num_classes} classes (new{0:03d}..new{num_classes - 1:03d}); evaluate "
                          f"it with the data it was distilled for")
    missing = [c for c in range(num_classes) if c not in classes]
    if missing:
        raise ConfigError(f"{what}: {folder} has no folder for class {missing[0]} ({len(missing)} of "
                          f"{num_classes} classes missing); a set must hold every class of the data")
    scanned = ReferenceSet(folder)
    counts = []
    for label in range(num_classes):
        images = sorted((p for p in classes[label].iterdir() if p.suffix.lower() in SUFFIXES and p.is_file()),
                        key=_image_order)
        counts.append(len(images))
        for k, path in enumerate(images):
            _check_image(path, what, image_size)
            scanned.files.append(path)
            scanned.labels.append(label)
            scanned.ipc_index.append(k)
    scanned.per_class = min(counts)
    if scanned.per_class < ipc:
        c = int(np.argmin(counts))
        raise ConfigError(f"{what}: {classes[c]} holds {counts[c]} images but ipc={ipc} is asked; lower ipc to "
                          f"{scanned.per_class} or less")
    return scanned


def _check_image(path: Path, what: str, image_size: int) -> None:
    try:
        with Image.open(path) as img:
            size = img.size
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ConfigError(f"{what}: image {path} is unreadable ({type(exc).__name__}); remove or replace it") from exc
    if size != (image_size, image_size):
        raise ConfigError(f"{what}: image {path} is {size[0]}x{size[1]} but data.image_size={image_size}; external "
                          f"sets are evaluated at their own resolution (never resized): use the data config the "
                          f"set was distilled for")


def import_set(source: Path, target: Path, *, what: str, class_names: list[str], channels: int,
               image_size: int, ipc: int, resume: bool) -> DistilledSet:
    """Our distilled-set format at ``target`` for the reference-layout tree ``source`` (rank 0 only).

    An import is a copy: one of the same files is reused whatever ``resume`` says (so job-array tasks never
    replace files another task trains from). When the files changed it is refused under resume=true, like
    any stale artifact, and replaced, announced, under resume=false."""
    num_classes = len(class_names)
    scanned = scan_set(source, what, num_classes, image_size, ipc)
    fingerprint = {"layout": LAYOUT, "source_files": scanned.source_digest(), "num_classes": num_classes}
    target = Path(target)
    replacing = target.exists()
    if (target / INDEX_FILE).is_file():
        if not differences(DistilledSet.open(target).index.get("fingerprint"), fingerprint):
            return DistilledSet.open(target)
        if resume:
            require_match(target, DistilledSet.open(target).index.get("fingerprint"), fingerprint,
                          f"{what} (imported from {source})")
        announce_overwrite(target, f"{what} import")
    staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    files = []
    for path, label, k in zip(scanned.files, scanned.labels, scanned.ipc_index):
        try:
            with Image.open(path) as img:
                img.load()  # the header was read by the scan; this reads every pixel
        except (OSError, SyntaxError) as exc:
            raise ConfigError(f"{what}: image {path} is unreadable ({type(exc).__name__}); remove or replace "
                              f"it") from exc
        rel = f"images/{class_names[label]}/ipc{k:04d}{path.suffix.lower()}"
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, staging / rel)
        files.append(rel)
    formats = {SUFFIXES[Path(f).suffix] for f in files}
    index = {"format": FORMAT, "class_names": list(class_names), "num_classes": num_classes, "channels": channels,
             "image_size": image_size, "ipc": scanned.per_class,
             "image_format": formats.pop() if len(formats) == 1 else "mixed", "jpeg_quality": None,
             "source": {"layout": LAYOUT, "path": str(Path(source).expanduser().resolve())},
             "unrefined": False, "fingerprint": fingerprint, "digest": digest(fingerprint),
             "files": files, "labels": scanned.labels, "ipc_index": scanned.ipc_index}
    write_grid(staging, files, scanned.labels, scanned.ipc_index, channels, staging / "grid.png")
    save_json(index, staging / INDEX_FILE)
    if replacing:
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(staging, target)
    except OSError:  # another process (a job-array task) finished the same import first; never removed
        shutil.rmtree(staging, ignore_errors=True)
        require_match(target, DistilledSet.open(target).index.get("fingerprint"), fingerprint,
                      f"{what} (imported from {source})")
    log.info("%s: imported %d images from %s into %s", what, len(files), source, target)
    return DistilledSet.open(target)
