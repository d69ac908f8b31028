"""Starting images: Gaussian noise (the paper), each class's own real training images (random, confident,
k-center or herding picks), or RDED-style best-scoring crops of them, optionally stitched."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.data import DataBundle
from engine.errors import ConfigError
from engine.training.crops import CROP_UNIFORMS, crop_boxes


def noise_init(num: int, channels: int, size: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(num, channels, size, size, generator=generator)


def indices_by_class(labels: list[int], num_classes: int) -> list[np.ndarray]:
    labels_arr = np.asarray(labels)
    return [np.flatnonzero(labels_arr == c) for c in range(num_classes)]


def kcenter(features: torch.Tensor, k: int, first: int = 0) -> list[int]:
    """Greedy k-center: start at ``first``, then repeatedly the point farthest from those chosen."""
    chosen = [first]
    dist = torch.cdist(features, features[first:first + 1]).squeeze(1)
    while len(chosen) < min(k, len(features)):
        dist[chosen] = -1.0  # already chosen (ties among duplicates never re-pick one)
        nxt = int(dist.argmax())
        chosen.append(nxt)
        dist = torch.minimum(dist, torch.cdist(features, features[nxt:nxt + 1]).squeeze(1))
    return chosen


def herding(features: torch.Tensor, k: int) -> list[int]:
    """Herding (Welling 2009, iCaRL's exemplars): each pick brings the mean of those chosen closest to
    the mean of all, without repeats."""
    mean = features.mean(0)
    total = torch.zeros_like(mean)
    chosen: list[int] = []
    for t in range(min(k, len(features))):
        gap = (mean - (total + features) / (t + 1)).norm(dim=1)
        gap[chosen] = float("inf")
        pick = int(gap.argmin())
        chosen.append(pick)
        total = total + features[pick]
    return chosen


def _teacher_pass(teacher: nn.Module, images: torch.Tensor, bundle: DataBundle, c: int, device: torch.device,
                  batch_size: int, want_features: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The teacher's probability of class ``c`` for each image (0..1 pixels), and its penultimate
    features (L2-normalized) when asked."""
    probs, feats = [], []
    for start in range(0, len(images), batch_size):
        x = bundle.normalize(images[start:start + batch_size]).to(device)
        if want_features:
            f = teacher.features(x)
            logits = teacher.fc(f)
            feats.append(F.normalize(f.float(), dim=1).cpu())
        else:
            logits = teacher(x)
        probs.append(logits.float().softmax(1)[:, c].cpu())
    return torch.cat(probs), (torch.cat(feats) if want_features else None)


def _class_name(bundle: DataBundle, c: int) -> str:
    return bundle.class_names[c] if bundle.class_names else str(c)


def _candidates(idx: np.ndarray, need: int, pool: int, rng: np.random.Generator, too_few: str) -> np.ndarray:
    """``max(pool, need)`` seeded candidates of one class's indices; ``too_few`` (one line) when it has fewer
    than ``need``."""
    if len(idx) < need:
        raise ConfigError(too_few)
    return idx[rng.permutation(len(idx))[: max(pool, need)]]


@torch.no_grad()
def select_real_images(teacher: nn.Module, bundle: DataBundle, ipc: int, select: str, pool: int,
                       seed: int, device: torch.device, batch_size: int = 256) -> list[list[int]]:
    """Per class, ``ipc`` training-set indices: seeded random ones, the teacher's most confident, or a
    diverse cover of the pool in the teacher's penultimate features (kcenter | herding).

    Only ``max(pool, ipc)`` seeded candidates per class are scored, so this stays one cheap pass
    even on ImageNet. The selection is the same in every process.
    """
    if select in ("kcenter", "herding") and not hasattr(teacher, "features"):
        raise ConfigError(f"recover.real_init_select={select} needs a teacher with penultimate features "
                          f"(a ClassifierNet); use confident or random")
    per_class = indices_by_class(bundle.labels("train"), bundle.num_classes)
    rng = np.random.default_rng(seed)
    chosen: list[list[int]] = []
    for c, idx in enumerate(per_class):
        candidates = _candidates(idx, ipc, pool, rng, f"class {_class_name(bundle, c)} has only {len(idx)} "
                                 f"training images but ipc={ipc} with recover.init=real; lower ipc or use "
                                 f"recover.init=noise")
        if select == "random":
            chosen.append([int(i) for i in candidates[:ipc]])
            continue
        images = torch.stack([bundle.train[int(i)][0] for i in candidates])
        probs, feats = _teacher_pass(teacher, images, bundle, c, device, batch_size, select != "confident")
        if select == "confident":
            order = probs.argsort(descending=True, stable=True)[:ipc].tolist()
        elif select == "kcenter":
            order = kcenter(feats, ipc, first=int(probs.argmax()))
        else:
            order = herding(feats, ipc)
        chosen.append([int(candidates[int(i)]) for i in order])
    return chosen


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def stitch(patches: torch.Tensor, k: int, size: int) -> torch.Tensor:
    """k*k images [k*k, C, H, W] tiled row by row into one [C, size, size] image."""
    tile = max(1, size // k)
    small = _resize(patches, tile)
    rows = [torch.cat(list(small[r * k:(r + 1) * k]), dim=-1) for r in range(k)]
    return _resize(torch.cat(rows, dim=-2)[None], size)[0]


@torch.no_grad()
def rded_starts(teacher: nn.Module, bundle: DataBundle, ipc: int, pool: int, crops: int, patches: int,
                scale: tuple[float, float], seed: int, device: torch.device,
                batch_size: int = 256) -> list[torch.Tensor]:
    """RDED-style starts (Sun et al. 2024, "On the diversity and realism of distilled dataset"): per
    class, ``crops`` seeded random resized crops (``scale``) of each of ``max(pool, ipc * patches**2)``
    candidate images, each scored by the teacher's probability of the class; every candidate keeps its
    best crop, the ``ipc * patches**2`` best candidates are kept, and each start image stitches
    ``patches`` x ``patches`` of them (in score order). Returns per class [ipc, C, H, W] 0..1 pixels."""
    per_class = indices_by_class(bundle.labels("train"), bundle.num_classes)
    need = ipc * patches * patches
    rng = np.random.default_rng(seed)
    size = bundle.image_size
    starts = []
    for c, idx in enumerate(per_class):
        candidates = _candidates(idx, need, pool, rng, f"class {_class_name(bundle, c)} has only {len(idx)} "
                                 f"training images but recover.rded_patches={patches} needs ipc * rded_patches^2 "
                                 f"= {need} of them; lower rded_patches or ipc")
        images = torch.stack([bundle.train[int(i)][0] for i in candidates])
        boxes = crop_boxes(rng.random((len(candidates) * crops, CROP_UNIFORMS)), size, scale)
        views = torch.stack([_resize(images[j // crops][None, :, t:t + h, l:l + w], size)[0]
                             for j, (t, l, h, w) in enumerate(boxes.tolist())])
        probs, _ = _teacher_pass(teacher, views, bundle, c, device, batch_size, False)
        best_prob, best_crop = probs.view(len(candidates), crops).max(1)
        order = best_prob.argsort(descending=True, stable=True)[:need]
        kept = views.view(len(candidates), crops, *views.shape[1:])[order, best_crop[order]]
        if patches == 1:
            starts.append(kept)
        else:
            starts.append(torch.stack([stitch(kept[i * patches ** 2:(i + 1) * patches ** 2], patches, size)
                                       for i in range(ipc)]))
    return starts


def real_init(bundle: DataBundle, chosen: list, classes: tuple[int, ...],
              ipc_indices: tuple[int, ...]) -> torch.Tensor:
    """The batch's start images, normalized: ``chosen[c]`` holds class c's training-set indices, or its
    start images themselves (0..1 pixels; rded_starts)."""
    images = torch.stack([chosen[c][i] if isinstance(chosen[c], torch.Tensor) else bundle.train[chosen[c][i]][0]
                          for c, i in zip(classes, ipc_indices)])
    return bundle.normalize(images)
