"""DALI CPU pipelines over a real image-folder tree and in-memory built-in data."""
import pytest
import torch

from engine.data import DataConfig, build_data
from engine.errors import ConfigError
from engine.loaders import LoaderSpec, build_loader


def _collect(loader):
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def test_two_ranks_deliver_every_file_once_with_the_tail_batch(png_bundle):
    train = png_bundle.train
    reference = png_bundle.normalize(torch.stack([train[i][0] for i in range(len(train))]))
    seen = []
    for rank in range(2):
        spec = LoaderSpec(batch_size=7, shuffle=True, seed=1, num_workers=2)
        loader = build_loader("dali", png_bundle, "train", spec, rank=rank, world_size=2)
        loader.set_epoch(5)
        sizes = [len(y) for _, y in loader]
        assert sizes == [7, 7, 6]  # 20 per rank: the short tail batch arrives
        images, labels = _collect(loader)
        order = loader.indices()
        assert labels.dtype == torch.int64 and labels.tolist() == [train.labels[i] for i in order]
        # PNG decode is lossless and already at 32 px: the same pixels as engine.data reads.
        assert torch.allclose(images, reference[torch.from_numpy(order)], atol=1e-4)
        seen.extend(order.tolist())
    assert sorted(seen) == list(range(len(train)))


def test_same_order_as_the_torch_loader(png_bundle):
    spec = LoaderSpec(batch_size=16, shuffle=True, seed=7, num_workers=0)
    torch_labels = torch.cat([y for _, y in build_loader("torch", png_bundle, "test", spec, 1, 2)])
    dali_labels = torch.cat([y for _, y in build_loader("dali", png_bundle, "test", spec, 1, 2)])
    assert torch.equal(torch_labels, dali_labels)


def test_two_view_train_mode_and_gray_decode(png_tree):
    bundle = build_data(DataConfig(name="imagefolder", root=str(png_tree), image_size=24,
                                   channels=1, mean=[0.5], std=[0.25]))
    spec = LoaderSpec(batch_size=8, transform="train", views=2, crop_scale=(0.2, 1.0), num_workers=2)
    batches = list(build_loader("dali", bundle, "test", spec, 0, 1))
    assert [len(y) for _, y in batches] == [8, 2]
    (first, second), _ = batches[0]
    assert first.shape == second.shape == (8, 1, 24, 24)
    assert not torch.equal(first, second)
    low, high = (0 - 0.5) / 0.25, (1 - 0.5) / 0.25
    assert first.min() >= low - 1e-5 and first.max() <= high + 1e-5


def test_in_memory_builtin_through_dali_eval(tmp_path):
    bundle = build_data(DataConfig(name="digits", image_size=16))
    spec = LoaderSpec(batch_size=100, num_workers=1)
    images, labels = _collect(build_loader("dali", bundle, "test", spec, 0, 1))
    assert images.shape == (len(bundle.test), 1, 16, 16)
    assert labels.tolist() == list(bundle.test.labels)
    expected = bundle.normalize(bundle.test.images.float() / 255)
    assert torch.allclose(images, expected, atol=1e-4)


def test_world_larger_than_the_split_is_a_config_error(png_bundle):
    with pytest.raises(ConfigError, match="world size 12 is larger than the 10 samples"):
        build_loader("dali", png_bundle, "test", LoaderSpec(), rank=0, world_size=12)


def test_a_file_gone_after_listing_is_a_config_error(png_tree, tmp_path):
    import shutil

    tree = tmp_path / "tree"
    shutil.copytree(png_tree, tree)
    bundle = build_data(DataConfig(name="imagefolder", root=str(tree), image_size=32,
                                   mean=[0.5] * 3, std=[0.25] * 3))
    bundle.test.files[3].unlink()
    with pytest.raises(ConfigError, match="DALI failed reading imagefolder test split"):
        list(build_loader("dali", bundle, "test", LoaderSpec(batch_size=4, num_workers=1), 0, 1))


def test_missing_image_tree_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_data(DataConfig(name="imagefolder", root=str(tmp_path / "absent")))
