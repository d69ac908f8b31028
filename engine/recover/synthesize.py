"""Optimize one batch of synthetic images against a frozen teacher (CE + weighted BN matching)."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from engine.recover.augment import augment_batch
from engine.recover.settings import StepAugment
from engine.training.schedule import cosine_lr, set_lr


# Labelled ranges of each step for torch.profiler (engine.bench.measure sums them into its
# breakdown). A label never syncs the device, and costs nothing measurable without a profiler.
STEP_RANGE = "recover/step"
AUGMENT_RANGE = "recover/augment"
FORWARD_RANGE = "recover/teacher_forward"
BN_LOSS_RANGE = "recover/bn_loss"
BACKWARD_RANGE = "recover/backward"
OPTIMIZER_RANGE = "recover/optimizer"


def _label(name: str):
    """``record_function(name)`` while a profiler runs, else a no-op (~0.4 us against ~6 us per label)."""
    return record_function(name) if torch.autograd._profiler_enabled() else nullcontext()


@dataclass(frozen=True)
class Objective:
    r_bn: float
    first_bn_multiplier: float
    iterations: int
    lr: float
    log_every: int = 10


@dataclass
class BatchResult:
    images: torch.Tensor
    """Final iterate, normalized space, clipped to the valid pixel range, on CPU."""
    log: list[dict] = field(default_factory=list)
    first_ratio: float = float("nan")
    """r_bn * BN loss / CE at the first step: tells when r_bn is off by orders of magnitude."""


def weighted_bn_loss(layer_losses: list[torch.Tensor], first_multiplier: float) -> torch.Tensor:
    total = layer_losses[0] * first_multiplier
    for loss in layer_losses[1:]:
        total = total + loss
    return total


def synthesize_batch(teacher: nn.Module, bn_modules: list, init: torch.Tensor, labels: torch.Tensor,
                     objective: Objective, aug: StepAugment, bounds: tuple[torch.Tensor, torch.Tensor],
                     generator: torch.Generator, channels_last: bool = False,
                     on_step=None) -> BatchResult:
    """Adam(0.5, 0.9) on the pixels with cosine lr; pixels clipped to ``bounds`` after each step.

    ``bn_modules`` are the teacher's FusedBNMatching layers (forward order); each records its
    matching loss during the teacher's forward, so no hook copies any activation. Each step and
    its phases run inside the labelled ranges above (``STEP_RANGE`` ...), which is what
    ``scdd stage=bench`` profiles.
    """
    device = init.device
    low, high = (b.to(device) for b in bounds)
    x = init.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=objective.lr, betas=(0.5, 0.9))
    result = BatchResult(images=init)
    steps = objective.iterations
    for step in range(steps):
        with _label(STEP_RANGE):
            lr = cosine_lr(step, steps, objective.lr)
            set_lr(optimizer, lr)
            with _label(AUGMENT_RANGE):
                inputs = augment_batch(x, aug, generator)
                if channels_last:
                    inputs = inputs.contiguous(memory_format=torch.channels_last)
            with _label(FORWARD_RANGE):
                logits = teacher(inputs)
            ce = F.cross_entropy(logits, labels)
            with _label(BN_LOSS_RANGE):
                layer_losses = [m.last_loss for m in bn_modules]
                bn = weighted_bn_loss(layer_losses, objective.first_bn_multiplier)
                loss = ce + objective.r_bn * bn
            with _label(BACKWARD_RANGE):
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            with _label(OPTIMIZER_RANGE):
                optimizer.step()
                with torch.no_grad():
                    x.copy_(torch.maximum(torch.minimum(x, high), low))
            if step == 0:
                result.first_ratio = float(objective.r_bn * bn.detach() / ce.detach().clamp_min(1e-12))
            if step % objective.log_every == 0 or step == steps - 1:
                row = {"step": step, "lr": lr, "ce": float(ce.detach()), "bn": float(bn.detach()),
                       "acc": float((logits.detach().argmax(1) == labels).float().mean())}
                row.update({f"bn{i}": float(v.detach()) for i, v in enumerate(layer_losses)})
                result.log.append(row)
                if on_step is not None:
                    on_step(row)
    result.images = x.detach().cpu()
    return result
