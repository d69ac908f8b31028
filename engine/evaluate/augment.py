"""Student-side augmentation: per-image random resized crop + flip, then CutMix per batch.

Parameters are drawn with numpy from a generator keyed by (seed, epoch, step), so the online and
stored relabel modes see exactly the same crops, and stored parameters replay bit-for-bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torchvision.ops import roi_align

from engine.training.crops import CROP_UNIFORMS, crop_boxes


@dataclass
class AugParams:
    boxes: np.ndarray
    """int16 [B, 4]: top, left, height, width of each image's crop."""
    flips: np.ndarray
    """bool [B]."""
    cutmix_partner: Optional[np.ndarray] = None
    """int64 [B]: which image of the batch is pasted into each; None: no CutMix this batch."""
    cutmix_box: Optional[tuple[int, int, int, int]] = None
    """top, bottom, left, right of the pasted region."""
    cutmix_lam: float = 1.0
    """Fraction of each image that stays its own (after clipping the box)."""


def step_rng(seed: int, epoch: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, step])


def sample_params(rng: np.random.Generator, batch: int, size: int, crop_scale: tuple[float, float],
                  flip: bool, cutmix_prob: float, cutmix_alpha: float) -> AugParams:
    boxes = crop_boxes(rng.random((batch, CROP_UNIFORMS)), size, crop_scale)
    flips = (rng.random(batch) < 0.5) if flip else np.zeros(batch, dtype=bool)
    params = AugParams(boxes=boxes, flips=flips)
    if batch > 1 and rng.random() < cutmix_prob:
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


def apply_params(x: torch.Tensor, params: AugParams) -> torch.Tensor:
    """Crop-resize every image to the input size (bilinear), flip, then paste the CutMix box."""
    n, _, height, width = x.shape
    boxes = torch.from_numpy(params.boxes.astype(np.float32)).to(x.device)
    rois = torch.stack([torch.arange(n, dtype=torch.float32, device=x.device), boxes[:, 1], boxes[:, 0],
                        boxes[:, 1] + boxes[:, 3], boxes[:, 0] + boxes[:, 2]], dim=1)
    out = roi_align(x, rois, output_size=(height, width), spatial_scale=1.0, sampling_ratio=1, aligned=True)
    flips = torch.from_numpy(params.flips).to(x.device).view(-1, 1, 1, 1)
    out = torch.where(flips, out.flip(-1), out)
    if params.cutmix_partner is not None:
        top, bottom, left, right = params.cutmix_box
        partner = torch.from_numpy(params.cutmix_partner).to(x.device)
        out[:, :, top:bottom, left:right] = out[partner, :, top:bottom, left:right]
    return out
