"""The deterministic crop-resize (two matrix products) against F.interpolate, and the mean pooling head.

deterministic=true swaps F.interpolate (no deterministic CUDA backward) for interpolation matrices in
recover's per-step augmentation; these checks run on the CPU, where both exist.
"""
import pytest
import torch
import torch.nn.functional as F

from engine.models import ModelConfig, build_model
from engine.recover.augment import augment_batch, bilinear_matrix, crop_resize, crop_resize_matmul
from engine.recover.settings import StepAugment


def _interpolate(x, top, left, h, w, size):
    return F.interpolate(x[:, :, top:top + h, left:left + w], size=(size, size), mode="bilinear",
                         align_corners=False)


@pytest.mark.parametrize("length, size", [(n, s) for n in (1, 2, 3, 7, 8, 13, 24, 31, 56, 224)
                                          for s in (1, 2, 5, 8, 9, 28, 32, 64, 224)])
def test_interpolation_weights_are_f_interpolate_s(length, size):
    """Each row holds F.interpolate's two bilinear weights, to the last bit (up- and downsampling)."""
    eye = torch.eye(length).reshape(length, 1, length, 1)  # unit impulses along H
    expected = F.interpolate(eye, size=(size, 1), mode="bilinear", align_corners=False)[:, 0, :, 0].t()
    assert torch.equal(bilinear_matrix(0, length, length, size), expected)
    offset = bilinear_matrix(3, length, length + 5, size)  # a crop at 3 of a longer axis
    assert torch.equal(offset[:, 3:3 + length], expected) and not offset[:, :3].any() and not offset[:, 3 + length:].any()


def test_random_crops_match_f_interpolate_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        height, width = (int(v) for v in torch.randint(2, 40, (2,), generator=g))
        h, w = int(torch.randint(1, height + 1, (1,), generator=g)), int(torch.randint(1, width + 1, (1,), generator=g))
        top = int(torch.randint(0, height - h + 1, (1,), generator=g))
        left = int(torch.randint(0, width - w + 1, (1,), generator=g))
        size = int(torch.randint(1, 48, (1,), generator=g))
        x = torch.randn(2, 3, height, width, generator=g, requires_grad=True)
        expected = _interpolate(x, top, left, h, w, size)
        got = crop_resize_matmul(x, top, left, h, w, size)
        assert got.shape == expected.shape == (2, 3, size, size)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        upstream = torch.randn(expected.shape, generator=g)
        (grad_expected,) = torch.autograd.grad(expected, x, upstream)
        (grad_got,) = torch.autograd.grad(got, x, upstream)
        scale = grad_expected.abs().max().item()
        torch.testing.assert_close(grad_got, grad_expected, rtol=0, atol=2e-6 * max(scale, 1.0))


def test_channels_last_and_float64_inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 32, 32, generator=g).to(memory_format=torch.channels_last)
    torch.testing.assert_close(crop_resize_matmul(x, 5, 2, 20, 27, 32), _interpolate(x, 5, 2, 20, 27, 32),
                               rtol=0, atol=1e-6)
    x64 = x.double()
    torch.testing.assert_close(crop_resize_matmul(x64, 5, 2, 20, 27, 32), _interpolate(x64, 5, 2, 20, 27, 32),
                               rtol=0, atol=1e-12)


def test_crop_resize_uses_matrices_only_in_deterministic_mode():
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    plain = crop_resize(x, 1, 2, 11, 9, 16)
    assert torch.equal(plain, _interpolate(x, 1, 2, 11, 9, 16))
    torch.use_deterministic_algorithms(True)
    try:
        deterministic = crop_resize(x, 1, 2, 11, 9, 16)
        assert torch.equal(deterministic, crop_resize_matmul(x, 1, 2, 11, 9, 16))
        assert torch.equal(crop_resize(x, 0, 0, 16, 16, 16), x)  # a full crop is no resize at all
    finally:
        torch.use_deterministic_algorithms(False)
    torch.testing.assert_close(deterministic, plain, rtol=0, atol=1e-6)


def test_augment_batch_is_the_same_step_in_both_modes():
    """Same crop, flip and roll draws: the two modes differ by float rounding only."""
    aug = StepAugment(image_size=28, crop_scale=(0.08, 1.0), flip=True, jitter=3)
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    plain = [augment_batch(x, aug, torch.Generator().manual_seed(s)) for s in range(8)]
    torch.use_deterministic_algorithms(True)
    try:
        det = [augment_batch(x, aug, torch.Generator().manual_seed(s)) for s in range(8)]
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(plain, det):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name, channels, size", [("convnet", 1, 8), ("resnet18_cifar", 3, 16), ("resnet18", 3, 32)])
def test_heads_pool_with_a_mean_equal_to_adaptive_average_pooling(name, channels, size):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, width=8, depth=2), 10, channels, size).eval()
    assert not any(isinstance(m, torch.nn.AdaptiveAvgPool2d) for m in model.modules())
    pool = model.backbone.pool if name == "convnet" else model.backbone.avgpool
    x = torch.randn(4, 16, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(pool(x), F.adaptive_avg_pool2d(x, 1), rtol=1e-15, atol=0)
    x32 = torch.randn(4, 16, 7, 7)
    torch.testing.assert_close(pool(x32), F.adaptive_avg_pool2d(x32, 1), rtol=1e-6, atol=1e-7)
