"""torch DataLoader path: sharding, epochs, transforms, and the shared option checks."""
import numpy as np
import pytest
import torch

from engine.data import DataConfig, build_data
from engine.errors import ConfigError
from engine.loaders import LoaderSpec, build_loader, shard_indices


@pytest.fixture(scope="module")
def digits():
    return build_data(DataConfig(name="digits"))


@pytest.mark.parametrize("shuffle", [False, True])
def test_two_ranks_are_disjoint_and_complete(digits, shuffle):
    spec = LoaderSpec(batch_size=50, shuffle=shuffle, seed=4, num_workers=0)
    reference = digits.normalize(digits.train.images.float() / 255)
    seen, rows = [], []
    for rank in range(2):
        loader = build_loader("torch", digits, "train", spec, rank=rank, world_size=2)
        loader.set_epoch(1)
        images, labels = zip(*loader)
        images, labels = torch.cat(images), torch.cat(labels)
        order = loader.indices()
        assert len(loader) == -(-len(order) // 50) == len(list(loader))
        assert labels.tolist() == [digits.train.labels[i] for i in order]
        assert torch.allclose(images, reference[torch.from_numpy(order)])
        seen.append(set(order.tolist()))
        rows.append(len(order))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(len(digits.train)))
    assert abs(rows[0] - rows[1]) <= 1  # no padding duplicates


def test_drop_last_gives_every_rank_the_same_full_batches():
    lengths = [len(shard_indices(103, r, 3, shuffle=True, drop_last=True, batch_size=8))
               for r in range(3)]
    assert lengths == [32, 32, 32]


def test_epochs_reshuffle_and_repeat_deterministically():
    a = shard_indices(50, 0, 2, shuffle=True, seed=0, epoch=0)
    b = shard_indices(50, 0, 2, shuffle=True, seed=0, epoch=1)
    assert not np.array_equal(a, b)
    assert np.array_equal(a, shard_indices(50, 0, 2, shuffle=True, seed=0, epoch=0))


def test_train_views_from_image_files(png_bundle):
    spec = LoaderSpec(batch_size=6, transform="train", views=2, num_workers=2, seed=0)
    batches = list(build_loader("torch", png_bundle, "test", spec, 0, 1))
    assert [len(y) for _, y in batches] == [6, 4]
    (first, second), labels = batches[0]
    assert first.shape == second.shape == (6, 3, 32, 32) and first.dtype == torch.float32
    assert not torch.equal(first, second)
    again = list(build_loader("torch", png_bundle, "test", spec, 0, 1))
    assert torch.equal(again[0][0][0], first)  # same seed and epoch: same views


def test_from_augment_copies_the_crop_and_flip():
    from engine.squeeze.augment import AugmentSpec

    spec = LoaderSpec.from_augment(AugmentSpec(image_size=32, crop_scale=(0.3, 1.0), flip=False),
                                   views=2)
    assert (spec.transform, spec.crop_scale, spec.flip, spec.image_size) == ("train", (0.3, 1.0), 0.0, 32)


@pytest.mark.parametrize("kwargs, message", [
    (dict(views=2), "needs transform=train"),
    (dict(crop_scale=(0.5, 0.2)), "crop_scale"),
    (dict(transform="random"), "not one of eval|train"),
    (dict(batch_size=0), "batch_size=0"),
])
def test_bad_options_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LoaderSpec(**kwargs)


def test_bad_kind_split_and_world(digits):
    with pytest.raises(ConfigError, match="unknown loader 'tf'"):
        build_loader("tf", digits, "train", LoaderSpec(), 0, 1)
    with pytest.raises(ConfigError, match="split='dev'"):
        build_loader("torch", digits, "dev", LoaderSpec(), 0, 1)
    with pytest.raises(ConfigError, match="rank=2 is outside world_size=2"):
        build_loader("torch", digits, "train", LoaderSpec(), 2, 2)
    with pytest.raises(ConfigError, match="world size 400 is larger than the 300 samples"):
        build_loader("torch", digits, "test", LoaderSpec(), 0, 400)
