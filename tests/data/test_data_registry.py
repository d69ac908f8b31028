import numpy as np
import pytest
import torch

from engine.data import DATASETS, DataConfig, build_data
from engine.errors import ConfigError


def test_mnist5k_shapes_split_and_stats():
    bundle = build_data(DataConfig(name="mnist5k"))
    assert (len(bundle.train), len(bundle.test)) == (4000, 1000)
    assert bundle.num_classes == 10 and bundle.channels == 1 and bundle.image_size == 28
    x, y = bundle.train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert np.bincount(bundle.train.labels).tolist() == [400] * 10
    assert np.bincount(bundle.test.labels).tolist() == [100] * 10
    # statistics come from the training split, and MNIST is mostly black
    assert 0.1 < bundle.mean[0] < 0.15 and 0.25 < bundle.std[0] < 0.35


def test_split_is_stable_and_seeded():
    a = build_data(DataConfig(name="digits"))
    b = build_data(DataConfig(name="digits"))
    c = build_data(DataConfig(name="digits", split_seed=1))
    assert torch.equal(a.train.images, b.train.images)
    assert not torch.equal(a.train.images, c.train.images)
    # train and test never share an image index: sizes add up to the whole set
    assert len(a.train) + len(a.test) == 1797


def test_digits_entry():
    bundle = build_data(DataConfig(name="digits"))
    assert bundle.num_classes == 10 and bundle.image_size == 8 and bundle.channels == 1
    assert np.bincount(bundle.test.labels).tolist() == [30] * 10
    assert bundle.train.images.max() == 255


def test_resize_and_channels():
    bundle = build_data(DataConfig(name="digits", image_size=16, channels=3))
    x, _ = bundle.train[0]
    assert x.shape == (3, 16, 16)
    assert len(bundle.mean) == 3


def test_normalize_roundtrip_and_bounds():
    bundle = build_data(DataConfig(name="digits"))
    x = torch.stack([bundle.train[i][0] for i in range(8)])
    z = bundle.normalize(x)
    assert torch.allclose(bundle.denormalize(z), x, atol=1e-6)
    low, high = bundle.pixel_bounds()
    assert torch.all(z >= low - 1e-6) and torch.all(z <= high + 1e-6)


def test_every_registry_entry_is_named_in_configs():
    from engine.data import DATA_PRESETS

    assert set(DATA_PRESETS) == set(DATASETS)
    assert all(cfg.name == name for name, cfg in DATA_PRESETS.items())


def test_unknown_name_and_bad_values():
    with pytest.raises(ConfigError, match="unknown data 'nope'"):
        build_data(DataConfig(name="nope"))
    with pytest.raises(ConfigError, match="test_per_class"):
        build_data(DataConfig(name="digits", test_per_class=500))
    with pytest.raises(ConfigError, match="verify"):
        DataConfig(verify="sometimes")
