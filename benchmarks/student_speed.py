"""Student optimizer steps per second under the default run's settings, per speed option.

    PYTHONPATH=. python benchmarks/student_speed.py [--device cpu|cuda] [--epochs 8] [--ipc 50] [--threads 1]

The default `scdd` run's student: data=mnist5k (28 px gray, in memory), model=convnet (width 64, depth 3), batch
100, AdamW, CutMix, KL soft labels from an online teacher of the same architecture; the training set is a random
real subset of ``--ipc`` images per class (a distilled set's size). Each variant trains one student through
``engine.evaluate.student.train_student`` itself; the rate is its per-epoch images/s (training only, the test
pass excluded; the TensorBoard metric ``train/images_per_s``), median over the epochs after the first. For
``compile`` the first epoch's extra time over that median is reported as the compilation cost.

``--pretrain`` also times MoCo v2 pretraining (ssl=mocov2's defaults, batch 128, on ``--pretrain-ipc`` images
per class) through ``engine.squeeze.pretrain.train`` (its ``epoch/images_per_s`` of the second epoch), for each
of ``--pretrain-variants``: a precision, then ``+graphs`` (squeeze.cuda_graphs, CUDA only) and/or ``+compile``
(squeeze.compile; the compilation falls in the first epoch, whose time is printed too).

``--lockstep N`` also times N students of the first variant trained one after another and then together
(``train_students``, as evaluate.students does: one batch stream and one teacher forward per batch for all).

``--profile`` then trains each variant (and each pretraining precision) once more under torch.profiler (CPU, and
CUDA kernels on CUDA) and prints the operators of ``--profile-steps`` optimizer steps, after two warm-up steps,
by self CUDA time (self CPU time on the CPU): where a step's time goes, and whether the host or the GPU waits.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch

from engine.data import DataConfig, build_data
from engine.evaluate.stage import random_real_subset
from engine.evaluate.student import StudentJob, StudentRecipe, train_students
from engine.models import ModelConfig, build_model
from engine.training.tb_logger import NULL_LOGGER, MetricsLogger

VARIANTS = {
    "fp32": {"precision": "fp32", "channels_last": False},
    "bf16": {"precision": "bf16", "channels_last": False},
    "fp32+channels_last": {"precision": "fp32", "channels_last": True},
    "bf16+channels_last": {"precision": "bf16", "channels_last": True},
    "fp32+compile": {"precision": "fp32", "channels_last": False, "compile": True},
    "bf16+compile": {"precision": "bf16", "channels_last": False, "compile": True},
    "bf16+channels_last+compile": {"precision": "bf16", "channels_last": True, "compile": True},
    # evaluate.cuda_graphs: full batches replay one captured graph of the whole step (CUDA only)
    "fp32+graphs": {"precision": "fp32", "channels_last": False, "cuda_graphs": True},
    "bf16+channels_last+graphs": {"precision": "bf16", "channels_last": True, "cuda_graphs": True},
}


class EpochRates(MetricsLogger):
    def __init__(self) -> None:
        self.rates: list[float] = []

    def scalars(self, values, step):
        if "train/images_per_s" in values:
            self.rates.append(float(values["train/images_per_s"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--ipc", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--pretrain", action="store_true")
    parser.add_argument("--pretrain-ipc", type=int, default=100)
    parser.add_argument("--pretrain-variants", default=None,
                        help="comma-separated, e.g. bf16+graphs,bf16+compile+graphs; default: fp32 and bf16, "
                             "eager and (CUDA) graphed")
    parser.add_argument("--model", default="convnet", help="student, teacher and pretraining model")
    parser.add_argument("--image-size", type=int, default=28,
                        help="MNIST-5k images resized (bilinear) to this size, 3 channels when > 28 (GPU shapes)")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--profile", action="store_true",
                        help="after the timed epochs, print a torch.profiler table of a few steps per variant")
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--lockstep", type=int, default=0,
                        help="N > 1: also time N students of the first variant one after another, then in lockstep "
                             "(evaluate.students: one teacher forward per batch for all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bundle = build_data(DataConfig(name="mnist5k"))
    model_cfg = ModelConfig(name="convnet", width=64, depth=3) if args.model == "convnet" else ModelConfig(name=args.model)
    train_set = random_real_subset(bundle, args.ipc, seed=0).dataset
    test_set = bundle.test
    if args.image_size != bundle.image_size:
        bundle, train_set, test_set = resized(bundle, train_set, args.image_size)
    torch.manual_seed(1)
    teacher = build_model(model_cfg, bundle.num_classes, bundle.channels, bundle.image_size).eval()
    batch = args.batch
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} thread(s)"
    print(f"{name}; load average {load:.2f} on {os.cpu_count()} cores; {len(train_set)} images, batch {batch}, "
          f"{args.epochs} epochs per variant")
    print(f"{'variant':<22}{'steps/s':>10}{'images/s':>11}{'vs fp32':>9}{'first epoch s':>15}")
    base = None
    variants = args.variants.split(",")

    def train_variant(variant: str, epochs: int, logger: MetricsLogger = NULL_LOGGER, count: int = 1) -> None:
        """``count`` students of ``variant`` (more than one: trained together, as evaluate.students does)."""
        options = dict(VARIANTS[variant])
        graphs = options.pop("cuda_graphs", False)
        recipe = StudentRecipe(epochs=epochs, batch_size=batch, lr=1e-2, weight_decay=0.01, temperature=4.0,
                               loss="kl", crop_scale=(0.5, 1.0), flip=False, cutmix_prob=1.0, cutmix_alpha=1.0,
                               eval_every=epochs, **options)
        torch.manual_seed(0)
        jobs = [StudentJob(build_model(model_cfg, bundle.num_classes, bundle.channels, bundle.image_size),
                           logger=logger) for _ in range(count)]
        train_students(jobs, train_set, test_set, bundle.normalize, recipe, device, 0, teacher=teacher,
                       progress=False, cuda_graphs=graphs)

    if device.type != "cuda":
        skipped = [v for v in variants if VARIANTS[v].get("cuda_graphs")]
        variants = [v for v in variants if v not in skipped]
        if skipped:
            print(f"skipped on {device.type} (CUDA graphs need a CUDA device): {', '.join(skipped)}")
    for variant in variants:
        rates = EpochRates()
        train_variant(variant, args.epochs, rates)
        steady = statistics.median(rates.rates[1:]) if len(rates.rates) > 1 else rates.rates[0]
        first_epoch = len(train_set) / rates.rates[0]
        base = base or steady
        print(f"{variant:<22}{steady / batch:>10.2f}{steady:>11.0f}{steady / base:>8.2f}x{first_epoch:>15.2f}")
    if args.lockstep > 1:
        lockstep_rates(variants[0], args.lockstep, args.epochs, train_variant)
    if args.profile:
        epochs = math.ceil((PROFILE_WARMUP + args.profile_steps) / math.ceil(len(train_set) / batch))
        for variant in variants:
            profile_steps(f"student {variant}", lambda: train_variant(variant, epochs, NULL_LOGGER), device,
                          args.profile_steps)
    if args.pretrain:
        pretrain_set = random_real_subset(build_data(DataConfig(name="mnist5k")), args.pretrain_ipc, seed=0).dataset
        if args.image_size != 28:
            pretrain_set = resized(bundle, pretrain_set, args.image_size)[1]
        pretrain_rates(bundle, model_cfg, device, pretrain_set, args.profile_steps if args.profile else 0,
                       args.pretrain_variants.split(",") if args.pretrain_variants else None)


def lockstep_rates(variant: str, count: int, epochs: int, train_jobs) -> None:
    """Wall time of ``count`` students trained one after another, then in lockstep (one batch stream, one
    teacher forward per batch), each ``epochs`` epochs, test passes included."""
    started = time.perf_counter()
    for _ in range(count):
        train_jobs(variant, epochs)
    alone = time.perf_counter() - started
    started = time.perf_counter()
    train_jobs(variant, epochs, count=count)
    together = time.perf_counter() - started
    print(f"{count} students of {variant}, {epochs} epochs each: one after another {alone:.2f} s, in lockstep "
          f"{together:.2f} s ({alone / together:.2f}x)")


PROFILE_WARMUP = 2
"""Optimizer steps run before the profiled ones (first-step costs: optimizer state, cuDNN's choices)."""


def profile_steps(label: str, training, device: torch.device, steps: int) -> None:
    """Print where ``steps`` optimizer steps of ``training()`` (after PROFILE_WARMUP) spend their time: one
    table of operators by self CUDA time on CUDA (self CPU time on the CPU). Steps are counted by a global
    optimizer step hook, so the loops run unchanged."""
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.profiler import ProfilerActivity, profile, schedule

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    # self_device_time_total: self CUDA time (self_cuda_time_total is its deprecated name)
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    tables: list[str] = []  # the profiler drops a cycle's events once it ends: read them when it does
    with profile(activities=activities, schedule=schedule(wait=0, warmup=PROFILE_WARMUP, active=steps, repeat=1),
                 on_trace_ready=lambda p: tables.append(p.key_averages().table(sort_by=sort, row_limit=25))) as prof:
        hook = register_optimizer_step_post_hook(lambda *_: prof.step())
        try:
            training()
        finally:
            hook.remove()
    print(f"\nprofile: {label}, {steps} optimizer steps after {PROFILE_WARMUP} warm-up steps")
    print(tables[0] if tables else "(fewer steps ran than warm-up + profiled)")


class _Images:
    """An in-memory uint8 set (``.images``/``.labels``: the students' sliced path)."""

    def __init__(self, images: torch.Tensor, labels) -> None:
        self.images, self.labels = images, list(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def resized(bundle, train_set, size: int):
    """(bundle, train set, test set) with MNIST-5k's digits resized to ``size`` px and 3 channels: real
    images at the shapes a GPU benchmark needs (224 px: ImageNet's); the first 500 test images."""
    import dataclasses

    import torch.nn.functional as F

    def convert(dataset, count=None):
        count = len(dataset) if count is None else min(count, len(dataset))
        images = torch.stack([dataset[i][0] for i in range(count)]).float()
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        images = images.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
        return _Images(images, [int(dataset[i][1]) for i in range(count)])

    big = dataclasses.replace(bundle, channels=3, image_size=size, mean=[bundle.mean[0]] * 3, std=[bundle.std[0]] * 3)
    return big, convert(train_set), convert(bundle.test, 500)


def pretrain_rates(bundle, model_cfg: ModelConfig, device: torch.device, train_set, profile: int = 0,
                   variants: list[str] | None = None) -> None:
    """Images/s of MoCo v2 pretraining per variant (precision[+graphs][+compile]); ``profile`` > 0: then that many
    steps of eager fp32 and bf16 profiled."""
    import tempfile
    from pathlib import Path

    from engine.squeeze.augment import spec_for
    from engine.squeeze.pretrain import Schedule, train
    from engine.squeeze.ssl import METHODS, MoCoSettings, fit_to_data

    settings = fit_to_data(MoCoSettings(), len(train_set))

    def pretrain(precision: str, epochs: int, graphs: bool = False, compiled: bool = False) -> list[dict]:
        torch.manual_seed(0)
        generator = torch.Generator().manual_seed(0)
        model = build_model(model_cfg, bundle.num_classes, bundle.channels, bundle.image_size)
        method = METHODS["mocov2"].build(model, settings, generator)
        with tempfile.TemporaryDirectory() as folder:
            return train(method, train_set, schedule=Schedule(epochs, settings.batch_size, settings.lr,
                                                              settings.momentum, settings.weight_decay),
                         spec=spec_for("strong", bundle.image_size, bundle.channels == 3), normalize=bundle.normalize,
                         device=device, generator=generator, state_path=Path(folder) / "state.pt",
                         fingerprint={}, resume=False, progress=False, precision=precision, cuda_graphs=graphs,
                         compile_encoders=compiled)

    if variants is None:
        variants = [p + g for g in (("", "+graphs") if device.type == "cuda" else ("",)) for p in ("fp32", "bf16")]
    print(f"MoCo v2 pretraining: {len(train_set)} images, batch {settings.batch_size}, 2 epochs per variant")
    # squeeze.cuda_graphs (CUDA only) and squeeze.compile: the warm-up, capture and compilation fall in epoch 1
    for label in variants:
        precision, *flags = label.split("+")
        if set(flags) - {"graphs", "compile"} or ("graphs" in flags and device.type != "cuda"):
            print(f"  {label}: skipped (a precision, then +graphs on CUDA and/or +compile)")
            continue
        history = pretrain(precision, 2, "graphs" in flags, "compile" in flags)
        print(f"  {label}: {history[-1]['images_per_s']:.0f} images/s (second epoch; first epoch "
              f"{history[0]['seconds']:.1f} s)")
    if profile:
        epochs = math.ceil((PROFILE_WARMUP + profile) / (len(train_set) // settings.batch_size))
        for precision in ("fp32", "bf16"):
            profile_steps(f"MoCo v2 {precision}", lambda: pretrain(precision, epochs), device, profile)


if __name__ == "__main__":
    main()
