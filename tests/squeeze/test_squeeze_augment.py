"""Batched two-view augmentation: ranges, determinism, identity and flip semantics, recipe choice."""
import pytest
import torch

from engine.errors import ConfigError
from engine.squeeze.augment import AugmentSpec, augment_batch, large_image_spec, small_image_spec, spec_for


def _images(n=6, c=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, c, size, size, generator=g) * 255).to(torch.uint8)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("make", [small_image_spec, large_image_spec])
def test_views_are_float_in_range_and_resized(channels, make):
    x = _images(c=channels)
    spec = make(12)
    out = augment_batch(x, spec, torch.Generator().manual_seed(0))
    assert out.shape == (6, channels, 12, 12) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1


def test_same_generator_state_gives_same_views_and_views_differ():
    x = _images()
    spec = large_image_spec(16)
    a = augment_batch(x, spec, torch.Generator().manual_seed(5))
    b = augment_batch(x, spec, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    g = torch.Generator().manual_seed(5)
    assert not torch.equal(augment_batch(x, spec, g), augment_batch(x, spec, g))


def test_identity_spec_returns_the_image():
    x = _images(c=3)
    spec = AugmentSpec(image_size=16, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=False,
                       jitter_strength=0.0, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)
    out = augment_batch(x, spec, torch.Generator().manual_seed(0))
    assert torch.allclose(out, x.float() / 255, atol=1e-5)


def test_flip_only_mirrors_whole_images():
    x = _images(n=32, c=1)
    spec = AugmentSpec(image_size=16, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=True,
                       jitter_strength=0.0, jitter_prob=0.0, grayscale_prob=0.0)
    out = augment_batch(x, spec, torch.Generator().manual_seed(0))
    ref = x.float() / 255
    same = (out - ref).abs().amax(dim=(1, 2, 3)) < 1e-5
    mirrored = (out - ref.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert bool((same | mirrored).all()) and same.any() and mirrored.any()


def test_grayscale_makes_channels_equal():
    x = _images(c=3)
    spec = AugmentSpec(image_size=16, crop_scale=(1.0, 1.0), flip=False, jitter_strength=0.0,
                       jitter_prob=0.0, grayscale_prob=1.0)
    out = augment_batch(x, spec, torch.Generator().manual_seed(0))
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 1], out[:, 2])


def test_recipe_choice_by_size_and_strength():
    assert spec_for("strong", 28, flip=False) == small_image_spec(28, flip=False)
    assert spec_for("strong", 64, flip=True).blur_prob > 0
    assert spec_for("weak", 28, flip=True).jitter_strength == 0
    assert spec_for("none", 28, flip=True) is None
    assert spec_for("strong", 32, True, crop_scale=(0.5, 1.0)).crop_scale == (0.5, 1.0)
    with pytest.raises(ConfigError, match="strength"):
        spec_for("wild", 28, True)
    with pytest.raises(ConfigError, match="crop_scale"):
        AugmentSpec(image_size=8, crop_scale=(0.0, 1.0))
