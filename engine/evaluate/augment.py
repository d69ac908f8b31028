"""Student-side augmentation: per-image crop (random resized, or CIFAR's pad-and-crop) + flip, then
one mixing per batch (CutMix or MixUp; the teacher labels the mixed batch).

Parameters are drawn with numpy from a generator keyed by (seed, epoch, step), so the online and
stored relabel modes see exactly the same crops, and stored parameters replay bit-for-bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from engine.training.crops import CROP_UNIFORMS, crop_boxes
from engine.training.precision import to_device_all


@dataclass
class AugParams:
    boxes: np.ndarray
    """int16 [B, 4]: top, left, height, width of each image's crop (in the padded image when ``pad``)."""
    flips: np.ndarray
    """bool [B]."""
    cutmix_partner: Optional[np.ndarray] = None
    """int64 [B]: which image of the batch is pasted into each; None: no CutMix this batch."""
    cutmix_box: Optional[tuple[int, int, int, int]] = None
    """top, bottom, left, right of the pasted region."""
    cutmix_lam: float = 1.0
    """Fraction of each image that stays its own (after clipping the box)."""
    pad: int = 0
    """Pad-and-crop (CIFAR's RandomCrop(size, padding=pad)): each image is padded by this many black pixels
    per side and ``boxes`` holds an unscaled size x size window of it; 0: boxes are resized crops."""
    mixup_partner: Optional[np.ndarray] = None
    """int64 [B]: MixUp partner of each image; None: no MixUp this batch."""
    mixup_lam: float = 1.0
    """MixUp weight of each image itself: lam * x + (1 - lam) * x[partner]."""

    @property
    def partner(self) -> Optional[np.ndarray]:
        """The image each one is mixed with (CutMix or MixUp), for mixed hard labels."""
        return self.cutmix_partner if self.cutmix_partner is not None else self.mixup_partner

    @property
    def lam(self) -> float:
        return self.cutmix_lam if self.cutmix_partner is not None else self.mixup_lam


def step_rng(seed: int, epoch: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, step])


def sample_params(rng: np.random.Generator, batch: int, size: int, crop_scale: tuple[float, float],
                  flip: bool, cutmix_prob: float, cutmix_alpha: float, *, crop: str = "rrc", pad: int = 4,
                  mix: str = "cutmix", mixup_alpha: float = 0.8) -> AugParams:
    """One batch's parameters. ``crop``: rrc (random resized crop with ``crop_scale``) | pad (RandomCrop of
    ``size`` after ``pad`` pixels of padding); ``mix``: cutmix (with ``cutmix_prob``) | mixup (every batch,
    lam ~ Beta(mixup_alpha, mixup_alpha)) | none. The defaults draw today's rrc + CutMix stream unchanged."""
    if crop == "pad":
        corner = rng.integers(0, 2 * pad + 1, size=(batch, 2))
        boxes = np.concatenate([corner, np.full((batch, 2), size)], axis=1).astype(np.int16)
    else:
        boxes = crop_boxes(rng.random((batch, CROP_UNIFORMS)), size, crop_scale)
    flips = (rng.random(batch) < 0.5) if flip else np.zeros(batch, dtype=bool)
    params = AugParams(boxes=boxes, flips=flips, pad=pad if crop == "pad" else 0)
    if mix == "mixup":
        if batch > 1:
            params.mixup_lam = float(rng.beta(mixup_alpha, mixup_alpha))
            params.mixup_partner = rng.permutation(batch)
        return params
    if mix == "cutmix" and batch > 1 and rng.random() < cutmix_prob:
        lam = rng.beta(cutmix_alpha, cutmix_alpha)
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(size * cut), int(size * cut)
        cy, cx = int(rng.integers(size)), int(rng.integers(size))
        top, bottom = max(cy - ch // 2, 0), min(cy + ch // 2, size)
        left, right = max(cx - cw // 2, 0), min(cx + cw // 2, size)
        params.cutmix_partner = rng.permutation(batch)
        params.cutmix_box = (top, bottom, left, right)
        params.cutmix_lam = 1.0 - (bottom - top) * (right - left) / (size * size)
    return params


def mix_kind(params: AugParams) -> str:
    """Which mixing ``params`` drew: cutmix | mixup | none."""
    return "cutmix" if params.cutmix_partner is not None else "mixup" if params.mixup_partner is not None else "none"


PARTNER = 5
"""Column of the mixing partner in ``param_tensors``' int64 tensor."""


def param_tensors(params: AugParams) -> tuple[torch.Tensor, torch.Tensor]:
    """``params`` as two host tensors of fixed shapes, moved to the device with the batch in one copy:
    int64 [B, 6] (crop box top, left, height, width; flip; mixing partner) and float32 [6] (the CutMix
    region top, bottom, left, right; lam; 1 - lam, both rounded once from float64).

    An unmixed batch has every image as its own partner, an empty region and lam 1, so the same device
    operations apply it exactly (a copy of itself pasted nowhere, 1 x + 0 x): a step's operations never
    depend on what was drawn, which is what lets a CUDA graph replay one captured step for every batch."""
    batch = len(params.boxes)
    partner = params.partner if params.partner is not None else np.arange(batch)
    ints = np.concatenate([params.boxes.astype(np.int64), params.flips.astype(np.int64)[:, None],
                           partner.astype(np.int64)[:, None]], axis=1)
    region = params.cutmix_box if params.cutmix_partner is not None else (0, 0, 0, 0)
    floats = np.array([*region, params.lam, 1.0 - params.lam], dtype=np.float64).astype(np.float32)
    return torch.from_numpy(ints), torch.from_numpy(floats)


def apply_params(x: torch.Tensor, params: AugParams, fill: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Crop every image to the input size (resized bilinearly, or a window of the padded image), flip,
    then paste the CutMix box or blend the MixUp partner.

    ``fill``: [1, C, 1, 1] value of a black pixel in x's space (x is normalized: normalize(0)) for the
    pad-and-crop border, as torchvision pads before normalizing; None pads with 0."""
    moved = tuple(to_device_all(param_tensors(params), x.device))
    return apply_moved(x, moved, mix_kind(params), params.pad, fill)


def apply_moved(x: torch.Tensor, moved: tuple[torch.Tensor, torch.Tensor], mix: str, pad: int,
                fill: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``apply_params`` from ``param_tensors`` on x's device, with the mixing kind (cutmix | mixup | none) and the
    padding given: no host value of the batch's draw decides any operation."""
    ints, floats = moved
    n, _, height, width = x.shape
    if pad:
        out = _pad_crop(x, ints[:, :2], pad, fill)
    else:
        boxes = ints[:, :4].float()  # int16 pixel counts: exact in float32
        rois = torch.stack([torch.arange(n, dtype=torch.float32, device=x.device), boxes[:, 1], boxes[:, 0],
                            boxes[:, 1] + boxes[:, 3], boxes[:, 0] + boxes[:, 2]], dim=1)
        out = roi_align(x, rois, output_size=(height, width), spatial_scale=1.0, sampling_ratio=1, aligned=True)
    flips = (ints[:, 4] != 0).view(-1, 1, 1, 1)
    out = torch.where(flips, out.flip(-1), out)
    partner = ints[:, PARTNER]
    if mix == "cutmix":
        rows = torch.arange(height, device=x.device)
        cols = torch.arange(width, device=x.device)
        inside = (((rows >= floats[0]) & (rows < floats[1])).view(height, 1)
                  & ((cols >= floats[2]) & (cols < floats[3])).view(1, width))
        out = torch.where(inside, out[partner], out)
    elif mix == "mixup":
        out = floats[4] * out + floats[5] * out[partner]
    return out


def _pad_crop(x: torch.Tensor, corner: torch.Tensor, pad: int, fill: Optional[torch.Tensor]) -> torch.Tensor:
    """Each image's [top:top+h, left:left+w] window of x padded by ``pad`` per side (one gather); ``corner``:
    int64 [n, 2] (top, left) on x's device."""
    n, channels, height, width = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    if fill is not None:
        border = F.pad(torch.zeros(1, 1, height, width, dtype=torch.bool, device=x.device), (pad,) * 4, value=True)
        padded = torch.where(border, fill.to(x).reshape(1, channels, 1, 1), padded)
    rows = (corner[:, 0, None] + torch.arange(height, device=x.device)).view(n, 1, height, 1)
    cols = (corner[:, 1, None] + torch.arange(width, device=x.device)).view(n, 1, 1, width)
    flat = padded.flatten(2)  # [n, C, (H + 2p) * (W + 2p)]
    index = (rows * (width + 2 * pad) + cols).expand(n, channels, height, width).flatten(2)
    return flat.gather(2, index).view(n, channels, height, width)
