"""Recover throughput: this engine's step against a straightforward peer-style loop, same shapes.

    python -m engine.recover.bench --model resnet18_cifar --image-size 32 --batch 100

The peer loop is the one SRe2L-style scripts use: a forward hook per BN layer that copies its
input (permute + contiguous + view), eager mean/var, torch.norm, autograd. Both loops use the
same augmentation, optimizer and clipping, so the ratio isolates the BN-statistics path and the
memory format. Figures are image-iterations per second (images x steps / s) after warm-up.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from engine.models import ModelConfig, bn_layers, build_model
from engine.recover.augment import augment_batch
from engine.recover.settings import StepAugment
from engine.recover.synthesize import Objective, synthesize_batch
from engine.bench.device_stats import device_name, peak_memory, reset_peak, sync
from kernels import fused_bn_matching


@dataclass
class RecoverBenchRow:
    variant: str
    device: str
    model: str
    image_size: int
    batch: int
    steps: int
    seconds: float
    image_iterations_per_s: float
    peak_memory_mb: float


class _PeerBNHook:
    def __init__(self, module):
        self.handle = module.register_forward_hook(self.hook)
        self.loss = None

    def hook(self, module, inputs, _output):
        x = inputs[0]
        nch = x.shape[1]
        mean = x.mean([0, 2, 3])
        var = x.permute(1, 0, 2, 3).contiguous().view([nch, -1]).var(1, unbiased=False)
        self.loss = torch.norm(module.running_var.data - var, 2) + torch.norm(module.running_mean.data - mean, 2)


def peer_recover(model, init, labels, objective: Objective, aug: StepAugment, bounds, generator):
    """The peer-style loop (baseline only; the engine never uses it)."""
    hooks = [_PeerBNHook(m) for m in bn_layers(model)]
    low, high = (b.to(init.device) for b in bounds)
    x = init.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=objective.lr, betas=(0.5, 0.9))
    for step in range(objective.iterations):
        for group in optimizer.param_groups:
            group["lr"] = 0.5 * objective.lr * (1 + math.cos(math.pi * step / objective.iterations))
        out = model(augment_batch(x, aug, generator))
        ce = F.cross_entropy(out, labels)
        bn = objective.first_bn_multiplier * hooks[0].loss + sum(h.loss for h in hooks[1:])
        loss = ce + objective.r_bn * bn
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            x.copy_(torch.maximum(torch.minimum(x, high), low))
    for h in hooks:
        h.handle.remove()
    return x.detach()


def measure(variant: str, model_name: str, image_size: int, batch: int, steps: int, warmup: int,
            device: torch.device, channels: int = 3, num_classes: int = 100,
            channels_last: bool | None = None, backend: str = "auto") -> RecoverBenchRow:
    """Time ``steps`` recover iterations of one batch after ``warmup`` untimed ones."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=model_name), num_classes, channels, image_size).to(device).eval()
    model.requires_grad_(False)
    aug = StepAugment(image_size=image_size, crop_scale=(0.08, 1.0), flip=True,
                      jitter=4 if image_size <= 64 else 32)
    bounds = (torch.full((1, channels, 1, 1), -2.5), torch.full((1, channels, 1, 1), 2.5))
    init = torch.randn(batch, channels, image_size, image_size, device=device)
    labels = torch.arange(batch, device=device) % num_classes
    use_cl = (device.type == "cuda") if channels_last is None else channels_last

    def run(iterations: int):
        objective = Objective(r_bn=0.01, first_bn_multiplier=10.0, iterations=iterations, lr=0.25,
                              log_every=max(iterations, 1))
        gen = torch.Generator().manual_seed(0)
        if variant == "peer":
            return peer_recover(model, init, labels, objective, aug, bounds, gen)
        net = model.to(memory_format=torch.channels_last) if use_cl else model
        with fused_bn_matching(net, backend=backend) as modules:
            return synthesize_batch(net, modules, init, labels, objective, aug, bounds, gen,
                                    channels_last=use_cl).images

    run(warmup)
    reset_peak(device)
    sync(device)
    start = time.perf_counter()
    run(steps)
    sync(device)
    seconds = time.perf_counter() - start
    name = variant if variant == "peer" else f"engine{'+channels_last' if use_cl else ''}"
    return RecoverBenchRow(variant=name, device=str(device), model=model_name, image_size=image_size,
                           batch=batch, steps=steps, seconds=seconds,
                           image_iterations_per_s=batch * steps / seconds, peak_memory_mb=peak_memory(device)[0])


def main(argv: list[str] | None = None) -> list[RecoverBenchRow]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18_cifar")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="best of N timings per variant")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    variants = [("peer", None), ("engine", False)] + ([("engine", True)] if True else [])
    rows = []
    for variant, cl in variants:
        best = None
        for _ in range(args.repeats):  # interleaving would be fairer; best-of-N damps noise
            row = measure(variant, args.model, args.image_size, args.batch, args.steps, args.warmup,
                          device, channels_last=cl)
            best = row if best is None or row.seconds < best.seconds else best
        rows.append(best)
    peer = rows[0].image_iterations_per_s
    print(f"recover step, {args.model} {args.image_size}px batch {args.batch}, {args.steps} steps, "
          f"device {device_name(device)}")
    print(f"{'variant':<24}{'img-it/s':>12}{'s':>10}{'peak MB':>10}{'vs peer':>9}")
    for row in rows:
        print(f"{row.variant:<24}{row.image_iterations_per_s:>12.1f}{row.seconds:>10.2f}"
              f"{row.peak_memory_mb:>10.0f}{row.image_iterations_per_s / peer:>8.2f}x")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([asdict(r) for r in rows], handle, indent=2)
    return rows


if __name__ == "__main__":
    main()
