"""Recover throughput by option: the peer loop, the floor, and this engine at G groups per step,
fp32/bf16 and CUDA graphs on/off, all on one shape (model, image size, B images per class-batch).

Rows (image-iterations/s = images x steps / s, after warm-up):

* ``peer``: the SRe2L-style hook loop (engine.bench.peer) on one batch of B, fp32;
* ``floor``: the teacher's forward + the input's backward alone (cross-entropy only: no BN loss, no
  augmentation, no optimizer) on the same images as the engine row (G x B), fp32 or bf16 autocast;
  no recover loop can be faster on this device;
* ``engine``: ``synthesize_batch`` with G class-batches per teacher forward (each with its own
  generator), ``precision`` and ``cuda_graphs`` (with graphs on, the steps' time is the difference
  of two runs of different lengths, so the per-batch capture is left out). CUDA graphs are CUDA only.

The best G of a list is reported per (precision, graphs); ratios are against the peer row. Each row
is the best of ``repeats`` interleaved rounds; ``spread`` is (fastest - slowest) / fastest over them.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from engine.bench.device_stats import device_name, peak_memory, reset_peak, sync
from engine.bench.measure import Rate, _objective, time_recover
from engine.recover.settings import StepAugment
from engine.recover import synthesize
from engine.recover.synthesize import Objective
from kernels import fused_bn_matching

PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class Variant:
    kind: str
    """peer | floor | engine."""
    groups: int = 1
    precision: str = "fp32"
    cuda_graphs: bool = False

    @property
    def label(self) -> str:
        if self.kind == "peer":
            return "peer (hooks, copies)"
        if self.kind == "floor":
            return f"floor G={self.groups} {self.precision}"
        return f"engine G={self.groups} {self.precision} graphs {'on' if self.cuda_graphs else 'off'}"


@dataclass
class Row:
    variant: Variant
    rate: Optional[Rate] = None
    """The best timing."""
    rates: list[float] = dataclasses.field(default_factory=list)
    """Every timing's image-iterations/s (their spread tells how noisy the machine was)."""
    note: str = ""
    """Why there is no rate (n/a, CUDA only, out of memory), or a mark (best G)."""

    def as_dict(self) -> dict:
        return {"variant": self.variant.label, **dataclasses.asdict(self.variant),
                "rate": self.rate.as_dict() if self.rate else None, "rates": self.rates, "note": self.note}

    @property
    def spread(self) -> float:
        """(fastest - slowest) / fastest over the timings; 0 for one."""
        return (max(self.rates) - min(self.rates)) / max(self.rates) if self.rates else 0.0


def unavailable(variant: Variant, device: torch.device) -> Optional[str]:
    """Why ``variant`` cannot run here (None: it can)."""
    if variant.cuda_graphs and device.type != "cuda":
        return "n/a (CUDA only)"
    return None


def engine_variants(groups: list[int], precisions: list[str], graphs: list[bool]) -> list[Variant]:
    return [Variant("engine", g, p, c) for p in precisions for c in graphs for g in groups]


def engine_runner(variant: Variant):
    """``run(net, bn_modules, init, labels, objective, aug, bounds, generators, channels_last)`` -> one
    BatchResult per group: ``synthesize_groups`` on G class-batches (``init``/``labels`` stacked group after
    group, one generator each) with ``variant``'s precision and CUDA graphs."""

    def run(net, bn_modules, init, labels, objective, aug, bounds, generators, channels_last):
        g = len(generators)
        return synthesize.synthesize_groups(net, bn_modules, list(init.chunk(g)), list(labels.chunk(g)), objective,
                                            aug, bounds, generators, channels_last=channels_last,
                                            precision=variant.precision, cuda_graphs=variant.cuda_graphs)

    return run


def time_engine(model: nn.Module, variant: Variant, *, num_classes: int, batch: int, aug: StepAugment,
                objective: Objective, steps: int, warmup: int, device: torch.device, channels_last: bool,
                backend: str, model_name: str, source: str) -> Rate:
    """Image-iterations/s of synthesize_batch with ``variant``'s groups, precision and graphs."""
    model = model.to(device).eval().requires_grad_(False)
    channels = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    size, groups = aug.image_size, variant.groups
    init = torch.randn(groups * batch, channels, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    labels = (torch.arange(batch, device=device) % num_classes).repeat(groups)
    bounds = (torch.full((1, channels, 1, 1), -2.5), torch.full((1, channels, 1, 1), 2.5))
    net = model.to(memory_format=torch.channels_last) if channels_last else model

    runner = engine_runner(variant)

    def run(iterations: int) -> None:
        if iterations == 0:
            return
        generators = [torch.Generator().manual_seed(g) for g in range(groups)]
        with fused_bn_matching(net, backend=backend) as modules:
            runner(net, modules, init, labels, _objective(objective, iterations), aug, bounds, generators,
                   channels_last)

    def timed(iterations: int) -> float:
        sync(device)
        start = time.perf_counter()
        run(iterations)
        sync(device)
        return time.perf_counter() - start

    run(warmup)
    reset_peak(device)
    if variant.cuda_graphs:
        # each call captures its graph anew after a few eager steps: a per-batch cost that 1000
        # iterations amortize. Both runs pay it (the shorter one replays too), so their difference
        # is ``steps`` replays.
        short = synthesize.GRAPH_WARMUP_STEPS + max(warmup, 1)
        seconds = timed(short + steps) - timed(short)
    else:
        seconds = timed(steps)
    model.to(memory_format=torch.contiguous_format)
    return _rate(variant, model_name, aug.image_size, groups * batch, steps, seconds, device, source)


def time_floor(model: nn.Module, variant: Variant, *, num_classes: int, batch: int, image_size: int, steps: int,
               warmup: int, device: torch.device, channels_last: bool, model_name: str, source: str) -> Rate:
    """Image-iterations/s of the teacher's forward + the input's backward on G x B images (CE only)."""
    model = model.to(device).eval().requires_grad_(False)
    channels = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    n = variant.groups * batch
    x = torch.randn(n, channels, image_size, image_size, generator=torch.Generator().manual_seed(0)).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    labels = (torch.arange(batch, device=device) % num_classes).repeat(variant.groups)
    bf16 = variant.precision == "bf16"

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        torch.autograd.grad(F.cross_entropy(logits.float(), labels), x)

    for _ in range(warmup):
        step()
    sync(device)
    reset_peak(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = time.perf_counter() - start
    model.to(memory_format=torch.contiguous_format)
    return _rate(variant, model_name, image_size, n, steps, seconds, device, source)


def _rate(variant: Variant, model_name: str, image_size: int, images: int, steps: int, seconds: float,
          device: torch.device, source: str) -> Rate:
    peak, kind = peak_memory(device)
    return Rate(stage="recover", variant=variant.label, model=model_name, image_size=image_size, batch=images,
                steps=steps, seconds=seconds, rate=images * steps / seconds, unit="image-iterations/s",
                device=device_name(device), peak_memory_mb=peak, memory_kind=kind, source=source)


def measure_variants(make_model, *, model_name: str, num_classes: int, batch: int, aug: StepAugment,
                     objective: Objective, steps: int, warmup: int, device: torch.device, backend: str = "auto",
                     channels_last: bool = True, groups: list[int] = (1,), precisions: list[str] = ("fp32",),
                     graphs: list[bool] = (False,), repeats: int = 1, source: str = "synthetic shapes",
                     floor: bool = True) -> list[Row]:
    """The peer row, then floor rows (each G, each precision), then engine rows; ``make_model()``
    builds a fresh teacher (same seed) for each timing. Best of ``repeats`` rounds per row."""
    groups = sorted(set(groups))
    rows = [Row(Variant("peer"))]
    if floor:
        rows += [Row(Variant("floor", g, p)) for p in precisions for g in groups]
    rows += [Row(v) for v in engine_variants(groups, list(precisions), list(graphs))]
    common = dict(num_classes=num_classes, batch=batch, steps=steps, warmup=warmup, device=device,
                  model_name=model_name, source=source)
    for row in rows:
        row.note = unavailable(row.variant, device) or ""
    # Interleaved best-of-N: on a shared machine the load drifts; each round times every row once.
    for _ in range(repeats):
        for row in rows:
            if row.note:
                continue
            try:
                rate = _time_one(make_model, row.variant, aug, objective, backend, channels_last, common)
            except torch.cuda.OutOfMemoryError:
                row.note, row.rate = "out of memory", None
                torch.cuda.empty_cache()
                continue
            row.rates.append(rate.rate)
            if row.rate is None or rate.rate > row.rate.rate:
                row.rate = rate
    _mark_best(rows)
    return rows


def _time_one(make_model, variant: Variant, aug, objective, backend, channels_last, common) -> Rate:
    if variant.kind == "peer":
        rate = time_recover(make_model(), "peer", aug=aug, objective=objective, channels_last=False,
                            backend=backend, **common)
        return dataclasses.replace(rate, variant=variant.label)
    if variant.kind == "floor":
        return time_floor(make_model(), variant, image_size=aug.image_size, channels_last=channels_last, **common)
    return time_engine(make_model(), variant, aug=aug, objective=objective, backend=backend,
                       channels_last=channels_last, **common)


def _mark_best(rows: list[Row]) -> None:
    """Mark the fastest G of each engine (precision, graphs) pair."""
    best: dict[tuple, Row] = {}
    for row in rows:
        if row.variant.kind == "engine" and row.rate is not None:
            key = (row.variant.precision, row.variant.cuda_graphs)
            if key not in best or row.rate.rate > best[key].rate.rate:
                best[key] = row
    for row in best.values():
        row.note = (row.note + " " if row.note else "") + "best G"


def best_engine(rows: list[Row]) -> Optional[Row]:
    measured = [r for r in rows if r.variant.kind == "engine" and r.rate is not None]
    return max(measured, key=lambda r: r.rate.rate) if measured else None


def render_rows(rows: list[Row], title: str) -> list[str]:
    peer = next((r.rate.rate for r in rows if r.variant.kind == "peer" and r.rate), None)
    lines = [title, f"  {'variant':<32}{'images':>7}{'img-it/s':>12}{'vs peer':>9}{'spread':>8}{'peak MB':>9}  note"]
    for row in rows:
        if row.rate is None:
            lines.append(f"  {row.variant.label:<32}{'':>7}{row.note:>12}")
            continue
        ratio = f"{row.rate.rate / peer:.2f}x" if peer else "-"
        lines.append(f"  {row.variant.label:<32}{row.rate.batch:>7}{row.rate.rate:>12.1f}{ratio:>9}"
                     f"{row.spread * 100:>7.0f}%{row.rate.peak_memory_mb:>9.0f}  {row.note}")
    return lines
