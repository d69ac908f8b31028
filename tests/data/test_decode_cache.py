"""The decode cache of image trees (engine.data.decode_cache): one decode, the same crops, rebuilt on change.

Real images: foolbox's ImageNet PNGs (512x512) plus non-square crops of them (512x384, 300x420).
"""
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from engine.data import DataConfig, build_data
from engine.data.decode_cache import IMAGES_FILE, META_FILE, TABLE_FILE, eval_images, open_or_build
from engine.data.imagefolder import load_image
from engine.data.views import CropSpec, CropViews, FileSource
from engine.loaders import LoaderSpec, build_loader
from realdata import make_imagefolder_tree

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    per_class = make_imagefolder_tree(root, "imagenet")
    for cls, files in list(per_class.items())[:3]:
        with Image.open(files[0]) as img:
            img = img.convert("RGB")
            img.crop((0, 64, 512, 448)).save(root / "train" / cls / "wide.png")  # 512 x 384
            img.crop((100, 20, 400, 440)).save(root / "train" / cls / "tall.png")  # 300 x 420
    return root


def _bundle(root, size, cache_root=None, **kw):
    cfg = DataConfig(name="imagefolder", root=str(root), image_size=size, mean=[0.5] * 3, std=[0.25] * 3, **kw)
    dirs = None if cache_root is None else {s: cache_root / s for s in ("train", "test")}
    return build_data(cfg, dirs)


def _views(source, labels, spec, epoch):
    views = CropViews(source, labels, spec).at_epoch(epoch)
    return torch.stack([views[i][0] for i in range(len(views))])


def test_small_images_are_kept_pixel_for_pixel_and_crops_equal_file_crops(tree, tmp_path, capsys):
    # image_size 256: the cap is 512 px; files with a shorter side <= 512 are kept exactly
    bundle = _bundle(tree, 256, tmp_path)
    assert "decoded once" in capsys.readouterr().out
    cache = bundle.train.cache
    assert cache is not None and bundle.test.cache is not None
    small = []
    for i, path in enumerate(bundle.train.files):
        with Image.open(path) as img:
            if min(img.size) <= 512:
                small.append(i)
                assert np.array_equal(cache.array(i), np.asarray(img.convert("RGB")))
            else:  # capped: shorter side 512, aspect kept
                assert min(cache.array(i).shape[:2]) == 512
    assert 10 <= len(small) < len(bundle.train.files)
    spec = CropSpec(size=256, scale=(0.08, 1.0), views=2, flip=0.5, seed=3)
    files = FileSource([bundle.train.files[i] for i in small], 3)
    labels = [bundle.train.labels[i] for i in small]
    for epoch in (0, 1):
        assert torch.equal(_views(bundle.train.source(small), labels, spec, epoch), _views(files, labels, spec, epoch))
    for i in range(len(bundle.test)):  # the test split's eval transform, through the cache
        with Image.open(bundle.test.files[i]) as img:
            if min(img.size) <= 512:
                assert torch.equal(bundle.test[i][0], load_image(bundle.test.files[i], 3, 256, 0.875))


def test_large_images_give_the_same_crops_within_the_stated_tolerance(tree, tmp_path):
    # image_size 32: the cache keeps the shorter side at 64 px, files are 300-1024 px
    bundle = _bundle(tree, 32, tmp_path)
    cache = bundle.train.cache
    assert max(min(cache.array(i).shape[:2]) for i in range(len(cache))) == 64
    spec = CropSpec(size=32, scale=(0.25, 1.0), seed=1)  # a quarter of the area or more: never upsampled
    cached = _views(bundle.train.source(), bundle.train.labels, spec, 0).float()
    decoded = _views(FileSource(bundle.train.files, 3), bundle.train.labels, spec, 0).float()
    # same box, resampled from a 2x-downscaled copy: PIL bilinear rounding, a few levels on edges
    assert (cached - decoded).abs().mean() < 3.0, (cached - decoded).abs().mean()
    eval_cached = torch.stack([bundle.test[i][0] for i in range(len(bundle.test))])
    eval_files = torch.stack([load_image(f, 3, 32, 0.875) for f in bundle.test.files])
    assert (eval_cached - eval_files).abs().mean() < 3.0 / 255


def test_loader_batches_from_the_cache_equal_batches_decoded_from_files(tree, tmp_path):
    # image_size 512: the cap (1024 px) keeps every file whole, so the batches are bit-equal
    cached, files = _bundle(tree, 512, tmp_path), _bundle(tree, 512)
    assert cached.train.cache is not None and files.train.cache is None
    for transform in ("train", "eval"):
        spec = LoaderSpec(batch_size=8, shuffle=True, transform=transform, num_workers=0, image_size=64)
        a = build_loader("torch", cached, "train", spec, rank=0, world_size=1)
        b = build_loader("torch", files, "train", spec, rank=0, world_size=1)
        a.set_epoch(2), b.set_epoch(2)
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(ya, yb)
            assert torch.equal(xa, xb)


def _copy_tree(tree, dst):
    shutil.copytree(tree, dst)
    return dst


def test_cache_is_reused_then_rebuilt_when_the_tree_changes(tree, tmp_path, capsys):
    root = _copy_tree(tree, tmp_path / "tree")
    cache_root = tmp_path / "cache"
    _bundle(root, 32, cache_root)
    capsys.readouterr()
    _bundle(root, 32, cache_root)
    assert capsys.readouterr().out == ""  # unchanged tree: reused silently
    cls = sorted((root / "train").iterdir())[0]
    victim = sorted(cls.glob("imagenet_*"))[0]
    changes = {
        "add": lambda: shutil.copyfile(victim, cls / f"added{victim.suffix}"),
        "remove": lambda: (cls / f"added{victim.suffix}").unlink(),
        "modify": lambda: Image.open(victim).convert("RGB").rotate(90).save(victim),
    }
    for change, apply in changes.items():
        apply()
        bundle = _bundle(root, 32, cache_root)
        out = capsys.readouterr().out
        assert "stale" in out and "rebuilding" in out, (change, out)
        assert len(bundle.train.cache) == len(bundle.train.files)
    index = bundle.train.files.index(victim)
    with Image.open(victim) as img:
        rotated = img.convert("RGB")
    h, w = bundle.train.cache.array(index).shape[:2]
    expected = np.asarray(rotated.resize((w, h), Image.BILINEAR))
    assert np.array_equal(bundle.train.cache.array(index), expected)  # the new content, not the old


@pytest.mark.parametrize("damage", ["truncate", "meta", "table"])
def test_corrupt_cache_is_rebuilt_with_one_line(tree, tmp_path, capsys, damage):
    cache_root = tmp_path / "cache"
    first = _bundle(tree, 32, cache_root)
    expected = [first.train.cache.array(i) for i in range(len(first.train.cache))]
    folder = cache_root / "train"
    if damage == "truncate":
        os.truncate(folder / IMAGES_FILE, 100)
    elif damage == "meta":
        (folder / META_FILE).write_text("{not json")
    else:
        np.save(folder / TABLE_FILE, np.zeros((3, 2), dtype=np.int64))
    capsys.readouterr()
    again = _bundle(tree, 32, cache_root)
    lines = [line for line in capsys.readouterr().out.splitlines() if "stale or corrupt" in line]
    assert len(lines) == 1 and str(folder) in lines[0]
    assert all(np.array_equal(again.train.cache.array(i), e) for i, e in enumerate(expected))


def test_tree_over_the_budget_streams_from_the_files(tree, tmp_path, capsys):
    files = sorted((tree / "train").rglob("*.*"))
    assert open_or_build(tmp_path / "c", files, 3, 32, budget_bytes=1000, what="the tree") is None
    assert "streaming it from the files" in capsys.readouterr().out
    bundle = _bundle(tree, 32, tmp_path, cache_mb=0)
    assert bundle.train.cache is None and isinstance(bundle.train.source(), FileSource)


def test_test_split_goes_through_the_cache_and_is_decoded_once(tree, tmp_path):
    from engine.evaluate.settings import EvaluateConfig
    from engine.evaluate.stage import test_split
    from engine.training.metrics import evaluate_accuracy
    from engine.models import ModelConfig, build_model

    bundle = _bundle(tree, 32, tmp_path)
    split = test_split(bundle, EvaluateConfig())
    assert isinstance(split.images, torch.Tensor) and split.images.dtype == torch.uint8
    for i in range(len(bundle.test)):
        assert torch.equal(split[i][0], bundle.test[i][0])  # the cache's eval crops, 8-bit exact
    assert eval_images(bundle.test, budget_bytes=10) is bundle.test  # too large: stays streamed
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="convnet"), bundle.num_classes, 3, 32)
    assert evaluate_accuracy(model, split, bundle.normalize, torch.device("cpu")) == \
        evaluate_accuracy(model, bundle.test, bundle.normalize, torch.device("cpu"))


def test_two_processes_building_the_same_cache_agree(tree, tmp_path):
    import multiprocessing

    files = sorted((tree / "train").rglob("*.*"))
    context = multiprocessing.get_context("fork")
    builders = [context.Process(target=open_or_build, args=(tmp_path / "c", files, 3, 16, 2**30, "the tree"),
                                kwargs={"announce": lambda line: None}) for _ in range(2)]
    for p in builders:
        p.start()
    for p in builders:
        p.join()
    assert [p.exitcode for p in builders] == [0, 0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no build left beside it
    cache = open_or_build(tmp_path / "c", files, 3, 16, 2**30, "the tree", announce=pytest.fail)  # reused as is
    assert len(cache) == len(files)
