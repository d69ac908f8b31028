"""Recover throughput: this engine's step against a straightforward peer-style loop, same shapes.

    python -m engine.bench.recover_cli --model resnet18_cifar --image-size 32 --batch 100

The peer loop (engine.bench.peer) is the one SRe2L-style scripts use: a forward hook per BN layer
that copies its input (permute + contiguous + view), eager mean/var, torch.norm, autograd. Both
loops use the same augmentation, optimizer and clipping, so the ratio isolates the BN-statistics
path and the memory format. Figures are image-iterations per second (images x steps / s) after
warm-up; the timing itself is engine.bench.measure.time_recover, shared with `scdd stage=bench`.
"""
from __future__ import annotations

import argparse
import json

import torch

from engine.bench.device_stats import device_name
from engine.bench.measure import Rate, time_recover
from engine.models import ModelConfig, build_model
from engine.recover.settings import StepAugment
from engine.recover.synthesize import Objective


def measure(variant: str, model_name: str, image_size: int, batch: int, steps: int, warmup: int,
            device: torch.device, channels: int = 3, num_classes: int = 100,
            channels_last: bool = True, backend: str = "auto") -> Rate:
    """Time ``steps`` recover iterations of one batch of a fresh ``model_name`` after ``warmup``."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=model_name), num_classes, channels, image_size)
    aug = StepAugment(image_size=image_size, crop_scale=(0.08, 1.0), flip=True,
                      jitter=4 if image_size <= 64 else 32)
    objective = Objective(r_bn=0.01, first_bn_multiplier=10.0, iterations=steps, lr=0.25)
    return time_recover(model, variant, num_classes=num_classes, batch=batch, aug=aug, objective=objective,
                        steps=steps, warmup=warmup, device=device,
                        channels_last=channels_last and variant != "peer", backend=backend,
                        model_name=model_name, source="synthetic shapes")


def main(argv: list[str] | None = None) -> list[Rate]:
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
    rows = []
    for variant, channels_last in (("peer", False), ("engine", False), ("engine", True)):
        timings = [measure(variant, args.model, args.image_size, args.batch, args.steps, args.warmup, device,
                           channels_last=channels_last) for _ in range(args.repeats)]
        rows.append(min(timings, key=lambda row: row.seconds))  # best-of-N damps noise
    peer = rows[0].rate
    print(f"recover step, {args.model} {args.image_size}px batch {args.batch}, {args.steps} steps, "
          f"device {device_name(device)}")
    print(f"{'variant':<24}{'img-it/s':>12}{'s':>10}{'peak MB':>10}{'vs peer':>9}")
    for row in rows:
        print(f"{row.variant:<24}{row.rate:>12.1f}{row.seconds:>10.2f}{row.peak_memory_mb:>10.0f}"
              f"{row.rate / peer:>8.2f}x")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([row.as_dict() for row in rows], handle, indent=2)
    return rows


if __name__ == "__main__":
    main()
