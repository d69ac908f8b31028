"""Timed steps of each stage's inner loop, and a torch.profiler breakdown of the recover loop.

Every timing runs ``warmup`` untimed steps, then ``steps`` timed ones between device syncs, on a
randomly initialised network: throughput does not depend on the weights. Each loop is the stage's
own step built from the stage's public functions (recover: ``synthesize_batch``; pretraining: the
``ssl=`` method's ``loss`` + SGD; evaluation: online soft labels + AdamW), minus data loading
(engine/loaders/bench.py measures loaders).
"""
from __future__ import annotations

import bisect
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from engine.evaluate.augment import apply_params, sample_params, step_rng
from engine.evaluate.losses import soft_label_kl
from engine.evaluate.student import StudentRecipe
from engine.bench.peer import peer_recover
from engine.recover.settings import StepAugment
from engine.recover.synthesize import (AUGMENT_RANGE, BACKWARD_RANGE, BN_LOSS_RANGE, FORWARD_RANGE,
                                       OPTIMIZER_RANGE, STEP_RANGE, Objective, synthesize_batch)
from engine.squeeze.augment import AugmentSpec
from engine.squeeze.augment import augment_batch as ssl_augment
from engine.squeeze.ssl import TrainSettings, method_spec
from engine.bench.device_stats import device_name, peak_memory, reset_peak, sync
from engine.training.precision import to_device_all
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

def _recover_setup(model: nn.Module, aug: StepAugment, batch: int, num_classes: int, device: torch.device):
    """The frozen model on ``device``, a fixed init batch, its labels and the pixel bounds."""
    model = model.to(device).eval().requires_grad_(False)
    channels = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    size = aug.image_size
    generator = torch.Generator().manual_seed(0)
    init = torch.randn(batch, channels, size, size, generator=generator).to(device)
    labels = torch.arange(batch, device=device) % num_classes
    bounds = (torch.full((1, channels, 1, 1), -2.5), torch.full((1, channels, 1, 1), 2.5))
    return model, init, labels, bounds


def _objective(objective: Objective, iterations: int) -> Objective:
    """``objective`` run for ``iterations`` steps, logging only the first and last."""
    return Objective(r_bn=objective.r_bn, first_bn_multiplier=objective.first_bn_multiplier,
                     iterations=iterations, lr=objective.lr, log_every=max(iterations, 1))


def time_recover(model: nn.Module, variant: str, *, num_classes: int, batch: int, aug: StepAugment,
                 objective: Objective, steps: int, warmup: int, device: torch.device,
                 channels_last: bool, backend: str, model_name: str, source: str) -> Rate:
    """Image-iterations/s of the engine's ``synthesize_batch`` or the peer loop (``variant`` engine|peer).

    Fixed init, seeded augmentation, a warm-up run first; on the given, already built model, so the
    configured width/depth are the ones timed (engine.bench.recover_cli builds one by name).
    """
    model, init, labels, bounds = _recover_setup(model, aug, batch, num_classes, device)

    def run(iterations: int) -> None:
        if iterations == 0:
            return
        obj = _objective(objective, iterations)
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
    return Rate(stage="recover", variant=name, model=model_name, image_size=aug.image_size, batch=batch, steps=steps,
                seconds=seconds, rate=batch * steps / seconds, unit="image-iterations/s",
                device=device_name(device), peak_memory_mb=peak, memory_kind=kind, source=source)


PHASES = ("augmentation", "teacher_forward", "bn_statistics", "backward", "optimizer", "other")
BN_RANGE = "recover/bn_statistics"
"""Label the bench puts around each FusedBNMatching call (statistics + norms + the eval-BN output)."""
PHASE_RANGES = {AUGMENT_RANGE: "augmentation", FORWARD_RANGE: "teacher_forward", BN_RANGE: "bn_statistics",
                BN_LOSS_RANGE: "bn_statistics", BACKWARD_RANGE: "backward", OPTIMIZER_RANGE: "optimizer",
                STEP_RANGE: "other"}
"""synthesize_batch's labelled ranges (and the bench's BN label) -> phase; time in a range that no
inner labelled range covers is that range's own, so the step's own time (CE, lr, logging) is ``other``."""


def recover_breakdown(model: nn.Module, *, num_classes: int, batch: int, aug: StepAugment,
                      objective: Objective, steps: int, device: torch.device, channels_last: bool,
                      backend: str, trace_path: Optional[Path] = None) -> dict:
    """Fractions of a recover step's time per phase: ``steps`` steps of the real ``synthesize_batch``.

    One warm-up step runs first, outside the profile. synthesize_batch labels each step and its
    phases with ``record_function``; the bench labels each FusedBNMatching call too (a forward
    pre-hook and hook open and close ``recover/bn_statistics``, no device sync), which splits the
    BN-statistics time out of the teacher forward. Its closed-form backward runs inside ``backward``.
    On CPU a phase's time is the CPU time of its ranges; on CUDA it is the device time of the kernels
    launched inside them (see ``phase_times``).
    """
    model, init, labels, bounds = _recover_setup(model, aug, batch, num_classes, device)
    net = model.to(memory_format=torch.channels_last) if channels_last else model

    def run(iterations: int) -> None:
        synthesize_batch(net, modules, init, labels, _objective(objective, iterations), aug, bounds,
                         torch.Generator().manual_seed(0), channels_last=channels_last)

    with fused_bn_matching(net, backend=backend) as modules, _labelled(modules, BN_RANGE):
        prof = profiled(run, warmup=1, steps=steps, device=device)
    model.to(memory_format=torch.contiguous_format)
    result = phase_times(prof.events(), on_device=device.type == "cuda")
    result.update(steps=steps, batch=batch, step_ms=result.pop("step_us") / steps / 1000.0,
                  wall_step_ms=result.pop("wall_step_us") / steps / 1000.0, trace=None)
    if trace_path is not None:
        prof.export_chrome_trace(str(trace_path))
        result["trace"] = str(trace_path)
    return result


def profiled(run: Callable[[int], None], *, warmup: int, steps: int, device: torch.device) -> profile:
    """``run(warmup)`` unprofiled, then ``run(steps)`` under torch.profiler (CPU, plus CUDA on a GPU), each
    ended by a device sync; returns the profiler (its ``events()``)."""
    # Kineto logs a device-count error on CPU-only machines; it is noise for these reports.
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    run(warmup)
    sync(device)
    with profile(activities=activities) as prof:
        run(steps)
        sync(device)
    return prof


@contextmanager
def _labelled(modules: list[nn.Module], name: str) -> Iterator[None]:
    """Every forward call of ``modules`` runs inside a ``record_function(name)`` range."""
    open_ranges: dict[int, list] = {}

    def enter(module, _inputs):
        label = record_function(name)
        label.__enter__()
        open_ranges.setdefault(id(module), []).append(label)

    def leave(module, _inputs, _output):
        open_ranges[id(module)].pop().__exit__(None, None, None)

    handles = [h for m in modules for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def phase_times(events, *, on_device: bool) -> dict:
    """Sum profiled events into PHASES: fractions, the basis, step time and the top operators.

    ``events``: ``prof.events()`` (FunctionEvents). Ranges are the CPU-side events named in
    PHASE_RANGES (on CUDA each label also has a GPU-side copy, which is skipped); they nest, and
    each moment or kernel counts for the innermost range open then.

    * CPU (``on_device`` False): each range's own wall time (not covered by a labelled range inside it).
    * CUDA: the device time of every kernel, counted for the innermost range open when the operator
      that launched it started. Autograd runs CUDA backward ops on a thread of its own, which is why
      this goes by time rather than by parent: their kernels still land in ``backward``. Kernel time
      is busy device time, without the idle gaps between kernels; the GPU-side copies of
      ``record_function`` ranges, which the profiler links to their ranges like kernels, are left
      out. If the profile holds no kernel time (no CUPTI), the CPU times are used instead.

    Returns ``fractions`` (PHASES, summing to 1), ``basis``, ``step_us`` (summed over the steps),
    ``wall_step_us`` (the step ranges' summed wall time) and ``top_ops`` (self time inside the steps).
    """
    events = list(events)
    ranges = [e for e in events if e.name in PHASE_RANGES and e.device_type == DeviceType.CPU]
    segments = _segments(ranges)
    starts = [start for start, _, _ in segments]

    def innermost(t: float):
        i = bisect.bisect_right(starts, t) - 1
        return segments[i][2] if i >= 0 and t <= segments[i][1] else None

    own: dict[str, float] = dict.fromkeys(PHASES, 0.0)
    ops: dict[str, list] = {}
    if on_device:
        # A record_function range's GPU-side copy is linked to it like a kernel; it is not device work.
        annotations = {e.name for e in events if getattr(e, "is_user_annotation", False)}
        for event in events:
            kernels = getattr(event, "kernels", None)
            inner = innermost(event.time_range.start) if kernels and event.device_type == DeviceType.CPU else None
            for kernel in kernels if inner is not None else ():
                if kernel.name not in annotations:
                    own[PHASE_RANGES[inner.name]] += kernel.duration
                    _add_op(ops, kernel.name, kernel.duration)
    basis = "cuda kernel time" if sum(own.values()) > 0 else "cpu time"
    if basis == "cpu time":
        for start, end, r in segments:
            own[PHASE_RANGES[r.name]] += end - start
        for event in events:
            if (event.device_type == DeviceType.CPU and event.name not in PHASE_RANGES
                    and not getattr(event, "is_user_annotation", False)
                    and innermost(event.time_range.start) is not None):
                _add_op(ops, event.name, event.self_cpu_time_total)
    total = sum(own.values())
    return {
        "fractions": {k: own[k] / (total or 1.0) for k in PHASES},
        "basis": basis,
        "step_us": total,
        "wall_step_us": sum(r.time_range.elapsed_us() for r in ranges if r.name == STEP_RANGE),
        "top_ops": [{"op": name, "self_ms": us / 1000.0, "calls": calls}
                    for name, (us, calls) in sorted(ops.items(), key=lambda kv: -kv[1][0])[:8]],
    }


def _segments(ranges: list) -> list[tuple[float, float, object]]:
    """The time line cut into (start, end, innermost range open) pieces, in order; gaps left out.

    ``ranges`` must nest (one thread's ``record_function`` ranges do)."""
    pieces: list[tuple[float, float, object]] = []
    stack: list = []
    cursor = 0.0

    def close_until(t: float) -> None:
        nonlocal cursor
        while stack and stack[-1].time_range.end <= t:
            top = stack.pop()
            pieces.append((cursor, top.time_range.end, top))
            cursor = top.time_range.end

    for r in sorted(ranges, key=lambda r: (r.time_range.start, -r.time_range.end)):
        close_until(r.time_range.start)
        if stack:
            pieces.append((cursor, r.time_range.start, stack[-1]))
        stack.append(r)
        cursor = r.time_range.start
    close_until(float("inf"))
    return [piece for piece in pieces if piece[1] > piece[0]]


def _add_op(ops: dict[str, list], name: str, us: float) -> None:
    entry = ops.setdefault(name, [0.0, 0])
    entry[0] += us
    entry[1] += 1


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
        views = [view() for _ in range(method.num_views)]
        loss = method.loss(views, labels, to_device_all(method.draw(len(labels), generator), device))
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
