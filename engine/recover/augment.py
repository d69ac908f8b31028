"""Per-step augmentation of the whole synthetic batch: random resized crop (optional), flip, roll.

One set of parameters per step for the whole batch (as SRe2L does), drawn from a CPU generator
so a batch's images are the same on any device and in any process.

The crop is resized bilinearly (``align_corners=False``, no antialias, as ``F.interpolate``). With
``torch.use_deterministic_algorithms(True)`` (``deterministic=true``) the resize is two matrix
products with the crop's interpolation matrices instead (``crop_resize_matmul``): PyTorch has no
deterministic CUDA backward for bilinear ``F.interpolate`` (it accumulates with atomics), while a
matrix product's backward is two more matrix products. Both give the same values to ~1e-6.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.recover.settings import StepAugment
from engine.training.crops import CROP_UNIFORMS, crop_boxes


def bilinear_matrix(start: int, length: int, size: int, out_size: int, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """[out_size, size] weights that resize ``[start, start + length)`` of an axis of ``size`` samples
    to ``out_size`` samples as ``F.interpolate(mode="bilinear", align_corners=False)`` does (no
    antialias: each output reads the 2 nearest inputs, for upsampling and downsampling alike)."""
    if not 0 <= start < start + length <= size or out_size < 1:
        raise ValueError(f"crop [{start}, {start + length}) is not inside an axis of {size}, or out_size "
                         f"{out_size} < 1")
    # PyTorch's area_pixel_compute_source_index in fp32: scale = length / out_size, then
    # src = scale * (i + 0.5) - 0.5 with one rounding (a fused multiply-add; the fp32 product is exact
    # in fp64), clamped at 0
    scale = (torch.tensor(float(length), dtype=torch.float32) / out_size).double()
    src = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * scale - 0.5).float().clamp_min(0).double()
    lo = src.floor().long().clamp_max(length - 1)
    hi = (lo + 1).clamp_max(length - 1)
    frac = src - lo.double()
    rows = torch.arange(out_size)
    weights = torch.zeros(out_size, size, dtype=torch.float64)
    weights.index_put_((rows, start + lo), 1.0 - frac, accumulate=True)
    weights.index_put_((rows, start + hi), frac, accumulate=True)
    return weights.to(device=device, dtype=dtype)


def crop_resize_matmul(x: torch.Tensor, top: int, left: int, height: int, width: int,
                       out_size: int) -> torch.Tensor:
    """Crop ``[top:top+height, left:left+width]`` of x [N, C, H, W] and resize it to out_size x
    out_size: ``Rh @ x @ Rw^T`` with [out, H] and [out, W] interpolation matrices (static shapes
    whatever the crop)."""
    rows = bilinear_matrix(top, height, x.shape[-2], out_size, x.dtype, x.device)
    cols = bilinear_matrix(left, width, x.shape[-1], out_size, x.dtype, x.device)
    return torch.matmul(torch.matmul(rows, x), cols.t())


def crop_resize(x: torch.Tensor, top: int, left: int, height: int, width: int, out_size: int) -> torch.Tensor:
    """The crop resized bilinearly: F.interpolate, or matrix products when deterministic algorithms
    are on (the same values to ~1e-6; see the module docstring)."""
    if (height, width) == (out_size, out_size):
        return x[:, :, top:top + height, left:left + width]
    if torch.are_deterministic_algorithms_enabled():
        return crop_resize_matmul(x, top, left, height, width, out_size)
    return F.interpolate(x[:, :, top:top + height, left:left + width], size=(out_size, out_size),
                         mode="bilinear", align_corners=False)


def augment_batch(x: torch.Tensor, aug: StepAugment, generator: torch.Generator) -> torch.Tensor:
    """Differentiable crop-resize (unless ``aug.crop`` is off) + optional flip + roll of x [N,C,H,W]."""
    out = x
    if aug.crop:
        uniforms = torch.rand(1, CROP_UNIFORMS, generator=generator, dtype=torch.float64).numpy()
        top, left, h, w = crop_boxes(uniforms, x.shape[-1], aug.crop_scale)[0].tolist()
        out = crop_resize(x, top, left, h, w, aug.image_size)
    if aug.flip and bool(torch.rand(1, generator=generator) < 0.5):
        out = out.flip(-1)
    if aug.jitter > 0:
        low = 0 if aug.jitter_mode == "forward" else -aug.jitter
        shifts = torch.randint(low, aug.jitter + 1, (2,), generator=generator).tolist()
        out = torch.roll(out, shifts=shifts, dims=(-2, -1))
    return out
