"""The static-shape, per-group augmentation (augment_groups) against today's per-batch augment_batch.

Group g's parameters come from generator g with the draws augment_batch makes, so group g's images
(and their gradients) equal augment_batch's on that group; the output shape never depends on the
parameters, and the op traces into one graph that new parameters reuse without recompiling.
"""
import math

import numpy as np
import pytest
import torch

from engine.recover.augment import (PARAM_COLUMNS, augment_batch, augment_groups, bilinear_matrix,
                                    group_matrices, sample_group_params, _crop_weights)
from engine.recover.settings import StepAugment
from engine.training.crops import CROP_UNIFORMS, crop_boxes
from tests.realdata import foolbox_samples

pytestmark = pytest.mark.usefixtures("one_thread")

AUGS = {
    "imagenet-like": StepAugment(image_size=32, crop_scale=(0.08, 1.0), flip=True, jitter=4),
    "resize-down": StepAugment(image_size=20, crop_scale=(0.08, 1.0), flip=True, jitter=3, jitter_mode="forward"),
    "resize-up": StepAugment(image_size=40, crop_scale=(0.5, 1.0), flip=False, jitter=5),
    "cifar-roll-only": StepAugment(image_size=32, crop_scale=(0.5, 1.0), flip=True, jitter=4, crop=False,
                                   jitter_mode="forward"),
    "roll-only-symmetric-noflip": StepAugment(image_size=32, crop_scale=(0.5, 1.0), flip=False, jitter=6,
                                              crop=False),
    "crop-no-roll": StepAugment(image_size=32, crop_scale=(0.08, 1.0), flip=True, jitter=0),
    "flip-only": StepAugment(image_size=32, crop_scale=(0.5, 1.0), flip=True, jitter=0, crop=False),
}


def _images(groups: int, batch: int) -> torch.Tensor:
    """Real CIFAR-10 pictures (foolbox's samples), normalized, [G, B, 3, 32, 32]."""
    from PIL import Image

    paths = [path for path, _ in foolbox_samples("cifar10")][:groups * batch]
    pictures = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32))
                            for p in paths]).permute(0, 3, 1, 2) / 255.0
    pictures = (pictures - pictures.mean()) / pictures.std()
    return pictures.reshape(groups, batch, 3, 32, 32).contiguous()


def _sequential(x: torch.Tensor, aug: StepAugment, seeds: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Today's path: each group augmented by augment_batch from its own generator; the generators' end states."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    out = torch.stack([augment_batch(x[g], aug, generators[g]) for g in range(len(seeds))])
    return out, [g.get_state() for g in generators]


@pytest.mark.parametrize("name", list(AUGS))
def test_groups_equal_augment_batch_forward_and_gradient(name):
    aug = AUGS[name]
    seeds = [3, 11, 12, 40, 41, 42]
    base = _images(len(seeds), 2)
    x_ref = base.clone().requires_grad_(True)
    x_new = base.clone().requires_grad_(True)
    expected, states = _sequential(x_ref, aug, seeds)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    params = sample_group_params(generators, aug, 32)
    got = augment_groups(x_new, params)
    # the same draws: every generator ends where augment_batch left it
    assert all(torch.equal(g.get_state(), s) for g, s in zip(generators, states))
    assert got.shape == expected.shape
    exact = not aug.crop
    torch.testing.assert_close(got, expected, rtol=0, atol=0 if exact else 1e-5)
    upstream = torch.randn(expected.shape, generator=torch.Generator().manual_seed(5))
    (grad_expected,) = torch.autograd.grad(expected, x_ref, upstream)
    (grad_got,) = torch.autograd.grad(got, x_new, upstream)
    torch.testing.assert_close(grad_got, grad_expected, rtol=0, atol=0 if exact else 1e-5)
    # the groups really differ (else equality above would not show per-group parameters)
    assert len({tuple(row) for row in params.values.tolist()}) > 1


def test_flat_layout_and_channels_last_give_the_grouped_result():
    aug = AUGS["imagenet-like"]
    x = _images(3, 2)
    params = sample_group_params([torch.Generator().manual_seed(s) for s in range(3)], aug, 32)
    grouped = augment_groups(x, params)
    flat = x.reshape(6, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(augment_groups(flat, params), grouped.reshape(6, 3, 32, 32), rtol=0, atol=1e-6)


def test_crop_boxes_are_todays_draws_exactly():
    aug = AUGS["imagenet-like"]
    seeds = list(range(50))
    params = sample_group_params([torch.Generator().manual_seed(s) for s in seeds], aug, 224)
    for s, row in zip(seeds, params.values.tolist()):
        uniforms = torch.rand(1, CROP_UNIFORMS, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
        assert row[:4] == crop_boxes(uniforms.numpy(), 224, aug.crop_scale)[0].tolist()
    assert PARAM_COLUMNS[:4] == ("top", "left", "height", "width")


def test_crop_weights_are_bilinear_matrix_bit_for_bit():
    g = torch.Generator().manual_seed(2)
    for size, out in ((32, 32), (224, 224), (37, 20), (16, 48)):
        length = torch.randint(1, size + 1, (64,), generator=g)
        start = (torch.rand(64, generator=g) * (size - length + 1)).long()
        got = _crop_weights(start, length, size, out)
        for i in range(64):
            assert torch.equal(got[i], bilinear_matrix(int(start[i]), int(length[i]), size, out, torch.float64))


def test_crop_distribution_is_torchvision_random_resized_crop():
    """Box statistics of 4000 draws against torchvision's RandomResizedCrop.get_params (scale 0.08-1,
    ratio 3/4-4/3, 224 px): mean area fraction, aspect ratio and offsets within 4 standard errors."""
    from torchvision.transforms import RandomResizedCrop

    n, size, scale = 4000, 224, (0.08, 1.0)
    aug = StepAugment(image_size=size, crop_scale=scale, flip=False, jitter=0)
    ours = sample_group_params([torch.Generator().manual_seed(s) for s in range(n)], aug, size).values.double()
    torch.manual_seed(0)
    image = torch.zeros(1, size, size)
    theirs = torch.tensor([RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3]) for _ in range(n)],
                          dtype=torch.float64)  # (top, left, height, width), as ours

    def stats(boxes):
        area = boxes[:, 2] * boxes[:, 3] / size ** 2
        log_aspect = torch.log(boxes[:, 3] / boxes[:, 2])
        centre = (boxes[:, 0] + boxes[:, 2] / 2) / size
        return {"area": area, "log_aspect": log_aspect, "centre": centre, "top": boxes[:, 0] / size}

    a, b = stats(ours), stats(theirs)
    for key in a:
        se = math.sqrt(a[key].var() / n + b[key].var() / n)
        assert abs(a[key].mean() - b[key].mean()) < 4 * se, key
        # and the spread: quartiles agree
        qa, qb = (np.quantile(v.numpy(), [0.25, 0.5, 0.75]) for v in (a[key], b[key]))
        assert np.abs(qa - qb).max() < 0.05 * (abs(qb).max() + 0.1), key
    assert 0.07 < a["area"].min() and a["area"].max() <= 1.0  # sides are rounded to pixels


def test_output_shape_is_static_and_matrices_are_device_tensors():
    aug = AUGS["resize-down"]
    x = _images(2, 1)
    shapes = set()
    for s in range(20):
        params = sample_group_params([torch.Generator().manual_seed(s), torch.Generator().manual_seed(s + 100)],
                                     aug, 32)
        rows, cols = group_matrices(params)
        shapes.add((augment_groups(x, params).shape, rows.shape, cols.shape))
    assert shapes == {(torch.Size([2, 1, 3, 20, 20]), torch.Size([2, 20, 32]), torch.Size([2, 20, 32]))}


def test_one_graph_serves_every_parameter_set():
    """torch.compile(fullgraph=True, dynamic=False) traces the op in one piece (an ``.item()`` or a
    python int from a tensor would break the graph and fail here), and new parameters reuse it:
    the backend compiles once, and every call gives the eager result."""
    compiled_graphs = []

    def backend(gm, _example_inputs):
        compiled_graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    aug = AUGS["imagenet-like"]
    fn = torch.compile(augment_groups, backend=backend, fullgraph=True, dynamic=False)
    x = _images(2, 2).requires_grad_(True)
    for s in range(4):
        params = sample_group_params([torch.Generator().manual_seed(s), torch.Generator().manual_seed(9 + s)],
                                     aug, 32)
        got = fn(x, params)
        expected = augment_groups(x, params)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        (grad,) = torch.autograd.grad(got.square().sum(), x)
        torch.testing.assert_close(grad, torch.autograd.grad(expected.square().sum(), x)[0], rtol=0, atol=0)
    assert len(compiled_graphs) == 1
    torch._dynamo.reset()


def test_backward_is_bitwise_repeatable():
    aug = AUGS["imagenet-like"]
    x = _images(3, 2).requires_grad_(True)
    params = sample_group_params([torch.Generator().manual_seed(s) for s in range(3)], aug, 32)
    upstream = torch.randn(3, 2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    first, second = (torch.autograd.grad(augment_groups(x, params), x, upstream)[0] for _ in range(2))
    assert torch.equal(first, second)


def test_mismatched_inputs_fail_clearly():
    aug = AUGS["imagenet-like"]
    params = sample_group_params([torch.Generator().manual_seed(0)] * 2, aug, 32)
    with pytest.raises(ValueError, match="drawn for 32x32"):
        augment_groups(torch.zeros(2, 1, 3, 28, 28), params)
    with pytest.raises(ValueError, match="equal groups"):
        augment_groups(torch.zeros(3, 3, 32, 32), params)
    with pytest.raises(ValueError, match="differ"):
        params.copy_(sample_group_params([torch.Generator()] * 3, aug, 32))


def test_autocast_leaves_the_pixels_in_fp32():
    """Under a bf16 autocast (recover.precision=bf16 runs the teacher so) the products stay fp32."""
    aug = AUGS["imagenet-like"]
    x = _images(2, 2)
    params = sample_group_params([torch.Generator().manual_seed(s) for s in range(2)], aug, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = augment_groups(x, params)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, augment_groups(x, params), rtol=0, atol=0)
