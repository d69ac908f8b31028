"""Starting images: Gaussian noise (the paper) or each class's own real training images."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from engine.data import DataBundle
from engine.errors import ConfigError


def noise_init(num: int, channels: int, size: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(num, channels, size, size, generator=generator)


def indices_by_class(labels: list[int], num_classes: int) -> list[np.ndarray]:
    labels_arr = np.asarray(labels)
    return [np.flatnonzero(labels_arr == c) for c in range(num_classes)]


@torch.no_grad()
def select_real_images(teacher: nn.Module, bundle: DataBundle, ipc: int, select: str, pool: int,
                       seed: int, device: torch.device, batch_size: int = 256) -> list[list[int]]:
    """Per class, ``ipc`` training-set indices: seeded random ones, or the teacher's most confident.

    Only ``max(pool, ipc)`` seeded candidates per class are scored, so this stays one cheap pass
    even on ImageNet. The selection is the same in every process.
    """
    per_class = indices_by_class(bundle.labels("train"), bundle.num_classes)
    rng = np.random.default_rng(seed)
    chosen: list[list[int]] = []
    for c, idx in enumerate(per_class):
        if len(idx) < ipc:
            raise ConfigError(f"class {bundle.class_names[c] if bundle.class_names else c} has only "
                              f"{len(idx)} training images but ipc={ipc} with recover.init=real; "
                              f"lower ipc or use recover.init=noise")
        candidates = idx[rng.permutation(len(idx))[: max(pool, ipc)]]
        if select == "random":
            chosen.append([int(i) for i in candidates[:ipc]])
            continue
        scores = []
        for start in range(0, len(candidates), batch_size):
            part = candidates[start:start + batch_size]
            images = torch.stack([bundle.train[int(i)][0] for i in part])
            logits = teacher(bundle.normalize(images).to(device))
            scores.append(logits.softmax(1)[:, c].cpu())
        order = torch.cat(scores).argsort(descending=True, stable=True)
        chosen.append([int(candidates[int(i)]) for i in order[:ipc]])
    return chosen


def real_init(bundle: DataBundle, chosen: list[list[int]], classes: tuple[int, ...],
              ipc_indices: tuple[int, ...]) -> torch.Tensor:
    images = torch.stack([bundle.train[chosen[c][i]][0] for c, i in zip(classes, ipc_indices)])
    return bundle.normalize(images)
