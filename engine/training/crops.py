"""Random-resized-crop parameters: one formula for the three augmenters (recover, student, SSL views).

The crop's area is a fraction of the image drawn from U(scale), its log aspect ratio from
U(log ratio), as torchvision's RandomResizedCrop. Callers pass the uniforms from their own
generator (torch or numpy), so each stage keeps its seeding and replay guarantees.
"""
from __future__ import annotations

import math

import numpy as np
import torch

DEFAULT_RATIO = (3 / 4, 4 / 3)


def crop_sides(area_u, ratio_u, scale: tuple[float, float], ratio: tuple[float, float] = DEFAULT_RATIO):
    """Uniforms in [0, 1) (arrays or tensors of one shape) -> (height, width) as fractions of the side.

    Either side can exceed 1; callers retry (torchvision) or clamp (batched SSL views).
    """
    exp = torch.exp if isinstance(ratio_u, torch.Tensor) else np.exp
    area = scale[0] + area_u * (scale[1] - scale[0])
    aspect = exp(math.log(ratio[0]) + ratio_u * (math.log(ratio[1]) - math.log(ratio[0])))
    return (area / aspect) ** 0.5, (area * aspect) ** 0.5


def crop_boxes(uniforms: np.ndarray, size: int, scale: tuple[float, float],
               ratio: tuple[float, float] = DEFAULT_RATIO) -> np.ndarray:
    """torchvision's rule, vectorized: int16 [B, 4] boxes (top, left, height, width) in a square image.

    ``uniforms`` is float [B, 22]: 10 tries of (area, ratio), then (top, left). The first try whose
    sides fit is taken; with none, the whole image.
    """
    uniforms = np.asarray(uniforms, dtype=np.float64)
    batch = len(uniforms)
    h_frac, w_frac = crop_sides(uniforms[:, 0:20:2], uniforms[:, 1:20:2], scale, ratio)
    h = np.rint(h_frac * size).astype(np.int64)
    w = np.rint(w_frac * size).astype(np.int64)
    ok = (w > 0) & (w <= size) & (h > 0) & (h <= size)
    first = np.where(ok.any(1), ok.argmax(1), -1)
    rows = np.arange(batch)
    hh = np.where(first >= 0, h[rows, np.maximum(first, 0)], size)
    ww = np.where(first >= 0, w[rows, np.maximum(first, 0)], size)
    top = np.floor(uniforms[:, 20] * (size - hh + 1)).astype(np.int64)
    left = np.floor(uniforms[:, 21] * (size - ww + 1)).astype(np.int64)
    return np.stack([top, left, hh, ww], axis=1).astype(np.int16)


CROP_UNIFORMS = 22
"""How many uniforms ``crop_boxes`` reads per image."""
