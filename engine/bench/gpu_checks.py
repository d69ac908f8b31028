"""bf16 against fp32 recover trajectories from the same start (issue 14's fidelity check).

    python -m engine.bench.gpu_checks --model resnet18 --image-size 224 --batch 100 --steps 50

Both runs start from the same images, draw the same augmentation (same generators) and use the
same teacher: a randomly initialised network whose BN running statistics were set by train-mode
forwards on smooth random images (a teacher with default running statistics, mean 0 and variance
1, would give BN losses no recover run ever sees). It prints, every ``--every`` steps, CE and BN
loss of both side by side with their relative differences, then the largest relative difference
and how far the final images differ (relative L2). Needs no Hydra (runs with torch alone).
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.io import save_json
from engine.bench.device_stats import device_name, resolve_device
from engine.bench.recover_cli import recipe
from engine.bench.recover_variants import Variant, engine_runner
from engine.models import ModelConfig, build_model
from engine.recover.synthesize import Objective
from kernels import fused_bn_matching


def calibrated_teacher(model_name: str, num_classes: int, image_size: int, device: torch.device,
                       batches: int = 4, batch: int = 32) -> nn.Module:
    """A random-weight teacher whose BN running statistics are those of smooth random images."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=model_name), num_classes, 3, image_size).to(device)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
    generator = torch.Generator().manual_seed(1)
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            coarse = torch.randn(batch, 3, max(image_size // 16, 2), max(image_size // 16, 2), generator=generator)
            images = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)
            model(images.to(device))
    return model.eval().requires_grad_(False)


def trajectory(teacher: nn.Module, precision: str, *, batch: int, image_size: int, num_classes: int,
               steps: int, every: int, device: torch.device, r_bn: float) -> tuple[list[dict], torch.Tensor]:
    """Loss log rows (every ``every`` steps) and the final images of one recover run."""
    variant = Variant("engine", 1, precision, False)
    aug = recipe(image_size)
    init = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)).to(device)
    labels = torch.arange(batch, device=device) % num_classes
    bounds = (torch.full((1, 3, 1, 1), -2.5), torch.full((1, 3, 1, 1), 2.5))
    objective = Objective(r_bn=r_bn, first_bn_multiplier=10.0, iterations=steps, lr=0.25, log_every=every)
    net = teacher.to(memory_format=torch.channels_last)
    with fused_bn_matching(net, backend="auto") as modules:
        (result,) = engine_runner(variant)(net, modules, init, labels, objective, aug, bounds,
                                           [torch.Generator().manual_seed(0)], True)
    return result.log, result.images


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--r-bn", type=float, default=0.01)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    teacher = calibrated_teacher(args.model, args.num_classes, args.image_size, device)
    common = dict(batch=args.batch, image_size=args.image_size, num_classes=args.num_classes, steps=args.steps,
                  every=args.every, device=device, r_bn=args.r_bn)
    fp32_log, fp32_images = trajectory(teacher, "fp32", **common)
    bf16_log, bf16_images = trajectory(teacher, "bf16", **common)
    print(f"bf16 vs fp32 recover trajectories: {args.model} {args.image_size}px batch {args.batch}, "
          f"{args.steps} steps, r_bn {args.r_bn}, same start and augmentation, device {device_name(device)}")
    print(f"  {'step':>5}{'CE fp32':>11}{'CE bf16':>11}{'rel':>9}{'BN fp32':>12}{'BN bf16':>12}{'rel':>9}")
    worst = {"ce": 0.0, "bn": 0.0}
    for i, row in enumerate(fp32_log):
        other = bf16_log[i]
        rel = {k: abs(other[k] - row[k]) / max(abs(row[k]), 1e-12) for k in ("ce", "bn")}
        worst = {k: max(worst[k], rel[k]) for k in worst}
        print(f"  {row['step']:>5}{row['ce']:>11.4f}{other['ce']:>11.4f}{rel['ce']:>9.2e}"
              f"{row['bn']:>12.4f}{other['bn']:>12.4f}{rel['bn']:>9.2e}")
    summary = {"model": args.model, "image_size": args.image_size, "batch": args.batch, "steps": args.steps,
               "device": device_name(device), "fp32": fp32_log, "bf16": bf16_log}
    image_rel = float((bf16_images - fp32_images).norm() / fp32_images.norm())
    summary.update(worst_rel_ce=worst["ce"], worst_rel_bn=worst["bn"], final_images_rel_l2=image_rel)
    print(f"largest relative difference: CE {worst['ce']:.2e}, BN {worst['bn']:.2e}; final images differ by "
          f"{image_rel:.2e} (relative L2)")
    if not all(math.isfinite(r['bn']) and math.isfinite(r['ce']) for r in bf16_log):
        print("bf16 trajectory is not finite")
    if args.json:
        save_json(summary, args.json)
    return summary


if __name__ == "__main__":
    main()
