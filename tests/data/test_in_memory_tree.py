"""Image trees stored at (or below) their working size (CIFAR/MNIST written as PNGs), evaluated with a plain
resize (data.eval_crop_ratio=1.0), are held in memory after the decode cache is built: the files' pixels,
crops on the device like the built-in sets; any other tree keeps the per-file crop path."""
import numpy as np
import pytest
import torch
from PIL import Image

from engine.data import DataConfig, build_data
from engine.data.imagefolder import ImageFolderDataset, InMemoryTree
from engine.squeeze.pretrain import crop_source
from engine.squeeze.augment import spec_for
from realdata import make_imagefolder_tree

pytestmark = pytest.mark.usefixtures("one_thread")


def _bundle(root, cache_root, **kw):
    cfg = DataConfig(name="imagefolder", root=str(root), image_size=32, **{"eval_crop_ratio": 1.0, **kw})
    dirs = None if cache_root is None else {s: cache_root / s for s in ("train", "test")}
    return build_data(cfg, dirs)


def _file_pixels(path):
    with Image.open(path) as img:
        return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)


def test_a_tree_at_its_working_size_is_held_in_memory_with_the_files_pixels(tmp_path, capsys):
    make_imagefolder_tree(tmp_path / "tree", "cifar10")  # real CIFAR-10 test images, 32x32 PNGs
    bundle = _bundle(tmp_path / "tree", tmp_path / "cache")
    assert "held in memory" in capsys.readouterr().out
    assert isinstance(bundle.train, InMemoryTree) and isinstance(bundle.test, InMemoryTree)
    assert bundle.train.images.shape == (len(bundle.train.files), 3, 32, 32)
    for i, path in enumerate(bundle.train.files):
        assert torch.equal(bundle.train.images[i], _file_pixels(path))

    # The test split equals the streaming path's eval transform (at ratio 1.0 and the file size: the file).
    streaming = _bundle(tmp_path / "tree", None)
    assert isinstance(streaming.test, ImageFolderDataset)
    assert bundle.test.labels == list(streaming.test.labels)
    for i in range(len(streaming.test)):
        expected = (streaming.test[i][0] * 255).round().to(torch.uint8)
        assert torch.equal(bundle.test.images[i], expected)
    # Channel statistics come from the same sample either way.
    assert bundle.mean == streaming.mean and bundle.std == streaming.std
    # No per-file crop path any more: pretraining crops this split on the device.
    assert crop_source(bundle.train, spec_for("strong", 32, True), 2, 0) is None
    assert crop_source(streaming.train, spec_for("strong", 32, True), 2, 0) is not None


def test_a_center_crop_eval_transform_keeps_the_streaming_path(tmp_path):
    """At ratio 0.875 the streaming path shows every unaugmented read (probe features, real starts) zoomed
    like the test split; an in-memory train split would not be, so such a tree streams."""
    make_imagefolder_tree(tmp_path / "tree", "cifar10")
    bundle = _bundle(tmp_path / "tree", tmp_path / "cache", eval_crop_ratio=0.875)
    assert isinstance(bundle.train, ImageFolderDataset) and bundle.train.cache is not None


def test_one_file_of_another_size_keeps_the_streaming_path(tmp_path):
    per_class = make_imagefolder_tree(tmp_path / "tree", "cifar10")
    first = next(iter(per_class.values()))[0]
    with Image.open(first) as img:
        img.convert("RGB").resize((40, 40)).save(first)
    bundle = _bundle(tmp_path / "tree", tmp_path / "cache")
    assert isinstance(bundle.train, ImageFolderDataset) and bundle.train.cache is not None


def test_without_a_cache_the_tree_streams(tmp_path):
    make_imagefolder_tree(tmp_path / "tree", "cifar10")
    bundle = _bundle(tmp_path / "tree", tmp_path / "cache", cache_mb=0)
    assert isinstance(bundle.train, ImageFolderDataset) and bundle.train.cache is None


def test_a_changed_file_reaches_the_in_memory_split(tmp_path, capsys):
    per_class = make_imagefolder_tree(tmp_path / "tree", "cifar10")
    _bundle(tmp_path / "tree", tmp_path / "cache")
    target = next(iter(per_class.values()))[0]
    flipped = _file_pixels(target).flip(-1)
    Image.fromarray(flipped.permute(1, 2, 0).numpy()).save(target)
    capsys.readouterr()
    bundle = _bundle(tmp_path / "tree", tmp_path / "cache")
    assert "stale or corrupt (the image tree changed" in capsys.readouterr().out
    index = bundle.train.files.index(target)
    assert torch.equal(bundle.train.images[index], flipped)


def test_a_smaller_uniform_tree_is_upscaled_once_like_the_built_in_sets(tmp_path):
    from engine.data.tensor_dataset import resize_uint8

    make_imagefolder_tree(tmp_path / "tree", "cifar10")
    cfg = DataConfig(name="imagefolder", root=str(tmp_path / "tree"), image_size=48, eval_crop_ratio=1.0)
    bundle = build_data(cfg, {s: tmp_path / "cache" / s for s in ("train", "test")})
    assert isinstance(bundle.train, InMemoryTree) and bundle.train.images.shape[-2:] == (48, 48)
    originals = torch.stack([_file_pixels(p) for p in bundle.train.files])
    assert torch.equal(bundle.train.images, resize_uint8(originals, 48, 3))
    # Files larger than the working size would lose pixels in memory: they keep the file crops.
    cfg = DataConfig(name="imagefolder", root=str(tmp_path / "tree"), image_size=16, eval_crop_ratio=1.0)
    bundle = build_data(cfg, {s: tmp_path / "cache16" / s for s in ("train", "test")})
    assert isinstance(bundle.train, ImageFolderDataset)
