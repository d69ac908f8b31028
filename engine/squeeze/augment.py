"""Two-view SSL augmentation, batched on tensors so the CPU spends its time in the network.

Semantics (mirrored by the FFCV/DALI loaders; keep them in step):
  1. random resized crop: per image, area fraction ~ U(crop_scale), log aspect ratio ~
     U(log crop_ratio); a side longer than the image is clamped to the image (torchvision
     resamples up to 10 times instead; clamping keeps the batch one kernel call). The crop is
     resampled bilinearly to ``image_size`` (no antialiasing).
  2. horizontal flip with probability 0.5 when ``flip``.
  3. with probability ``jitter_prob``: brightness, contrast, saturation, hue in this fixed order
     (torchvision shuffles the order); factors ~ U(1 - 0.8 s, 1 + 0.8 s), hue shift ~ U(-0.2 s, 0.2 s)
     of a turn, s = ``jitter_strength`` (SimCLR's parametrization; s = 0.5 is MoCo v2's
     0.4/0.4/0.4/0.1). Saturation and hue act on RGB only. Pixels are clipped to [0, 1] after
     each step. Hue rotates chroma in YIQ space (a cheap, batched stand-in for HSV).
  4. grayscale (luma, ITU-R 601) with probability ``grayscale_prob``, RGB only.
  5. Gaussian blur with probability ``blur_prob``, sigma ~ U(blur_sigma), kernel side the odd
     number nearest 10% of the image side (SimCLR's choice), reflect padding.

FFCV/DALI decode steps 1-2 themselves (``LoaderSpec.from_augment``); ``augment_color`` then
applies steps 3-5 to their [0, 1] views.

All randomness comes from an explicit ``torch.Generator`` on the CPU, so a resumed run replays
the same views. A view's choices are drawn first (``draw_view_params``, one float32 [N, P] tensor) and
applied on the device after (``apply_view_params``), so a training step moves them with its batch in one
copy and never waits for the GPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from engine.errors import ConfigError
from engine.training.crops import crop_sides
from engine.training.precision import cached_on_device, to_device

_LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class AugmentSpec:
    """One view's augmentation; see the module docstring for the exact semantics."""

    image_size: int
    """Output side length (crops are resampled to it)."""
    crop_scale: tuple[float, float] = (0.2, 1.0)
    """Range of the crop's area as a fraction of the image; (1, 1) disables cropping."""
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    jitter_strength: float = 0.5
    """SimCLR's s: brightness/contrast/saturation 0.8 s, hue 0.2 s; 0 disables jitter."""
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    def __post_init__(self) -> None:
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"crop_scale={self.crop_scale} must satisfy 0 < low <= high <= 1")
        for name in ("jitter_prob", "grayscale_prob", "blur_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"augmentation {name}={getattr(self, name)} must be in [0, 1]")
        if self.jitter_strength < 0:
            raise ConfigError(f"jitter_strength={self.jitter_strength} must be >= 0")


def small_image_spec(image_size: int, flip: bool = True) -> AugmentSpec:
    """CIFAR/MNIST-sized images (<= 32 px): crop, flip, jitter, grayscale; no blur (it erases them)."""
    return AugmentSpec(image_size=image_size, crop_scale=(0.2, 1.0), flip=flip, jitter_strength=0.5,
                       jitter_prob=0.8, grayscale_prob=0.2, blur_prob=0.0)


def large_image_spec(image_size: int, flip: bool = True) -> AugmentSpec:
    """MoCo v2's ImageNet recipe: crop (0.2-1), flip, jitter 0.4/0.4/0.4/0.1 p 0.8, gray 0.2, blur 0.5."""
    return AugmentSpec(image_size=image_size, crop_scale=(0.2, 1.0), flip=flip, jitter_strength=0.5,
                       jitter_prob=0.8, grayscale_prob=0.2, blur_prob=0.5, blur_sigma=(0.1, 2.0))


def weak_image_spec(image_size: int, flip: bool = True) -> AugmentSpec:
    """Supervised training: mild crop + flip, no photometric changes."""
    return AugmentSpec(image_size=image_size, crop_scale=(0.5, 1.0), flip=flip, jitter_strength=0.0,
                       jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)


def probe_image_spec(image_size: int, flip: bool = True) -> AugmentSpec:
    """The linear probe's training views (MoCo's lincls): RandomResizedCrop (0.08-1) + flip, no color."""
    return AugmentSpec(image_size=image_size, crop_scale=(0.08, 1.0), flip=flip, jitter_strength=0.0,
                       jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)


SMALL_IMAGE_MAX = 32
"""Largest side that gets the small-image recipe."""

STRENGTHS = ("strong", "weak", "none")


def spec_for(strength: str, image_size: int, flip: bool,
             crop_scale: tuple[float, float] | None = None) -> AugmentSpec | None:
    """Pick the recipe for a strength name; None means no augmentation at all."""
    if strength not in STRENGTHS:
        raise ConfigError(f"augmentation strength {strength!r} is not one of {'|'.join(STRENGTHS)}")
    if strength == "none":
        return None
    if strength == "weak":
        spec = weak_image_spec(image_size, flip)
    elif image_size <= SMALL_IMAGE_MAX:
        spec = small_image_spec(image_size, flip)
    else:
        spec = large_image_spec(image_size, flip)
    return spec if crop_scale is None else replace(spec, crop_scale=tuple(crop_scale))


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator) * (high - low) + low


def _bernoulli(n: int, p: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator) < p


def _crop_flip_grid(n: int, spec: AugmentSpec, generator: torch.Generator) -> torch.Tensor:
    """Affine matrices [n, 2, 3] mapping output coords to input coords (normalized, [-1, 1])."""
    area_u = torch.rand(n, generator=generator)
    ratio_u = torch.rand(n, generator=generator)
    h, w = crop_sides(area_u, ratio_u, spec.crop_scale, spec.crop_ratio)
    h, w = h.clamp(max=1.0), w.clamp(max=1.0)  # fractions of the side
    cx = (torch.rand(n, generator=generator) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, generator=generator) * 2 - 1) * (1 - h)
    sign = torch.ones(n)
    if spec.flip:
        sign = torch.where(_bernoulli(n, 0.5, generator), -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = w * sign
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    return theta


@cached_on_device
def _constants(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(luma weights [1, 3, 1, 1], RGB->YIQ, YIQ->RGB) on ``device``: made once, not copied from the host (and
    inverted, a host read on CUDA) every step. The inverse is taken on ``device`` as before, so values match."""
    luma = torch.tensor(_LUMA, dtype=dtype, device=device).view(1, 3, 1, 1)
    to_yiq = torch.tensor(_TO_YIQ, dtype=dtype, device=device)
    return luma, to_yiq, torch.linalg.inv(to_yiq)


_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


def _luma(x: torch.Tensor) -> torch.Tensor:
    return (x * _constants(x.device, x.dtype)[0]).sum(dim=1, keepdim=True)


def _blur_size(height: int) -> int:
    return max(3, int(round(0.1 * height)) // 2 * 2 + 1)


def _columns(spec: AugmentSpec, channels: int, height: int, crop: bool) -> list[tuple[str, int]]:
    """(name, width) of each block of a view's drawn parameters, in drawing order."""
    columns = [("theta", 6)] if crop else []
    if spec.jitter_strength > 0 and spec.jitter_prob > 0:
        columns.append(("jitter", 4))  # brightness, contrast, saturation factors, hue shift
    if channels == 3 and spec.grayscale_prob > 0:
        columns.append(("gray", 1))
    if spec.blur_prob > 0:
        columns.append(("blur", _blur_size(height)))  # each image's normalized 1-d kernel
    return columns


def draw_view_params(n: int, channels: int, height: int, spec: AugmentSpec, generator: torch.Generator,
                     crop: bool = True) -> torch.Tensor:
    """Every random choice of one view of ``n`` images, drawn on the CPU: float32 [n, P].

    ``height``: the side the photometric steps see (``spec.image_size`` after a crop, else the views').
    ``crop``: include the crop/flip grid (``augment_batch``) or not (``augment_color``). The draws are those
    the steps made one by one before, in the same order, so a generator gives the same views; gathering
    them lets a step move them to the device in one copy (engine.training.precision.to_device_all)."""
    parts = []
    for name, _ in _columns(spec, channels, height, crop):
        if name == "theta":
            parts.append(_crop_flip_grid(n, spec, generator).view(n, 6))
        elif name == "jitter":
            parts.append(_jitter_params(n, spec, generator))
        elif name == "gray":
            parts.append(_bernoulli(n, spec.grayscale_prob, generator).float().view(n, 1))
        else:
            parts.append(_blur_kernels(n, height, spec, generator))
    return torch.cat(parts, dim=1) if parts else torch.zeros(n, 0)


def apply_view_params(x: torch.Tensor, params: torch.Tensor, spec: AugmentSpec, crop: bool = True) -> torch.Tensor:
    """One view of ``x`` ([N, C, H, W] uint8 or float in [0, 1]) made with ``draw_view_params``' ``params``
    (already on x's device). Returns float [N, C, S, S] in [0, 1]."""
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    n, channels = x.shape[:2]
    height = spec.image_size if crop else x.shape[2]
    blocks, at = {}, 0
    for name, width in _columns(spec, channels, height, crop):
        blocks[name], at = params[:, at:at + width], at + width
    if "theta" in blocks:
        theta = blocks["theta"].contiguous().view(n, 2, 3)
        grid = F.affine_grid(theta, [n, channels, spec.image_size, spec.image_size], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if "jitter" in blocks:
        x = _color_jitter(x, blocks["jitter"])
    if "gray" in blocks:
        x = torch.where(blocks["gray"].view(-1, 1, 1, 1) > 0.5, _luma(x).expand_as(x), x)
    if "blur" in blocks:
        x = _blur(x, blocks["blur"])
    return x


def _jitter_params(n: int, spec: AugmentSpec, generator: torch.Generator) -> torch.Tensor:
    """[n, 4]: brightness, contrast, saturation factors and hue shift (1, 1, 1, 0 where not jittered)."""
    s = spec.jitter_strength
    apply = _bernoulli(n, spec.jitter_prob, generator)

    def factor(spread: float) -> torch.Tensor:
        f = _uniform(n, max(0.0, 1 - spread), 1 + spread, generator)
        return torch.where(apply, f, torch.ones(n))

    brightness, contrast, saturation = factor(0.8 * s), factor(0.8 * s), factor(0.8 * s)
    hue = torch.where(apply, _uniform(n, -0.2 * s, 0.2 * s, generator), torch.zeros(n))
    return torch.stack([brightness, contrast, saturation, hue], dim=1)


def _color_jitter(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    n, channels = x.shape[:2]
    params = params.to(x.dtype)
    brightness, contrast, saturation = (params[:, i].view(n, 1, 1, 1) for i in range(3))
    hue = params[:, 3]
    x = (x * brightness).clamp_(0, 1)
    gray = _luma(x) if channels == 3 else x
    mean = gray.mean(dim=(1, 2, 3), keepdim=True)
    x = (mean + contrast * (x - mean)).clamp_(0, 1)
    if channels == 3:
        x = (_luma(x) + saturation * (x - _luma(x))).clamp_(0, 1)
        # Hue: rotate the (I, Q) chroma plane of YIQ by 2*pi*hue.
        _, to_yiq, to_rgb = _constants(x.device, x.dtype)
        angle = 2 * math.pi * hue
        cos, sin = angle.cos(), angle.sin()
        rot = torch.zeros(n, 3, 3, dtype=x.dtype, device=x.device)
        rot[:, 0, 0] = 1
        rot[:, 1, 1], rot[:, 1, 2] = cos, -sin
        rot[:, 2, 1], rot[:, 2, 2] = sin, cos
        mix = to_rgb @ rot @ to_yiq  # [n, 3, 3]
        x = torch.einsum("nij,njhw->nihw", mix, x).clamp_(0, 1)
    return x


def _blur_kernels(n: int, height: int, spec: AugmentSpec, generator: torch.Generator) -> torch.Tensor:
    """[n, size]: each image's normalized Gaussian kernel, or the identity where it is not blurred."""
    size = _blur_size(height)
    apply = _bernoulli(n, spec.blur_prob, generator)
    sigma = _uniform(n, *spec.blur_sigma, generator)
    offsets = torch.arange(size, dtype=torch.float32) - size // 2
    kernel = torch.exp(-offsets.view(1, -1) ** 2 / (2 * sigma.view(-1, 1) ** 2))
    identity = (offsets == 0).float().expand(n, -1)
    return torch.where(apply.view(-1, 1), kernel / kernel.sum(dim=1, keepdim=True), identity)


def _blur(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    n, channels, height, width = x.shape
    size = kernel.shape[1]
    kernel = kernel.to(x.dtype).repeat_interleave(channels, dim=0)  # [n*C, size]
    flat = x.reshape(1, n * channels, height, width)
    pad = size // 2
    flat = F.conv2d(F.pad(flat, (pad, pad, 0, 0), mode="reflect"), kernel.view(-1, 1, 1, size),
                    groups=n * channels)
    flat = F.conv2d(F.pad(flat, (0, 0, pad, pad), mode="reflect"), kernel.view(-1, 1, size, 1),
                    groups=n * channels)
    return flat.view(n, channels, height, width)


def augment_batch(images: torch.Tensor, spec: AugmentSpec, generator: torch.Generator) -> torch.Tensor:
    """One random view of each image.

    Args:
        images: [N, C, H, W], uint8 or float in [0, 1], on any device.
        spec: the recipe.
        generator: CPU generator that drives every random choice.
    Returns: float [N, C, spec.image_size, spec.image_size] in [0, 1] on the images' device.
    """
    params = draw_view_params(images.shape[0], images.shape[1], spec.image_size, spec, generator)
    return apply_view_params(images, to_device(params, images.device), spec)


def augment_color(views: torch.Tensor, spec: AugmentSpec, generator: torch.Generator) -> torch.Tensor:
    """Steps 3-5 (jitter, grayscale, blur) on already cropped and flipped views.

    For loaders that crop and flip while decoding (FFCV, DALI: ``LoaderSpec.from_augment(spec,
    normalize=False)``); ``augment_batch`` is the crop/flip grid followed by this function.

    Args:
        views: [N, C, H, W] float in [0, 1] (uint8 is scaled), on any device.
    Returns: float [N, C, H, W] in [0, 1] on the views' device.
    """
    n, channels, height = views.shape[:3]
    params = draw_view_params(n, channels, height, spec, generator, crop=False)
    return apply_view_params(views, to_device(params, views.device), spec, crop=False)
