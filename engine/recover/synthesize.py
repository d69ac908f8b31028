"""Optimize batches of synthetic images against a frozen teacher (CE + weighted BN matching).

``synthesize_groups`` runs G independent class-batches ("groups", recover.groups_per_step) through
the teacher in one forward: BN statistics, the matching loss, cross-entropy's mean and the logged
rows are per group, and the optimized loss is the sum of the groups' losses, so each group's
gradient is its own sequential run's. Adam and the clip are elementwise and the lr schedule is
shared, so one optimizer over the stacked pixels is the G optimizers of a sequential run; each
group draws its augmentation from its own generator. Group g's images therefore equal batch g's
run alone up to floating-point rounding (the teacher's convolutions see a bigger batch).

The step never reads a device value back: the log rows stay on the device until the end (or until a
log step when an ``on_step`` callback wants them).
"""
from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from engine.recover import augment as augment_ops
from engine.recover.augment import augment_batch
from engine.recover.settings import StepAugment
from engine.training.graphs import GRAPH_WARMUP_STEPS, require_cuda_graphs
from engine.training.precision import autocast
from engine.training.schedule import cosine_lr, set_lr
from kernels import set_groups


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


PRECISIONS = ("fp32", "bf16")


def weighted_bn_loss(layer_losses: list[torch.Tensor], first_multiplier: float) -> torch.Tensor:
    total = layer_losses[0] * first_multiplier
    for loss in layer_losses[1:]:
        total = total + loss
    return total


def augment_step(x: torch.Tensor, aug: StepAugment, generators: list[torch.Generator]) -> torch.Tensor:
    """This step's augmentation of x [G*B, C, H, W]: group g (its B consecutive images) with
    ``generators[g]``'s draws, exactly what batch g alone would draw (to ~1e-6: ``augment_groups``
    resizes by matrix products where ``augment_batch`` interpolates). The one place the eager step augments."""
    if len(generators) == 1:  # today's path, bit for bit (the oracle tests compare it with the scripts)
        return augment_batch(x, aug, generators[0])
    # G groups: one static-shape op (two batched matrix products) instead of G crops and resizes
    return augment_ops.augment_groups(x, augment_ops.sample_group_params(generators, aug, x.shape[-1], x.device))


def require_cuda_graphs_possible(device: torch.device) -> None:
    require_cuda_graphs(device, "recover.cuda_graphs")


class _GroupStep:
    """One optimization step of G stacked groups, written so it can be captured by a CUDA graph:
    no host reads, the lr a device tensor when captured, the clip in place."""

    def __init__(self, teacher, bn_modules, x, targets, groups, objective, bounds, channels_last, precision,
                 optimizer):
        self.teacher, self.bn_modules, self.x, self.targets = teacher, bn_modules, x, targets
        self.groups, self.objective, self.channels_last = groups, objective, channels_last
        self.low, self.high = bounds
        self.precision, self.optimizer = precision, optimizer

    def __call__(self, inputs: torch.Tensor, want_stats: bool) -> torch.Tensor | None:
        """Teacher, losses, backward, Adam and clip on this step's augmented ``inputs``; returns
        [G, 3 + layers] (ce, bn, acc, each layer's loss) when ``want_stats``, on the device."""
        g, obj = self.groups, self.objective
        if self.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with _label(FORWARD_RANGE), autocast(self.precision, self.x.device):
            logits = self.teacher(inputs)
        logits = logits.float()
        ce = F.cross_entropy(logits, self.targets, reduction="none").view(g, -1).mean(1)
        with _label(BN_LOSS_RANGE):
            layer_losses = [m.last_loss.reshape(g) for m in self.bn_modules]
            bn = weighted_bn_loss(layer_losses, obj.first_bn_multiplier)
            # the groups' losses summed: each group's gradient is its own run's
            loss = (ce + obj.r_bn * bn).sum()
        with _label(BACKWARD_RANGE):
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with _label(OPTIMIZER_RANGE):
            self.optimizer.step()
            with torch.no_grad():
                self.x.clamp_(min=self.low, max=self.high)
        if not want_stats:
            return None
        with torch.no_grad():
            acc = (logits.argmax(1) == self.targets).float().view(g, -1).mean(1)
            return torch.stack([ce.detach(), bn.detach(), acc, *(v.detach() for v in layer_losses)], dim=1)


def synthesize_groups(teacher: nn.Module, bn_modules: list, inits: list[torch.Tensor], labels: list[torch.Tensor],
                      objective: Objective, aug: StepAugment, bounds: tuple[torch.Tensor, torch.Tensor],
                      generators: list[torch.Generator], channels_last: bool = False, precision: str = "fp32",
                      cuda_graphs: bool = False, on_step=None) -> list[BatchResult]:
    """Optimize G class-batches (``inits[g]`` with ``labels[g]`` and ``generators[g]``, all of one shape)
    together; returns one BatchResult per group, equal to ``synthesize_batch`` on that group alone up
    to floating-point rounding.

    Adam(0.5, 0.9) on the pixels with cosine lr; pixels clipped to ``bounds`` after each step.
    ``bn_modules`` are the teacher's FusedBNMatching layers (forward order); each records its
    matching loss (one per group) during the teacher's forward, so no hook copies any activation.
    Each step and its phases run inside the labelled ranges above (``STEP_RANGE`` ...), which is
    what ``scdd stage=bench`` profiles. ``precision``: fp32 | bf16 (teacher under bf16 autocast).
    ``cuda_graphs``: capture the whole step (static augmentation, teacher, losses, backward, Adam,
    clip) after a few eager steps and replay it (CUDA only). ``on_step(row)`` gets the groups' mean
    row at each log step (one device read per log step; without it the loop never reads back).
    """
    groups = len(inits)
    if groups < 1 or len(labels) != groups or len(generators) != groups:
        raise ValueError(f"synthesize_groups: {len(inits)} inits, {len(labels)} label sets, "
                         f"{len(generators)} generators; one of each per group")
    if len({tuple(t.shape) for t in inits}) != 1:
        raise ValueError(f"synthesize_groups: groups must have one shape, got {[tuple(t.shape) for t in inits]}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {PRECISIONS}")
    device = inits[0].device
    if cuda_graphs:
        require_cuda_graphs_possible(device)
    low, high = (b.to(device) for b in bounds)
    x = torch.cat(inits).requires_grad_(True)  # cat copies, even one tensor: the inits stay as they were
    targets = torch.cat([t.to(device) for t in labels])
    steps = objective.iterations
    # A tensor lr lets a captured Adam step read the scheduled value each replay.
    lr0 = torch.tensor(objective.lr, device=device) if cuda_graphs else objective.lr
    optimizer = torch.optim.Adam([x], lr=lr0, betas=(0.5, 0.9), capturable=cuda_graphs)
    step_fn = _GroupStep(teacher, bn_modules, x, targets, groups, objective, (low, high), channels_last,
                         precision, optimizer)
    logged: list[tuple[int, float, torch.Tensor]] = []

    def log_point(step: int) -> bool:
        return step % objective.log_every == 0 or step == steps - 1

    def record(step: int, lr: float, stats: torch.Tensor | None) -> None:
        if stats is None:
            return
        logged.append((step, lr, stats))
        if on_step is not None:
            on_step(_rows(step, lr, stats.mean(0, keepdim=True).cpu())[0])

    set_groups(bn_modules, groups)
    try:
        if cuda_graphs:
            _run_graphed(step_fn, aug, generators, steps, objective.lr, log_point, record)
        else:
            for step in range(steps):
                with _label(STEP_RANGE):
                    lr = cosine_lr(step, steps, objective.lr)
                    set_lr(optimizer, lr)
                    with _label(AUGMENT_RANGE):
                        inputs = augment_step(x, aug.at(step, steps), generators)
                    record(step, lr, step_fn(inputs, log_point(step)))
    finally:
        set_groups(bn_modules, 1)

    images = x.detach().cpu().chunk(groups)
    results = [BatchResult(images=images[g]) for g in range(groups)]
    if logged:
        table = torch.stack([stats for _, _, stats in logged]).cpu()  # the loop's one read-back: [rows, G, K]
        for g, result in enumerate(results):
            result.log = [_rows(step, lr, table[i, g:g + 1])[0] for i, (step, lr, _) in enumerate(logged)]
            first = result.log[0]
            result.first_ratio = float(objective.r_bn * first["bn"] / max(first["ce"], 1e-12))
    return results


def _rows(step: int, lr: float, stats: torch.Tensor) -> list[dict]:
    """Log rows from stats [G, 3 + layers] (CPU)."""
    rows = []
    for values in stats.tolist():
        row = {"step": step, "lr": lr, "ce": values[0], "bn": values[1], "acc": values[2]}
        row.update({f"bn{i}": v for i, v in enumerate(values[3:])})
        rows.append(row)
    return rows


def _run_graphed(step_fn: _GroupStep, aug: StepAugment, generators, steps: int, base_lr: float, log_point,
                 record) -> None:
    """The steps with the whole step captured once as a CUDA graph and replayed.

    The first GRAPH_WARMUP_STEPS steps run eagerly on a side stream (they are real steps; they also
    create Adam's state and warm the allocator); the capture itself computes nothing. Each replay
    first writes the step's lr and freshly drawn augmentation parameters into the graph's static
    inputs (host-to-device copies, no read-back)."""
    x, optimizer = step_fn.x, step_fn.optimizer
    size = x.shape[-1]
    lr_t = optimizer.param_groups[0]["lr"]

    def eager(step: int) -> torch.Tensor:
        lr = cosine_lr(step, steps, base_lr)
        lr_t.fill_(lr)
        params = augment_ops.sample_group_params(generators, aug.at(step, steps), size, x.device)
        stats = step_fn(augment_ops.augment_groups(x, params), True)
        record(step, lr, stats if log_point(step) else None)
        return params

    warm = min(GRAPH_WARMUP_STEPS, steps)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        params = None
        for step in range(warm):
            params = eager(step)
    torch.cuda.current_stream().wait_stream(side)
    if warm == steps:
        return
    static_params = dataclasses.replace(params, values=params.values.clone())
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_stats = step_fn(augment_ops.augment_groups(x, static_params), True)
    for step in range(warm, steps):
        with _label(STEP_RANGE):
            lr = cosine_lr(step, steps, base_lr)
            lr_t.fill_(lr)
            static_params.copy_(augment_ops.sample_group_params(generators, aug.at(step, steps), size, x.device))
            graph.replay()
            if log_point(step):
                record(step, lr, static_stats.clone())


def synthesize_batch(teacher: nn.Module, bn_modules: list, init: torch.Tensor, labels: torch.Tensor,
                     objective: Objective, aug: StepAugment, bounds: tuple[torch.Tensor, torch.Tensor],
                     generator: torch.Generator, channels_last: bool = False,
                     on_step=None, precision: str = "fp32", cuda_graphs: bool = False) -> BatchResult:
    """One class batch: ``synthesize_groups`` with a single group (see there)."""
    return synthesize_groups(teacher, bn_modules, [init], [labels], objective, aug, bounds, [generator],
                             channels_last=channels_last, precision=precision, cuda_graphs=cuda_graphs,
                             on_step=on_step)[0]
