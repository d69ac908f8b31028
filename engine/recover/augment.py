"""Per-step augmentation of the whole synthetic batch: random resized crop (optional), flip, roll.

One set of parameters per step for the whole batch (as SRe2L does), drawn from a CPU generator
so a batch's images are the same on any device and in any process.

The crop is resized bilinearly (``align_corners=False``, no antialias, as ``F.interpolate``). With
``torch.use_deterministic_algorithms(True)`` (``deterministic=true``) the resize is two matrix
products with the crop's interpolation matrices instead (``crop_resize_matmul``): PyTorch has no
deterministic CUDA backward for bilinear ``F.interpolate`` (it accumulates with atomics), while a
matrix product's backward is two more matrix products. Both give the same values to ~1e-6.

``augment_groups`` is the static-shape form for G independent class-batches in one tensor: each
group's crop, flip and roll come from its own generator (``sample_group_params`` draws exactly what
``augment_batch`` draws, in the same order), travel to the device as one small integer tensor, and
become per-group interpolation matrices built there. The flip reverses the column matrix's rows and
the roll rotates the rows of both matrices, so the whole augmentation is two batched matrix
products whose shapes never depend on the parameters: no host sync, no recompilation, capturable by
CUDA graphs, deterministic forward and backward on CUDA.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
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


# ------------------------------------------------------------------------ static-shape, per group

PARAM_COLUMNS = ("top", "left", "height", "width", "flip", "shift_h", "shift_w")
"""Columns of ``GroupParams.values``: the crop box (in input pixels), flip (0/1), the roll's shifts."""


@dataclass(frozen=True)
class GroupParams:
    """One step's augmentation of G groups: ``values`` int64 [G, 7] (``PARAM_COLUMNS``) on the device.

    The python fields are static (they fix the op's structure and output shape, never its values):
    a captured or compiled step keeps them and copies new ``values`` into its buffer (``copy_``).
    """

    values: torch.Tensor
    in_size: int
    """Side of the (square) input images."""
    out_size: int
    """Side of the output images (aug.image_size with a crop; in_size without)."""
    crop: bool
    roll: bool
    """False when jitter is 0: without a crop the row matrix is then the identity, and its product is skipped."""

    @property
    def groups(self) -> int:
        return self.values.shape[0]

    def copy_(self, other: "GroupParams") -> "GroupParams":
        """Copy ``other``'s values into this one's buffer (a CUDA graph's static input); same structure."""
        if (other.values.shape, other.in_size, other.out_size, other.crop, other.roll) != (
                self.values.shape, self.in_size, self.out_size, self.crop, self.roll):
            raise ValueError("GroupParams.copy_: the two parameter sets differ in groups, sizes or structure")
        self.values.copy_(other.values, non_blocking=True)
        return self


def sample_group_params(generators: list[torch.Generator], aug: StepAugment, image_size: int,
                        device: torch.device | str = "cpu") -> GroupParams:
    """Group g's crop box, flip and roll, drawn from ``generators[g]`` exactly as ``augment_batch``
    draws them (crop uniforms, then flip, then roll; the same calls), so group g's images equal a
    sequential run's. ``image_size``: the side of the input images. The generators are CPU ones; the
    parameters reach ``device`` as one pinned, non-blocking copy (no host sync on CUDA)."""
    rows = []
    for generator in generators:
        if aug.crop:
            uniforms = torch.rand(1, CROP_UNIFORMS, generator=generator, dtype=torch.float64).numpy()
            box = crop_boxes(uniforms, image_size, aug.crop_scale)[0].astype(np.int64).tolist()
        else:
            box = [0, 0, image_size, image_size]
        flip = int(aug.flip and bool(torch.rand(1, generator=generator) < 0.5))
        shifts = [0, 0]
        if aug.jitter > 0:
            low = 0 if aug.jitter_mode == "forward" else -aug.jitter
            shifts = torch.randint(low, aug.jitter + 1, (2,), generator=generator).tolist()
        rows.append(box + [flip] + shifts)
    values = torch.tensor(rows, dtype=torch.int64)
    device = torch.device(device)
    if device.type == "cuda":
        values = values.pin_memory().to(device, non_blocking=True)
    else:
        values = values.to(device)
    return GroupParams(values=values, in_size=image_size, out_size=aug.image_size if aug.crop else image_size,
                       crop=aug.crop, roll=aug.jitter > 0)


def _crop_weights(start: torch.Tensor, length: torch.Tensor, size: int, out_size: int) -> torch.Tensor:
    """float64 [G, out_size, size]: ``bilinear_matrix(start[g], length[g], size, out_size)`` for every
    g, computed on the parameters' device with the same arithmetic (the same values, bit for bit)."""
    device = start.device
    scale = (length.float() / out_size).double()[:, None]
    src = ((torch.arange(out_size, device=device, dtype=torch.float64) + 0.5) * scale - 0.5)
    src = src.float().clamp_min(0).double()
    last = (length - 1)[:, None]
    lo = torch.minimum(src.floor().long(), last)
    hi = torch.minimum(lo + 1, last)
    frac = src - lo.double()
    pos = torch.arange(size, device=device)
    first = (pos == (start[:, None] + lo)[..., None]).double()
    second = (pos == (start[:, None] + hi)[..., None]).double()
    return (1.0 - frac)[..., None] * first + frac[..., None] * second


def _source_rows(shift: torch.Tensor, flip: torch.Tensor | None, out_size: int) -> torch.Tensor:
    """int64 [G, out_size]: which row of the un-rolled (un-flipped) matrix each output row reads.

    torch.roll by s: out[i] = in[(i - s) mod n]; a flip: out[j] = in[n - 1 - j] (applied before the roll)."""
    i = torch.arange(out_size, device=shift.device)
    rows = torch.remainder(i - shift[:, None], out_size)
    if flip is not None:
        rows = torch.where(flip[:, None] != 0, out_size - 1 - rows, rows)
    return rows


def group_matrices(params: GroupParams, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The row and column matrices [G, out, in] of each group: ``out = rows @ x @ cols^T``."""
    v = params.values
    top, left, height, width, flip, shift_h, shift_w = v.unbind(1)
    n, size = params.out_size, params.in_size
    if params.crop:
        rows = _crop_weights(top, height, size, n)
        cols = _crop_weights(left, width, size, n)
        row_idx = _source_rows(shift_h, None, n)
        col_idx = _source_rows(shift_w, flip, n)
        rows = torch.gather(rows, 1, row_idx[..., None].expand(-1, -1, size))
        cols = torch.gather(cols, 1, col_idx[..., None].expand(-1, -1, size))
    else:  # permutations: each output pixel reads one input pixel, exactly
        pos = torch.arange(size, device=v.device)
        rows = (_source_rows(shift_h, None, n)[..., None] == pos).double()
        cols = (_source_rows(shift_w, flip, n)[..., None] == pos).double()
    return rows.to(dtype), cols.to(dtype)


def augment_groups(x: torch.Tensor, params: GroupParams) -> torch.Tensor:
    """Group g's crop-resize + flip + roll (``params``) on x [G, B, C, H, W] or [G*B, C, H, W] (groups
    contiguous), as two batched matrix products; same layout out, side ``params.out_size``.

    Equals ``augment_batch`` on each group (same parameters) to ~1e-6, forward and backward; exact
    without a crop (permutation matrices). The products run outside autocast: under a bf16 teacher
    the pixels keep fp32 (TF32 follows torch.backends.cuda.matmul.allow_tf32, off by default)."""
    groups, n, size = params.groups, params.out_size, params.in_size
    if x.shape[-1] != size or x.shape[-2] != size:
        raise ValueError(f"augment_groups: images are {tuple(x.shape[-2:])}, the parameters were drawn for "
                         f"{size}x{size}")
    grouped = x.dim() == 5
    if not grouped:
        if x.shape[0] % groups:
            raise ValueError(f"augment_groups: {x.shape[0]} images do not split into {groups} equal groups")
        x = x.reshape(groups, x.shape[0] // groups, *x.shape[1:])
    if x.shape[0] != groups:
        raise ValueError(f"augment_groups: {x.shape[0]} groups of images, {groups} of parameters")
    g, b, c = x.shape[:3]
    with torch.autocast(x.device.type, enabled=False):
        rows, cols = group_matrices(params, x.dtype)
        flat = x.reshape(g, b * c * size, size)
        out = torch.bmm(flat, cols.transpose(1, 2))  # [G, B*C*H, n]: columns first, one bmm, no copy
        out = out.reshape(g, b * c, size, n)
        if params.crop or params.roll:
            out = torch.matmul(rows[:, None], out)  # [G, B*C, n, n]
    out = out.reshape(g, b, c, n, n)
    return out if grouped else out.reshape(g * b, c, n, n)
