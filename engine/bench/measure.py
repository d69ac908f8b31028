"""Timed steps of each stage's inner loop, and a torch.profiler breakdown of one recover step.

Every timing runs ``warmup`` untimed steps, then ``steps`` timed ones between device syncs, on a
randomly initialised network: throughput does not depend on the weights. Each loop is the stage's
own step built from the stage's public functions (recover: ``synthesize_batch``; pretraining: the
``ssl=`` method's ``loss`` + SGD; evaluation: online soft labels + AdamW), minus data loading
(engine/loaders/bench.py measures loaders).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.profiler import record_function

from engine.evaluate.augment import apply_params, sample_params, step_rng
from engine.evaluate.losses import soft_label_kl
from engine.evaluate.student import StudentRecipe
from engine.recover.augment import augment_batch as recover_augment
from engine.bench.peer import peer_recover
from engine.recover.settings import StepAugment
from engine.recover.synthesize import Objective, synthesize_batch, weighted_bn_loss
from engine.squeeze.augment import AugmentSpec
from engine.squeeze.augment import augment_batch as ssl_augment
from engine.squeeze.ssl import TrainSettings, method_spec
from engine.bench.device_stats import device_name, peak_memory, reset_peak, sync
from kernels import fused_bn_matching

Normalize = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Rate:
    """One timed measurement."""

    stage: str
    """pretrain | recover | evaluate."""
    variant: str
    model: str
    image_size: int
    batch: int
    steps: int
    seconds: float
    rate: float
    unit: str
    """images/s (pretrain, evaluate) or image-iterations/s (recover)."""
    device: str
    peak_memory_mb: float
    memory_kind: str
    """cuda max allocated (reset per measurement) | cpu max RSS (whole process so far)."""
    source: str
    """configured data | synthetic <target> shapes."""

    def as_dict(self) -> dict:
        return asdict(self)


def _timed(step: Callable[[int], None], steps: int, warmup: int, device: torch.device) -> float:
    for i in range(warmup):
        step(i)
    sync(device)
    reset_peak(device)
    start = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    sync(device)
    return time.perf_counter() - start


# ----------------------------------------------------------------------------------------- recover

def time_recover(model: nn.Module, variant: str, *, num_classes: int, batch: int, aug: StepAugment,
                 objective: Objective, steps: int, warmup: int, device: torch.device,
                 channels_last: bool, backend: str, model_name: str, source: str) -> Rate:
    """Image-iterations/s of the engine's ``synthesize_batch`` or the peer loop (``variant`` engine|peer).

    Fixed init, seeded augmentation, a warm-up run first; on the given, already built model, so the
    configured width/depth are the ones timed (engine.bench.recover_cli builds one by name).
    """
    model = model.to(device).eval().requires_grad_(False)
    channels = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    size = aug.image_size
    generator = torch.Generator().manual_seed(0)
    init = torch.randn(batch, channels, size, size, generator=generator).to(device)
    labels = torch.arange(batch, device=device) % num_classes
    bounds = (torch.full((1, channels, 1, 1), -2.5), torch.full((1, channels, 1, 1), 2.5))

    def run(iterations: int) -> None:
        if iterations == 0:
            return
        obj = Objective(r_bn=objective.r_bn, first_bn_multiplier=objective.first_bn_multiplier,
                        iterations=iterations, lr=objective.lr, log_every=max(iterations, 1))
        gen = torch.Generator().manual_seed(0)
        if variant == "peer":
            peer_recover(model, init, labels, obj, aug, bounds, gen)
            return
        net = model.to(memory_format=torch.channels_last) if channels_last else model
        with fused_bn_matching(net, backend=backend) as modules:
            synthesize_batch(net, modules, init, labels, obj, aug, bounds, gen, channels_last=channels_last)

    run(warmup)
    sync(device)
    reset_peak(device)
    start = time.perf_counter()
    run(steps)
    sync(device)
    seconds = time.perf_counter() - start
    model.to(memory_format=torch.contiguous_format)
    peak, kind = peak_memory(device)
    name = "peer (hooks, copies)" if variant == "peer" else f"engine{' channels_last' if channels_last else ''}"
    return Rate(stage="recover", variant=name, model=model_name, image_size=size, batch=batch, steps=steps,
                seconds=seconds, rate=batch * steps / seconds, unit="image-iterations/s",
                device=device_name(device), peak_memory_mb=peak, memory_kind=kind, source=source)


PHASES = ("augmentation", "teacher_forward", "bn_statistics", "backward", "optimizer", "other")


def recover_breakdown(model: nn.Module, *, num_classes: int, batch: int, aug: StepAugment,
                      objective: Objective, steps: int, device: torch.device, channels_last: bool,
                      backend: str, trace_path: Optional[Path] = None) -> dict:
    """Fractions of a recover step's time per phase, from torch.profiler ``record_function`` ranges.

    The loop is ``synthesize_batch``'s step with a label around each phase; each FusedBNMatching
    layer is labelled too, so the BN-statistics time (statistics + norms, fused with the eval-BN
    output on the torch backend) is split out of the teacher forward. The BN layers' closed-form
    backward runs inside ``backward``. On CUDA each range is closed by a device sync so its wall time
    holds its kernels; that costs a little speed, which is why throughput is timed separately.
    Fractions are of the summed step ranges; ``other`` (CE, lr update, profiler overhead) closes the sum to 1.
    """
    model = model.to(device).eval().requires_grad_(False)
    channels = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    size = aug.image_size
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=generator).to(device).requires_grad_(True)
    labels = torch.arange(batch, device=device) % num_classes
    low, high = torch.full((1, channels, 1, 1), -2.5, device=device), torch.full((1, channels, 1, 1), 2.5, device=device)
    optimizer = torch.optim.Adam([x], lr=objective.lr, betas=(0.5, 0.9))
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    net = model.to(memory_format=torch.channels_last) if channels_last else model
    open_ranges: dict[int, record_function] = {}

    def enter(module, _inputs):
        sync()
        open_ranges[id(module)] = record_function("bench/bn_statistics").__enter__()

    def leave(module, _inputs, _output):
        sync()
        open_ranges.pop(id(module)).__exit__(None, None, None)

    def phase(name: str):
        sync()
        return record_function(f"bench/{name}")

    def one_step(step: int, total: int) -> None:
        with record_function("bench/step"):
            lr = 0.5 * objective.lr * (1 + math.cos(math.pi * step / total))
            for group in optimizer.param_groups:
                group["lr"] = lr
            with phase("augmentation"):
                inputs = recover_augment(x, aug, generator)
                if channels_last:
                    inputs = inputs.contiguous(memory_format=torch.channels_last)
                sync()
            with phase("teacher_forward"):
                logits = net(inputs)
                sync()
            ce = F.cross_entropy(logits, labels)
            with phase("bn_loss_sum"):
                bn = weighted_bn_loss([m.last_loss for m in modules], objective.first_bn_multiplier)
                loss = ce + objective.r_bn * bn
                sync()
            with phase("backward"):
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                sync()
            with phase("optimizer"):
                optimizer.step()
                with torch.no_grad():
                    x.copy_(torch.maximum(torch.minimum(x, high), low))
                sync()

    # Kineto logs a device-count error on CPU-only machines; it is noise for this report.
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with fused_bn_matching(net, backend=backend) as modules:
        handles = [h for m in modules for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
        try:
            one_step(0, steps + 1)  # warm-up outside the profile
            with profile(activities=activities) as prof:
                for step in range(steps):
                    one_step(step + 1, steps + 1)
        finally:
            for h in handles:
                h.remove()
    model.to(memory_format=torch.contiguous_format)
    totals = {e.key: e.cpu_time_total for e in prof.key_averages()}  # microseconds, inclusive

    def t(name: str) -> float:
        return float(totals.get(f"bench/{name}", 0.0))

    step_us = t("step")
    seconds = {
        "augmentation": t("augmentation"),
        "teacher_forward": max(t("teacher_forward") - t("bn_statistics"), 0.0),
        "bn_statistics": t("bn_statistics") + t("bn_loss_sum"),
        "backward": t("backward"),
        "optimizer": t("optimizer"),
    }
    seconds["other"] = max(step_us - sum(seconds.values()), 0.0)
    denom = sum(seconds.values()) or 1.0
    result = {
        "steps": steps,
        "batch": batch,
        "step_ms": step_us / steps / 1000.0,
        "fractions": {k: seconds[k] / denom for k in PHASES},
        "top_ops": [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1000.0, "calls": e.count}
                    for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
                    if not e.key.startswith("bench/")][:8],
        "trace": None,
    }
    if trace_path is not None:
        prof.export_chrome_trace(str(trace_path))
        result["trace"] = str(trace_path)
    return result


# -------------------------------------------------------------------------------------- pretraining

def time_pretrain(model: nn.Module, settings: TrainSettings, images: torch.Tensor, labels: torch.Tensor,
                  spec: Optional[AugmentSpec], normalize: Normalize, *, steps: int, warmup: int,
                  device: torch.device, model_name: str, source: str) -> Rate:
    """Images/s of the ``ssl=`` method's training step (views + loss + SGD), as in squeeze.pretrain.train.

    ``images``: one batch [B,C,H,W] in [0,1] (or uint8), reused every step.
    """
    generator = torch.Generator().manual_seed(0)
    method = method_spec(settings.name).build(model, settings, generator)
    method.to(device=device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(method.trainable(), lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    images, labels = images.to(device), labels.to(device)

    def view() -> torch.Tensor:
        x = ssl_augment(images, spec, generator) if spec is not None else images.float()
        return normalize(x).contiguous(memory_format=torch.channels_last)

    def step(_i: int) -> None:
        loss = method.loss([view() for _ in range(method.num_views)], labels, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds = _timed(step, steps, warmup, device)
    peak, kind = peak_memory(device)
    batch = images.shape[0]
    return Rate(stage="pretrain", variant=settings.name, model=model_name, image_size=images.shape[-1],
                batch=batch, steps=steps, seconds=seconds, rate=batch * steps / seconds, unit="images/s",
                device=device_name(device), peak_memory_mb=peak, memory_kind=kind, source=source)


# --------------------------------------------------------------------------------------- evaluation

def time_evaluate(student: nn.Module, teacher: Optional[nn.Module], images: torch.Tensor, labels: torch.Tensor,
                  recipe: StudentRecipe, normalize: Normalize, *, steps: int, warmup: int,
                  device: torch.device, model_name: str, source: str) -> Rate:
    """Images/s of a student's training step as in evaluate.student.train_student.

    With ``recipe.loss == "kl"`` the teacher labels each augmented batch online (SC-DD), so the rate
    includes its forward. ``images``: one batch [B,C,H,W] in [0,1], reused every step.
    """
    student = student.to(device).train()
    if teacher is not None:
        teacher = teacher.to(device).eval()
    optimizer = torch.optim.AdamW(student.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    images, labels = images.to(device), labels.to(device)
    batch, size = images.shape[0], images.shape[-1]

    def step(i: int) -> None:
        params = sample_params(step_rng(0, 0, i), batch, size, recipe.crop_scale, recipe.flip,
                               recipe.cutmix_prob, recipe.cutmix_alpha)
        x = apply_params(normalize(images), params)
        logits = student(x)
        if recipe.loss == "kl" and teacher is not None:
            with torch.no_grad():
                target = teacher(x)
            loss = soft_label_kl(logits, target, recipe.temperature)
        else:
            loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds = _timed(step, steps, warmup, device)
    peak, kind = peak_memory(device)
    return Rate(stage="evaluate", variant=f"student {recipe.loss}{'+online teacher' if teacher is not None else ''}",
                model=model_name, image_size=size, batch=batch, steps=steps, seconds=seconds,
                rate=batch * steps / seconds, unit="images/s", device=device_name(device), peak_memory_mb=peak,
                memory_kind=kind, source=source)


def synthetic_batch(batch: int, channels: int, size: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images in [0,1] and labels with the given shapes (target-shape measurements)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, channels, size, size, generator=generator)
    labels = torch.as_tensor(np.arange(batch) % num_classes)
    return images, labels
