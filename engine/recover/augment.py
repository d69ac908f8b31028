"""Per-step augmentation of the whole synthetic batch: random resized crop, flip, roll.

One set of parameters per step for the whole batch (as SRe2L does), drawn from a CPU generator
so a batch's images are the same on any device and in any process.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from engine.recover.settings import StepAugment


def sample_crop(height: int, width: int, scale: tuple[float, float], generator: torch.Generator,
                ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random resized crop, torchvision's rule with a seeded generator."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(3, generator=generator).tolist()
        target = area * (scale[0] + u[0] * (scale[1] - scale[0]))
        aspect = math.exp(log_ratio[0] + u[1] * (log_ratio[1] - log_ratio[0]))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    return 0, 0, height, width


def augment_batch(x: torch.Tensor, aug: StepAugment, generator: torch.Generator) -> torch.Tensor:
    """Differentiable crop-resize + optional flip + roll of x [N,C,H,W]."""
    top, left, h, w = sample_crop(x.shape[-2], x.shape[-1], aug.crop_scale, generator)
    out = x[:, :, top:top + h, left:left + w]
    if (h, w) != (aug.image_size, aug.image_size):
        out = F.interpolate(out, size=(aug.image_size, aug.image_size), mode="bilinear",
                            align_corners=False)
    if aug.flip and bool(torch.rand(1, generator=generator) < 0.5):
        out = out.flip(-1)
    if aug.jitter > 0:
        shifts = torch.randint(-aug.jitter, aug.jitter + 1, (2,), generator=generator).tolist()
        out = torch.roll(out, shifts=shifts, dims=(-2, -1))
    return out
