"""FFCV: write real images to .beton and read them back through engine.loaders."""
import json

import pytest
import torch

from engine.data import DataConfig, build_data
from engine.errors import ConfigError
from engine.loaders import LoaderSpec, build_loader
from engine.loaders.convert_ffcv import convert, main


def _collect(loader):
    images, labels = [], []
    for x, y in loader:
        images.append(x)
        labels.append(y)
    return torch.cat(images), torch.cat(labels)


def test_raw_round_trip_is_bit_exact_with_a_short_tail_batch(png_bundle, raw_betons):
    train = png_bundle.train
    loader = build_loader("ffcv", png_bundle, "train",
                          LoaderSpec(batch_size=7, beton_dir=str(raw_betons), num_workers=1,
                                     normalize=False), rank=0, world_size=1)
    sizes = [len(y) for _, y in loader]
    assert sizes == [7, 7, 7, 7, 7, 5]  # 40 samples, tail delivered (FFCV's default drops it)
    images, labels = _collect(loader)
    assert images.dtype == torch.float32 and images.shape == (40, 3, 32, 32)
    assert labels.dtype == torch.int64 and labels.tolist() == list(train.labels)
    expected = torch.stack([train[i][0] for i in range(len(train))])
    assert torch.equal((images * 255).round().byte(), (expected * 255).round().byte())
    assert json.loads((raw_betons / "meta.json").read_text())["num_train"] == 40


def test_shuffled_ranks_cover_every_sample_once_and_normalize_like_the_bundle(png_bundle, raw_betons):
    train = png_bundle.train
    reference = png_bundle.normalize(torch.stack([train[i][0] for i in range(len(train))]))
    seen = []
    for rank in range(3):
        loader = build_loader("ffcv", png_bundle, "train",
                              LoaderSpec(batch_size=4, shuffle=True, seed=3,
                                         beton_dir=str(raw_betons), num_workers=1),
                              rank=rank, world_size=3)
        loader.set_epoch(2)
        images, labels = _collect(loader)
        order = loader.indices()
        assert len(images) == len(order) == len(range(rank, 40, 3))
        assert labels.tolist() == [train.labels[i] for i in order]
        assert torch.allclose(images, reference[torch.from_numpy(order)], atol=1e-5)
        seen.extend(order.tolist())
    assert sorted(seen) == list(range(40))


def test_two_view_train_mode_gives_two_different_views(png_bundle, raw_betons):
    spec = LoaderSpec(batch_size=16, transform="train", views=2, crop_scale=(0.2, 1.0),
                      beton_dir=str(raw_betons), num_workers=1)
    loader = build_loader("ffcv", None, "test", spec, rank=0, world_size=1)  # meta.json stats
    batches = list(loader)
    assert [len(y) for _, y in batches] == [10]
    (first, second), labels = batches[0]
    assert first.shape == second.shape == (10, 3, 32, 32)
    assert not torch.equal(first, second)
    assert labels.tolist() == list(png_bundle.test.labels)


def test_gray_builtin_round_trip_and_sharding(tmp_path):
    bundle = build_data(DataConfig(name="digits"))
    convert(bundle, tmp_path, fmt="raw", workers=1)
    images, labels = [], []
    for rank in range(2):
        loader = build_loader("ffcv", bundle, "test",
                              LoaderSpec(batch_size=64, beton_dir=str(tmp_path), normalize=False,
                                         num_workers=1), rank=rank, world_size=2)
        x, y = _collect(loader)
        assert x.shape[1:] == (1, 8, 8)
        images.append(x)
        labels.append(y)
    # Unshuffled strided shards: rank r holds samples r, r+2, ...
    merged = torch.empty(len(bundle.test), 1, 8, 8)
    merged[0::2], merged[1::2] = images
    assert torch.equal((merged * 255).round().byte(), bundle.test.images)
    assert sorted(torch.cat(labels).tolist()) == sorted(bundle.test.labels)


def test_failed_conversion_leaves_no_beton_and_no_temp_file(png_tree, tmp_path):
    victim = sorted((png_tree / "train").rglob("*.png"))[3]
    broken = tmp_path / "tree"
    import shutil

    shutil.copytree(png_tree, broken)
    (broken / victim.relative_to(png_tree)).write_bytes(b"not a png")
    bundle = build_data(DataConfig(name="imagefolder", root=str(broken), image_size=32,
                                   verify="none", mean=[0.5] * 3, std=[0.25] * 3))
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="failed while writing train.beton"):
        convert(bundle, out, fmt="jpg", workers=2)
    assert list(out.iterdir()) == []


def test_convert_command_writes_all_three_files(png_tree, tmp_path, capsys):
    assert main(["--data", "imagefolder", "--root", str(png_tree), "--out", str(tmp_path),
                 "--format", "jpg", "--max-resolution", "64", "--workers", "1"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json", "train.beton", "val.beton"]
    assert main(["--data", "imagefolder", "--root", str(tmp_path / "nope"), "--out",
                 str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bad_ffcv_input_is_one_config_error(png_bundle, raw_betons, tmp_path):
    with pytest.raises(ConfigError, match="missing; write it with"):
        build_loader("ffcv", png_bundle, "train", LoaderSpec(beton_dir=str(tmp_path)), 0, 1)
    with pytest.raises(ConfigError, match="needs beton_dir"):
        build_loader("ffcv", png_bundle, "train", LoaderSpec(), 0, 1)
    (tmp_path / "train.beton").write_bytes((raw_betons / "train.beton").read_bytes()[:100])
    with pytest.raises(ConfigError, match="meta.json is missing"):
        build_loader("ffcv", png_bundle, "train", LoaderSpec(beton_dir=str(tmp_path)), 0, 1)
    with pytest.raises(ConfigError, match="world size 11 is larger than the 10 samples"):
        build_loader("ffcv", png_bundle, "test", LoaderSpec(beton_dir=str(raw_betons)), 0, 11)


def test_reading_leaves_torchs_thread_count_alone(png_bundle, raw_betons):
    # FFCV sets torch's thread count to its worker count for the whole process; the loader puts it back
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loader = build_loader("ffcv", png_bundle, "train",
                              LoaderSpec(batch_size=8, beton_dir=str(raw_betons), num_workers=2,
                                         normalize=False), rank=0, world_size=1)
        for _ in loader:
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
