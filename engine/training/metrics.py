"""Top-1 / top-5 accuracy on a real split: the one measure teachers, probes and students report."""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from engine.training.batches import batches_of, load_batches, to_unit_float


CPU_EVAL_BATCH = 32
"""Test batches on the CPU: one thread forwarded 1,000 MNIST images through the default ConvNet in 370 ms
at batch 32-50 against 600 ms at 500 (CIFAR-size ConvNet 490 vs 820, ResNet-18 7.5 vs 9.5 s): a small
batch's activations stay in the core's cache. Eval-mode outputs do not depend on the batch beyond rounding."""


def eval_batch_size(device: torch.device) -> int:
    """Images per test batch: 500 on an accelerator (fewer launches), CPU_EVAL_BATCH on the CPU."""
    return CPU_EVAL_BATCH if torch.device(device).type == "cpu" else 500


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, dataset: Dataset, normalize: Callable, device: torch.device,
                      batch_size: Optional[int] = None, workers: int = 0, loader=None) -> tuple[float, Optional[float]]:
    """Top-1 (and top-5 when there are more than 10 classes, else None) as fractions, eval mode.

    ``batch_size``: None takes ``eval_batch_size(device)``. ``loader``: an engine.loaders BatchLoader of the
    whole split (eval transform, normalized batches, loader=ffcv|dali) read instead of ``dataset``.
    """
    batch_size = batch_size or eval_batch_size(device)
    model.eval()
    correct1 = correct5 = total = 0
    has_top5 = None
    if loader is None:
        batches = ((normalize(to_unit_float(images.to(device))), labels) for images, labels in
                   load_batches(dataset, batches_of(np.arange(len(dataset)), batch_size), workers))
    else:
        batches = ((images.to(device), labels) for images, labels in loader)
    for images, labels in batches:
        logits = model(images)
        labels = labels.to(device)
        if has_top5 is None:
            has_top5 = logits.shape[1] > 10
        correct1 += int((logits.argmax(1) == labels).sum())
        if has_top5:
            top5 = logits.topk(5, dim=1).indices
            correct5 += int((top5 == labels[:, None]).any(1).sum())
        total += len(labels)
    return correct1 / total, (correct5 / total if has_top5 else None)
