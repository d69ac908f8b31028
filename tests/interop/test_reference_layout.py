"""Export our distilled sets in the reference layout (newNNN/classNNN_idNNN) and import such trees back.

Sets are written by the artifact layer's own writer from real images (foolbox's CIFAR-10 photos, sklearn's
digits), exported through `python -m engine.interop export`'s entry point, and imported back: a PNG set
keeps every pixel; a JPEG export states its quality and stays close. Every refusal is one line."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.artifacts import distilled as store
from engine.artifacts.fingerprint import StaleArtifact
from engine.artifacts.reference_layout import export_set, import_set, scan_set
from engine.data import DataConfig, build_data
from engine.errors import ConfigError
from engine.evaluate.settings import EvaluateConfig
from engine.interop import main as interop_main
from realdata import foolbox_samples

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES, IPC = 4, 3


def _real_images(channels: int) -> tuple[torch.Tensor, int]:
    """CLASSES * IPC real images in [0, 1], [N,C,H,W]: CIFAR-10 photos (RGB 32 px) or digits (gray 8 px)."""
    if channels == 3:
        arrays = [np.asarray(Image.open(p).convert("RGB")) for p, _ in foolbox_samples("cifar10")]
        images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    else:
        images = build_data(DataConfig(name="digits")).train.images
    return images[:CLASSES * IPC].float() / 255, images.shape[-1]


def write_set(folder: Path, channels: int, codec: store.Codec = store.Codec()) -> store.DistilledSet:
    """A complete distilled set, batch by batch as recover writes one (one batch per ipc index)."""
    images, size = _real_images(channels)
    names = [f"class_{c}" for c in range(CLASSES)]
    fingerprint = {"test": "reference layout", "channels": channels, "codec": codec.format}
    set_digest = store.digest(fingerprint)
    store.prepare_set_dir(folder, fingerprint, resume=False)
    records = []
    for k in range(IPC):
        store.write_batch(folder, k, images01=images[k * CLASSES:(k + 1) * CLASSES], labels=list(range(CLASSES)),
                          ipc_index=[k] * CLASSES, class_names=names, codec=codec, set_digest=set_digest,
                          log_rows=[], first_ratio=0.0)
        records.append(store.read_batch(folder, k, set_digest))
    meta = {"class_names": names, "num_classes": CLASSES, "channels": channels, "image_size": size,
            "mean": [0.5] * channels, "std": [0.25] * channels, "data": "test", "ipc": IPC, "seed": 0,
            "image_format": codec.format, "jpeg_quality": codec.quality}
    store.finalize_set(folder, records, meta, fingerprint)
    return store.DistilledSet.open(folder)


def reimport(source: Path, target: Path, ours: store.DistilledSet, resume: bool = True) -> store.DistilledSet:
    index = ours.index
    return import_set(source, target, what="test set", class_names=index["class_names"],
                      channels=index["channels"], image_size=index["image_size"], ipc=IPC, resume=resume)


@pytest.mark.parametrize("channels", [3, 1])
def test_png_export_has_the_reference_names_and_reimports_to_equal_pixels(tmp_path, channels, capsys):
    ours = write_set(tmp_path / "set", channels)
    assert interop_main(["export", str(tmp_path / "set"), str(tmp_path / "out")]) == 0
    assert "png, copied as stored" in capsys.readouterr().out
    files = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.png"))
    assert files == sorted(f"new{c:03d}/class{c:03d}_id{k:03d}.png" for c in range(CLASSES) for k in range(IPC))
    record = json.loads((tmp_path / "out" / "scdd_export.json").read_text())
    assert record["source_digest"] == ours.digest and record["class_names"] == ours.index["class_names"]
    assert record["jpeg_quality"] is None

    back = reimport(tmp_path / "out", tmp_path / "back", ours)
    a, b = ours.tensors(), back.tensors()
    order_a = np.lexsort((a["ipc_index"].numpy(), a["labels"].numpy()))
    assert torch.equal(a["labels"][order_a], b["labels"]) and torch.equal(a["ipc_index"][order_a], b["ipc_index"])
    assert torch.equal(a["images"][order_a], b["images"])
    assert b["images"].shape[1] == channels and b["images"].float().std() > 10  # real pixels, not blank


def test_jpeg_export_states_its_quality_and_stays_close(tmp_path, capsys):
    ours = write_set(tmp_path / "set", 3)
    assert interop_main(["export", str(tmp_path / "set"), str(tmp_path / "out"), "--format", "jpeg",
                         "--quality", "92"]) == 0
    assert "jpeg (quality 92), re-encoded" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "scdd_export.json").read_text())["jpeg_quality"] == 92
    first = tmp_path / "out" / "new000" / "class000_id000.jpg"
    with Image.open(first) as img:
        assert img.format == "JPEG"
    back = reimport(tmp_path / "out", tmp_path / "back", ours)
    assert back.index["image_format"] == "jpeg"
    a, b = ours.tensors()["images"].float(), back.tensors()["images"].float()
    order = np.lexsort((ours.tensors()["ipc_index"].numpy(), ours.tensors()["labels"].numpy()))
    error = (a[order] - b).abs().mean()
    assert 0 < error < 4  # lossy, by a few levels of 255 at quality 92 on 32 px photos


def test_jpeg_set_exported_as_stored_copies_its_bytes_and_as_png_keeps_its_decoded_pixels(tmp_path):
    ours = write_set(tmp_path / "set", 3, store.Codec("jpeg", 93))
    record = export_set(tmp_path / "set", tmp_path / "out")
    assert record["copied"] and record["image_format"] == "jpeg" and record["jpeg_quality"] == 93
    stored = (tmp_path / "set" / "images" / "class_2" / "ipc0001.jpg").read_bytes()
    assert (tmp_path / "out" / "new002" / "class002_id001.jpg").read_bytes() == stored
    record = export_set(tmp_path / "set", tmp_path / "png", image_format="png")
    assert not record["copied"] and record["image_format"] == "png" and record["jpeg_quality"] is None
    back = reimport(tmp_path / "png", tmp_path / "back", ours).tensors()
    order = np.lexsort((ours.tensors()["ipc_index"].numpy(), ours.tensors()["labels"].numpy()))
    assert torch.equal(ours.tensors()["images"][order], back["images"])


def test_export_refusals_are_one_line(tmp_path, capsys):
    write_set(tmp_path / "run" / "recover" / "ssl-noise", 1)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "note.txt").write_text("x")
    cases = [([str(tmp_path / "run"), str(tmp_path / "o1")], "is a run dir, not a distilled set"),
             ([str(tmp_path / "nothing"), str(tmp_path / "o2")], "holds no complete distilled set"),
             ([str(tmp_path / "run" / "recover" / "ssl-noise"), str(tmp_path / "busy")], "is not empty")]
    for args, expected in cases:
        assert interop_main(["export", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("interop: error: ") and expected in err and "\n" not in err
    assert not (tmp_path / "o1").exists() and (tmp_path / "busy" / "note.txt").is_file()


def test_import_is_reused_while_the_files_are_the_same_and_refused_when_they_change(tmp_path, capsys):
    ours = write_set(tmp_path / "set", 1)
    export_set(tmp_path / "set", tmp_path / "out")
    first = reimport(tmp_path / "out", tmp_path / "back", ours)
    stamp = (tmp_path / "back" / "index.json").stat().st_mtime_ns
    for resume in (True, False):  # a copy of the same files: reused either way
        again = reimport(tmp_path / "out", tmp_path / "back", ours, resume=resume)
        assert again.digest == first.digest and (tmp_path / "back" / "index.json").stat().st_mtime_ns == stamp
    assert "replacing" not in capsys.readouterr().out
    changed = tmp_path / "out" / "new001" / "class001_id002.png"
    with Image.open(changed) as img:
        img.transpose(Image.FLIP_TOP_BOTTOM).save(changed)
    with pytest.raises(StaleArtifact, match="source_files") as exc:
        reimport(tmp_path / "out", tmp_path / "back", ours)
    assert "\n" not in str(exc.value)
    replaced = reimport(tmp_path / "out", tmp_path / "back", ours, resume=False)
    assert "replacing the existing test set import" in capsys.readouterr().out
    assert replaced.digest != first.digest


def _reference_tree(root: Path, classes: int = 3, per_class: int = 2, size: int = 8) -> Path:
    """A tree as the reference scripts save one: PIL's default JPEG of real digits."""
    digits = build_data(DataConfig(name="digits")).train
    for c in range(classes):
        picks = [i for i, label in enumerate(digits.labels) if label == c][:per_class]
        (root / f"new{c:03d}").mkdir(parents=True)
        for k, i in enumerate(picks):
            image = Image.fromarray(digits.images[i, 0].numpy()).resize((size, size))
            image.save(root / f"new{c:03d}" / f"class{c:03d}_id{k:03d}.jpg")
    return root


def _scan(root: Path, classes: int = 3, size: int = 8, ipc: int = 2):
    return scan_set(root, "evaluate.external_sets.theirs", classes, size, ipc)


def test_scan_reads_the_reference_tree_in_class_and_id_order(tmp_path):
    root = _reference_tree(tmp_path / "theirs")
    scanned = _scan(root)
    assert scanned.labels == [0, 0, 1, 1, 2, 2] and scanned.ipc_index == [0, 1] * 3 and scanned.per_class == 2
    assert [p.name for p in scanned.files[:2]] == ["class000_id000.jpg", "class000_id001.jpg"]


def _error_cases(tmp_path: Path):
    def missing():
        return tmp_path / "absent"

    def no_class_folders():
        (tmp_path / "flat").mkdir()
        Image.new("L", (8, 8)).save(tmp_path / "flat" / "class000_id000.jpg")
        return tmp_path / "flat"

    def too_many_classes():
        return _reference_tree(tmp_path / "wide", classes=4)

    def missing_class():
        root = _reference_tree(tmp_path / "gap")
        for path in (root / "new001").iterdir():
            path.unlink()
        (root / "new001").rmdir()
        return root

    def wrong_size():
        return _reference_tree(tmp_path / "big", size=16)

    def unreadable():
        root = _reference_tree(tmp_path / "bad")
        (root / "new002" / "class002_id001.jpg").write_bytes(b"not a jpeg at all")
        return root

    def too_few_images():
        return _reference_tree(tmp_path / "few", per_class=1)

    return [(missing, "does not exist"), (no_class_folders, "holds no newNNN class folders"),
            (too_many_classes, "has class folder new003 (class 3) but the teacher and data have 3 classes"),
            (missing_class, "has no folder for class 1"), (wrong_size, "is 16x16 but data.image_size=8"),
            (unreadable, "class002_id001.jpg is unreadable"), (too_few_images, "holds 1 images but ipc=2")]


def test_scan_refusals_are_one_line_each(tmp_path):
    for make, expected in _error_cases(tmp_path):
        with pytest.raises(ConfigError) as exc:
            _scan(make())
        message = str(exc.value)
        assert expected in message and "\n" not in message and message.startswith("evaluate.external_sets.theirs")


@pytest.mark.parametrize("value, expected", [({"random_real": "/x"}, "none of our rows"),
                                             ({"my set": "/x"}, "must be letters"),
                                             ({"ok": ""}, "must be the set's folder path"),
                                             ("/just/a/path", "must map names to folders")])
def test_external_set_names_are_checked(value, expected):
    with pytest.raises(ConfigError, match=expected):
        EvaluateConfig(external_sets=value)
    assert EvaluateConfig(external_sets={"rded_ipc10": "/data/rded"}).external_sets == {"rded_ipc10": "/data/rded"}
