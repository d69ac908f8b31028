"""Top-1 / top-5 accuracy on a real split: the one measure teachers, probes and students report."""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from engine.training.batches import batches_of, load_batches, to_unit_float
from engine.training.precision import autocast, to_device_all


CPU_EVAL_BATCH = 32
"""Test batches on the CPU: one thread forwarded 1,000 MNIST images through the default ConvNet in 370 ms
at batch 32-50 against 600 ms at 500 (CIFAR-size ConvNet 490 vs 820, ResNet-18 7.5 vs 9.5 s): a small
batch's activations stay in the core's cache. Eval-mode outputs do not depend on the batch beyond rounding."""


def eval_batch_size(device: torch.device) -> int:
    """Images per test batch: 500 on an accelerator (fewer launches), CPU_EVAL_BATCH on the CPU."""
    return CPU_EVAL_BATCH if torch.device(device).type == "cpu" else 500


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, dataset: Dataset, normalize: Callable, device: torch.device,
                      batch_size: Optional[int] = None, workers: int = 0, loader=None, precision: str = "fp32",
                      channels_last: bool = False) -> tuple[float, Optional[float]]:
    """Top-1 (and top-5 when there are more than 10 classes, else None) as fractions, eval mode.

    ``batch_size``: None takes ``eval_batch_size(device)``. ``loader``: an engine.loaders BatchLoader of the
    whole split (eval transform, normalized batches, loader=ffcv|dali) read instead of ``dataset``.
    ``precision`` / ``channels_last``: the forward's autocast and input layout, the ones the model trains
    with (a student in NHWC would otherwise convert every NCHW test batch).
    Batches are moved without blocking and the counts stay on the device until the end: one host read per
    split, not one per batch (a read per batch keeps the host from queueing the next one, and a student's
    tests, repeated every few epochs, would leave the GPU waiting)."""
    batch_size = batch_size or eval_batch_size(device)
    model.eval()
    correct = torch.zeros(2, dtype=torch.int64, device=device)  # top-1, top-5
    total = 0
    has_top5 = None
    batches = loader if loader is not None else load_batches(
        dataset, batches_of(np.arange(len(dataset)), batch_size), workers)
    for images, labels in batches:
        images, labels = to_device_all([images, torch.as_tensor(labels)], device)  # one copy for both
        if loader is None:  # a loader's batches come normalized
            images = normalize(to_unit_float(images))
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(precision, device):
            logits = model(images)
        if has_top5 is None:
            has_top5 = logits.shape[1] > 10
        correct[0] += (logits.argmax(1) == labels).sum()
        if has_top5:
            correct[1] += (logits.topk(5, dim=1).indices == labels[:, None]).any(1).sum()
        total += len(labels)
    correct1, correct5 = correct.tolist()
    return correct1 / total, (correct5 / total if has_top5 else None)
