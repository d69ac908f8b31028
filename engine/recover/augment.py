"""Per-step augmentation of the whole synthetic batch: random resized crop, flip, roll.

One set of parameters per step for the whole batch (as SRe2L does), drawn from a CPU generator
so a batch's images are the same on any device and in any process.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.recover.settings import StepAugment
from engine.training.crops import CROP_UNIFORMS, crop_boxes


def augment_batch(x: torch.Tensor, aug: StepAugment, generator: torch.Generator) -> torch.Tensor:
    """Differentiable crop-resize + optional flip + roll of x [N,C,H,W]."""
    uniforms = torch.rand(1, CROP_UNIFORMS, generator=generator, dtype=torch.float64).numpy()
    top, left, h, w = crop_boxes(uniforms, x.shape[-1], aug.crop_scale)[0].tolist()
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
