"""One student step and one MoCo v2 step as callables on any device, for the sync-free tests
(tests/training/test_sync_free_steps.py on the meta device, tests/gpu/test_sync_free_steps_cuda.py on CUDA).

Each call runs the next optimizer step exactly as the training loops do (``engine.evaluate.student._train_step``,
``engine.squeeze.pretrain._train_step``) on real RGB images (foolbox's CIFAR-10 samples, 32 px)."""
from __future__ import annotations

from pathlib import Path

import torch

from engine.data import DataConfig, build_data
from engine.data.bundle import DataBundle
from engine.distributed import DistEnv
from engine.evaluate import student as student_module
from engine.evaluate.augment import step_rng
from engine.evaluate.student import StudentRecipe, build_optimizer
from engine.models import ModelConfig, build_model
from engine.squeeze import pretrain
from engine.squeeze.augment import large_image_spec
from engine.squeeze.ssl import METHODS, MoCoSettings
from engine.training.batches import batches_of, epoch_order, load_batches
from engine.training.precision import layout, use_channels_last
from realdata import write_cifar_batches

BATCH = 8


def cifar_bundle(root: Path) -> DataBundle:
    write_cifar_batches(root)
    return build_data(DataConfig(name="cifar10", root=str(root)))


def student_step(bundle: DataBundle, device: torch.device, model: ModelConfig, **options):
    """A callable making one student step (``options``: StudentRecipe fields) and returning its loss."""
    recipe = StudentRecipe(**{**dict(epochs=1, batch_size=BATCH, lr=1e-3, weight_decay=0.01, temperature=4.0,
                                     loss="kl", crop_scale=(0.5, 1.0), flip=True, cutmix_prob=1.0, cutmix_alpha=1.0,
                                     eval_every=1), **options})
    size = bundle.image_size
    channels_last = use_channels_last(recipe.channels_last, device, recipe.precision)
    torch.manual_seed(0)
    student = layout(build_model(model, bundle.num_classes, 3, size).to(device), channels_last)
    teacher = layout(build_model(model, bundle.num_classes, 3, size).to(device).eval(), channels_last)
    fill = bundle.normalize(torch.zeros(1, 3, 1, 1, device=device)) if recipe.crop == "pad" else None
    run = student_module._Run(
        student=student, model=student, optimizer=build_optimizer(student, recipe, device), recipe=recipe,
        normalize=bundle.normalize, device=device, seed=0, teacher=teacher, stored_labels=None, rank=0, world=1,
        steps_per_epoch=2, image_size=size, forward=student, fill=fill, channels_last=channels_last)
    batches = list(load_batches(bundle.train, batches_of(epoch_order(0, 0, len(bundle.train)), BATCH)))[:2]
    calls = iter(range(10**6))

    def step() -> torch.Tensor:
        index = next(calls)
        images, labels = batches[index % len(batches)]
        params = recipe.sample(step_rng(0, 0, index), len(labels), size)
        return student_module._train_step([run], images, labels, params, None, index)[0]

    return step


def moco_step(bundle: DataBundle, device: torch.device, model: ModelConfig, state_path: Path,
              precision: str = "fp32", method_name: str = "mocov2"):
    """A callable making one MoCo v2 step (large-image views: crop, flip, jitter with hue, grayscale, blur), or one
    step of another pretraining method (``method_name``: simclr, supervised) on the same views."""
    settings = (MoCoSettings(epochs=1, batch_size=BATCH, lr=0.06, queue_size=16, shuffle_groups=2)
                if method_name == "mocov2" else METHODS[method_name].settings(epochs=1, batch_size=BATCH))
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(5)
    method = METHODS[method_name].build(build_model(model, bundle.num_classes, 3, bundle.image_size), settings,
                                        generator)
    schedule = pretrain.Schedule(1, settings.batch_size, settings.lr, settings.momentum, settings.weight_decay)
    run = pretrain._setup(method, bundle.train, schedule=schedule, spec=large_image_spec(bundle.image_size),
                          normalize=bundle.normalize, device=device, generator=generator, state_path=state_path,
                          fingerprint={}, workers=0, progress=False, desc="moco", trainer="single",
                          dist=DistEnv(device=device), deepspeed=None, loader=None, precision=precision)
    batches = list(pretrain._epoch_batches(run, 0))
    calls = iter(range(10**6))

    def step() -> torch.Tensor:
        images, labels = batches[next(calls) % len(batches)]
        return pretrain._train_step(run, images, labels, settings.lr)[0].detach()

    return step
