"""Recover throughput by option: the peer loop, the floor and this engine, same shapes.

    python -m engine.bench.recover_cli --model resnet18_cifar --image-size 32 --batch 100
    python -m engine.bench.recover_cli --model resnet18 --image-size 224 --batch 100 --groups 1,2,4,8
    python -m engine.bench.recover_cli --model resnet50 --image-size 224 --batch 50 --groups 1,2,4

The peer loop (engine.bench.peer) is the one SRe2L-style scripts use: a forward hook per BN layer
that copies its input (permute + contiguous + view), eager mean/var, torch.norm, autograd. It and the
engine use the same augmentation recipe, optimizer and clipping, so the ratio isolates the engine's
step. The floor is the teacher's forward + the input's backward alone (engine.bench.recover_variants).
Engine rows: G class-batches of ``--batch`` per teacher forward (``--groups``), fp32/bf16
(``--precisions``), CUDA graphs off/on (``--graphs``, CUDA only; ``n/a`` on CPU). Figures are image-iterations per second (images x steps / s) after
warm-up, best of ``--repeats``. Needs no Hydra (runs with torch alone).
"""
from __future__ import annotations

import argparse

import torch

from engine.io import save_json
from engine.bench.device_stats import device_name, resolve_device
from engine.bench.recover_variants import PRECISIONS, Row, best_engine, measure_variants, render_rows
from engine.models import ModelConfig, build_model
from engine.recover.settings import StepAugment
from engine.recover.synthesize import Objective


def recipe(image_size: int, crop: bool = True) -> StepAugment:
    """The benchmark's augmentation: SRe2L's crop (0.08-1) + flip + roll (32 px at 224, 4 at 32)."""
    return StepAugment(image_size=image_size, crop_scale=(0.08, 1.0), flip=True,
                       jitter=4 if image_size <= 64 else 32, crop=crop)


def _ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers >= 1")
    return values


def _precisions(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or any(v not in PRECISIONS for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: use a comma-separated list of {'|'.join(PRECISIONS)}")
    return values


def _graphs(text: str) -> list[bool]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or any(v not in ("off", "on") for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: use a comma-separated list of off|on")
    return [v == "on" for v in values]


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18_cifar")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=100, help="images per class-batch (B)")
    parser.add_argument("--num-classes", type=int, default=None, help="default: 1000 at >= 224 px, else 100")
    parser.add_argument("--groups", type=_ints, default=None, help="G values tried (default 1,2,4,8 on CUDA, 1,2 on CPU)")
    parser.add_argument("--precisions", type=_precisions, default=None, help="default fp32,bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--graphs", type=_graphs, default=None, help="default off,on on CUDA, off on CPU")
    parser.add_argument("--no-floor", action="store_true", help="skip the floor rows")
    parser.add_argument("--no-crop", action="store_true", help="roll (+flip) only, as SC-DD's CIFAR script")
    parser.add_argument("--nchw", action="store_true", help="run the engine's teacher in NCHW (default channels_last)")
    parser.add_argument("--backend", default="auto", help="BN-statistics backend: auto|triton|torch")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="best of N timings per row")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    groups = args.groups or ([1, 2, 4, 8] if cuda else [1, 2])
    precisions = args.precisions or (["fp32", "bf16"] if cuda else ["fp32"])
    graphs = args.graphs or ([False, True] if cuda else [False])
    num_classes = args.num_classes or (1000 if args.image_size >= 224 else 100)
    aug = recipe(args.image_size, crop=not args.no_crop)
    objective = Objective(r_bn=0.01, first_bn_multiplier=10.0, iterations=args.steps, lr=0.25)

    def make_model() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model(ModelConfig(name=args.model), num_classes, 3, args.image_size)

    rows = measure_variants(make_model, model_name=args.model, num_classes=num_classes, batch=args.batch, aug=aug,
                            objective=objective, steps=args.steps, warmup=args.warmup, device=device,
                            backend=args.backend, channels_last=not args.nchw, groups=groups,
                            precisions=precisions, graphs=graphs, repeats=args.repeats, floor=not args.no_floor)
    title = (f"recover step, {args.model} {args.image_size}px, class-batch B={args.batch}, {args.steps} steps "
             f"(best of {args.repeats}), device {device_name(device)}")
    print("\n".join(render_rows(rows, title)))
    best = best_engine(rows)
    peer = rows[0].rate
    if best is not None and peer is not None:
        print(f"best engine row: {best.variant.label}: {best.rate.rate / peer.rate:.2f}x the peer loop")
    if args.json:
        save_json([row.as_dict() for row in rows], args.json)
    return rows


if __name__ == "__main__":
    main()
