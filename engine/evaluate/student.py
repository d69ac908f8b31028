"""Train a student from scratch on a (small or streamed) training set and test it on real data.

Soft labels come from the teacher either online (it labels each augmented batch as the student
sees it, SC-DD) or from files precomputed by ``relabel.precompute_soft_labels`` (SRe2L/FKD), which
replay the very same crops. With the same seed both give the same student.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from engine.data.views import at_epoch, crops_in_data
from engine.evaluate.augment import PARTNER, AugParams, apply_moved, param_tensors, sample_params, step_rng
from engine.evaluate.losses import mixed_cross_entropy, soft_label_kl
from engine import preemption
from engine.evaluate.relabel import load_epoch_labels, reconstruct_logits
from engine.distributed import DistEnv, average_buffers
from engine.errors import ConfigError
from engine.artifacts import student as student_artifacts
from engine.training.batches import batches_of, epoch_order, load_batches, on_device, to_unit_float
from engine.training.metrics import evaluate_accuracy
from engine.training.precision import (autocast, layout, optimizer_options, to_device_all,
                                      use_channels_last)
from engine.training.graphs import CapturedStep, plain_lr, require_cuda_graphs
from engine.training.schedule import set_lr
from engine.training.tb_logger import NULL_LOGGER, MetricsLogger
from engine.training.trainers import wrap_ddp


@dataclass(frozen=True)
class StudentRecipe:
    """Everything that decides a student's training, apart from data and models."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    temperature: float
    loss: str  # kl | hard
    crop_scale: tuple[float, float]
    flip: bool
    cutmix_prob: float
    cutmix_alpha: float
    eval_every: int
    workers: int = 0
    crop: str = "rrc"  # rrc | pad
    crop_padding: int = 4
    mix: str = "cutmix"  # cutmix | mixup | none
    mixup_alpha: float = 0.8
    optimizer: str = "adamw"  # adamw | sgd
    momentum: float = 0.9
    decay_norm_and_bias: bool = True
    warmup_epochs: int = 0
    lr_floor: float = 0.0
    lr_per: str = "step"  # step | epoch
    temperature_squared: bool = False
    precision: str = "fp32"  # auto | fp32 | bf16 (engine.training.precision)
    channels_last: Optional[bool] = None  # None: on CUDA only
    compile: bool = False

    def sample(self, rng: np.random.Generator, batch: int, size: int) -> AugParams:
        """One batch's augmentation parameters under this recipe (stored relabeling draws the same)."""
        return sample_params(rng, batch, size, self.crop_scale, self.flip, self.cutmix_prob, self.cutmix_alpha,
                             crop=self.crop, pad=self.crop_padding, mix=self.mix, mixup_alpha=self.mixup_alpha)


def build_optimizer(student: nn.Module, recipe: StudentRecipe, device: Optional[torch.device] = None,
                    capturable: bool = False) -> torch.optim.Optimizer:
    """AdamW or SGD; without ``decay_norm_and_bias`` only weights of 2+ dimensions (conv, linear) decay,
    as the ImageNet script's param groups: BatchNorm scales/shifts and biases get weight decay 0.
    With ``device``: fused (CUDA) or foreach (CPU) kernels, the same update as the default loop.
    ``capturable`` (a CUDA-graph step): AdamW keeps its step count on the device (train_student then makes
    the groups' lr one device tensor, which the step writes)."""
    options = optimizer_options(device) if device is not None else {}
    if capturable and recipe.optimizer == "adamw":
        options["capturable"] = True
    params = [p for p in student.parameters() if p.requires_grad]
    if recipe.decay_norm_and_bias:
        groups = [{"params": params}]
    else:
        groups = [{"params": [p for p in params if p.ndim > 1]},
                  {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay,
                               **options)
    return torch.optim.AdamW(groups, lr=recipe.lr, weight_decay=recipe.weight_decay, **options)


def student_lr(recipe: StudentRecipe, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Linear warm-up, then a cosine that reaches ``lr_floor`` x lr at the end: the first ``reach`` of a
    cosine to 0, reach = arccos(2 floor - 1) / pi (1 for floor 0). Per step, or per epoch as the scripts'
    LambdaLR (the CIFAR script's 0.5 (1 + cos(pi e / 600)) over 200 epochs is floor 0.75)."""
    if recipe.lr_per == "epoch":
        position, total, warmup = epoch, recipe.epochs, recipe.warmup_epochs
    else:
        position, total = epoch * steps_per_epoch + step, recipe.epochs * steps_per_epoch
        warmup = recipe.warmup_epochs * steps_per_epoch
    if position < warmup:
        return recipe.lr * (position + 1) / warmup
    progress = (position - warmup) / max(1, total - warmup)
    reach = math.acos(2 * recipe.lr_floor - 1) / math.pi
    return 0.5 * recipe.lr * (1 + math.cos(math.pi * progress * reach))


@dataclass
class StudentResult:
    top1: float
    """Final: the test pass after the last epoch (the headline)."""
    top5: Optional[float]
    best_top1: Optional[float] = None
    """Best of the full test passes (every eval_every epochs and the last); never a partial pass."""
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    images_per_s: float = 0.0


@dataclass
class _Run:
    """What every step of one student's training needs (the lockstep group's runs share recipe, teacher, seed,
    layout and lr tensor)."""

    student: nn.Module
    model: nn.Module
    """``student``, or its DDP wrapper when world > 1."""
    optimizer: torch.optim.Optimizer
    recipe: StudentRecipe
    normalize: Callable
    device: torch.device
    seed: int
    teacher: Optional[nn.Module]
    stored_labels: Optional[Path]
    rank: int
    world: int
    steps_per_epoch: int
    image_size: int
    fill: Optional[torch.Tensor] = None
    """A black pixel, normalized: the pad-and-crop border."""
    forward: Optional[Callable] = None
    """``model``, or its torch.compile'd forward (recipe.compile)."""
    channels_last: bool = False
    logger: MetricsLogger = NULL_LOGGER
    step_index: int = 0
    """Optimizer steps so far (the TensorBoard x axis)."""
    num_classes: int = 0
    lr: Optional[torch.Tensor] = None
    """The optimizer groups' shared device lr of a CUDA-graph run (the step writes it); None: a float per step."""
    captured: Optional[CapturedStep] = None
    """The CUDA-graph step (cuda_graphs=True) of this run's lockstep group: full batches replay it."""
    job: Optional["StudentJob"] = None
    history: list[dict] = field(default_factory=list)
    seen: int = 0
    """Images trained on (this process's count of the batches' images)."""
    seconds: float = 0.0


@dataclass
class StudentJob:
    """One student of ``train_students``: its model and what is its own (checkpoint, metrics)."""

    student: nn.Module
    checkpoint: Optional[Path] = None
    """Resumes only a state saved with the same ``fingerprint`` (another is refused)."""
    fingerprint: Optional[dict] = None
    logger: MetricsLogger = NULL_LOGGER


def train_student(student: nn.Module, train_set: Dataset, test_set: Dataset, normalize: Callable,
                  recipe: StudentRecipe, device: torch.device, seed: int,
                  teacher: Optional[nn.Module] = None, stored_labels: Optional[Path] = None,
                  checkpoint: Optional[Path] = None, progress: bool = True,
                  desc: str = "student", dist: Optional[DistEnv] = None, test_loader=None,
                  fingerprint: Optional[dict] = None, logger: MetricsLogger = NULL_LOGGER,
                  cuda_graphs: bool = False) -> StudentResult:
    """One student: ``train_students`` with one job."""
    return train_students([StudentJob(student, checkpoint, fingerprint, logger)], train_set, test_set, normalize,
                          recipe, device, seed, teacher=teacher, stored_labels=stored_labels, progress=progress,
                          desc=desc, dist=dist, test_loader=test_loader, cuda_graphs=cuda_graphs)[0]


def train_students(jobs: list[StudentJob], train_set: Dataset, test_set: Dataset, normalize: Callable,
                   recipe: StudentRecipe, device: torch.device, seed: int,
                   teacher: Optional[nn.Module] = None, stored_labels: Optional[Path] = None,
                   progress: bool = True, desc: str = "student", dist: Optional[DistEnv] = None,
                   test_loader=None, cuda_graphs: bool = False) -> list[StudentResult]:
    """AdamW or SGD + cosine lr (``student_lr``); soft labels online from ``teacher`` or from ``stored_labels``.

    Several jobs (students of other models on the same set, recipe and seed: evaluate.students) train in
    lockstep: each batch is loaded, augmented and labelled by the teacher once, then every student takes its
    step on it. Each ends exactly where it would alone (same batches, crops and targets; no student reads
    another's random numbers); jobs resuming from different epochs train in one lockstep group per epoch.
    A result's ``seconds`` is its group's wall time.

    With world size W > 1 (``dist``) every rank loads and augments the same full batch, keeps its
    positions r, r+W, ... and scales its mean loss by its share, so DDP's gradient average equals
    the full-batch gradient of one process. BatchNorm sees each rank's share only, so results are
    close to, not bit-equal with, one process; BN running statistics are averaged over ranks before
    every test, so all ranks report the same accuracy. Rank 0 writes the checkpoints.
    ``test_loader`` (loader=ffcv|dali) replaces ``test_set`` in those tests.

    Speed (``recipe``): ``precision`` bf16 runs the student's and the teacher's forward under autocast
    (weights, AdamW/SGD state and BN running statistics stay fp32; the loss is taken from fp32 logits);
    ``channels_last`` puts the student, the teacher and each batch in NHWC; ``compile`` wraps the
    student's forward (and so its backward) in torch.compile, whose first steps pay the compilation.
    ``cuda_graphs`` (CUDA, one process, no ``compile``): every full batch replays one CUDA graph of the
    whole step (augmentation, teacher forward, every student's forward, loss, backward and optimizer),
    captured after a few eager steps (engine.training.graphs); the step's arithmetic is the eager one's.
    Each job's ``logger`` receives per-step loss/lr and per-epoch throughput and test accuracy
    (engine.training.tb_logger).
    """
    if recipe.loss == "kl" and teacher is None and stored_labels is None:
        raise ValueError("soft-label training needs a teacher (online) or stored labels")
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    if cuda_graphs:
        check_cuda_graphs(device, world)
        if recipe.compile:
            raise ConfigError("cuda_graphs and recipe.compile are both set; pick one")
    torch.manual_seed(seed)
    # small in-memory sets (distilled, random real, a 64 px tree) are held on the GPU for the whole training:
    # a step then moves indices, not pixels, and its tests read the split from there
    train_set, test_set = on_device(train_set, device), on_device(test_set, device)
    channels_last = use_channels_last(recipe.channels_last, device, recipe.precision)
    if teacher is not None:
        teacher = layout(teacher.to(device).eval(), channels_last)
    fill = normalize(torch.zeros(1, train_set[0][0].shape[0], 1, 1, device=device)) if recipe.crop == "pad" else None
    # one lr tensor for every optimizer of a CUDA-graph run: the captured step writes it
    lr = torch.tensor(float(recipe.lr), dtype=torch.float32, device=device) if cuda_graphs else None
    runs, starts = [], []
    for job in jobs:
        student = layout(job.student.to(device), channels_last)
        run = _Run(student=student, model=wrap_ddp(student, dist) if world > 1 else student,
                   optimizer=build_optimizer(student, recipe, device, capturable=cuda_graphs),
                   recipe=recipe, normalize=normalize, device=device, seed=seed,
                   teacher=teacher, stored_labels=stored_labels,
                   rank=rank, world=world, steps_per_epoch=math.ceil(len(train_set) / recipe.batch_size),
                   image_size=train_set[0][0].shape[-1], channels_last=channels_last, fill=fill,
                   logger=job.logger if rank == 0 else NULL_LOGGER, num_classes=_output_classes(student), lr=lr,
                   job=job)
        # dynamic=False: a last smaller batch recompiles once instead of tracing symbolic shapes
        run.forward = torch.compile(run.model, dynamic=False) if recipe.compile else run.model
        state = student_artifacts.load_state(job.checkpoint, job.fingerprint) if job.checkpoint is not None else None
        start_epoch = 0
        if state is not None:
            student.load_state_dict(state["student"])
            run.optimizer.load_state_dict(state["optimizer"])
            start_epoch, run.history = state["epoch"], state["history"]
        if lr is not None:  # after loading a state, whose lr would replace the groups' tensor
            for group in run.optimizer.param_groups:
                group["lr"] = lr
        run.step_index = start_epoch * run.steps_per_epoch
        runs.append(run)
        starts.append(start_epoch)
    for start_epoch in sorted(set(starts)):
        group = [run for run, start in zip(runs, starts) if start == start_epoch]
        _train_lockstep(group, start_epoch, train_set, test_set, test_loader, progress, desc)
    for run in runs:
        run.logger.flush()
        layout(run.student, False)  # handed back in the default layout
    if teacher is not None:
        layout(teacher, False)  # the teacher serves later rows and relabeling
    results = []
    for run in runs:
        final = run.history[-1]
        results.append(StudentResult(top1=final["top1"], top5=final["top5"],
                                     best_top1=student_artifacts.best_top1(run.history), history=run.history,
                                     seconds=run.seconds, images_per_s=run.seen / run.seconds if run.seconds > 0
                                     else 0.0))
    return results


def _train_lockstep(runs: list["_Run"], start_epoch: int, train_set: Dataset, test_set: Dataset, test_loader,
                    progress: bool, desc: str) -> None:
    """Train ``runs`` (all at ``start_epoch``) to the recipe's last epoch, one batch stream for all."""
    lead = runs[0]
    recipe, device, world = lead.recipe, lead.device, lead.world
    if lead.lr is not None:
        captured = CapturedStep(lambda inputs: _device_step(runs, inputs), device,
                                before_capture=lambda: [run.optimizer.zero_grad(set_to_none=True) for run in runs],
                                key="evaluate.cuda_graphs")
        for run in runs:
            run.captured = captured
    checkpoint_every = max(1, recipe.epochs // 10)
    start = time.time()
    bar = tqdm(range(start_epoch, recipe.epochs), desc=desc, disable=not progress, unit="ep",
               dynamic_ncols=True, leave=False)
    pending: Optional[_EpochLosses] = None
    for epoch in bar:
        rows, losses = _train_epoch(runs, train_set, epoch)
        test = (epoch + 1) % recipe.eval_every == 0 or epoch + 1 == recipe.epochs
        stop = preemption.requested() is not None and epoch + 1 < recipe.epochs
        save = (lead.rank == 0 and epoch + 1 < recipe.epochs and ((epoch + 1) % checkpoint_every == 0 or stop)
                and any(run.job.checkpoint is not None for run in runs))
        # An epoch's losses are read one epoch late: by then its steps are done, so the read does not wait,
        # and the GPU keeps the next epoch's steps queued meanwhile (a distilled set's epoch is a few steps,
        # and waiting at each epoch's end would leave the GPU idle there). Tests and checkpoints read now.
        if pending is not None:
            pending.settle(runs)
        pending = losses
        if test or save or stop or epoch + 1 == recipe.epochs:
            pending.settle(runs)
            pending = None
        for run, row in zip(runs, rows):
            run.seen += losses.images
            if test:
                if world > 1:
                    average_buffers(run.student)
                row["top1"], row["top5"] = evaluate_accuracy(
                    run.student, test_set, run.normalize, device, workers=recipe.workers, loader=test_loader,
                    precision=recipe.precision, channels_last=run.channels_last)
                metrics = {"test/top1": row["top1"]}
                if row["top5"] is not None:
                    metrics["test/top5"] = row["top5"]
                run.logger.scalars(metrics, epoch + 1)
            run.history.append(row)
            if save and run.job.checkpoint is not None:
                student_artifacts.save_state(run.job.checkpoint, {"student": run.student.state_dict(),
                                                                  "optimizer": plain_lr(run.optimizer.state_dict()),
                                                                  "epoch": epoch + 1, "history": run.history},
                                             run.job.fingerprint)
        if test:
            bar.set_postfix(loss=f"{rows[0]['loss']:.3f}", top1=f"{rows[0]['top1']:.3f}")
        if stop:  # preempted: the epoch in flight is finished and its checkpoints written
            preemption.check(f"epoch {epoch + 1} of {recipe.epochs} of {desc} (checkpoint "
                             f"{', '.join(str(run.job.checkpoint) for run in runs)})")
    for run in runs:
        run.seconds = time.time() - start


def check_cuda_graphs(device: torch.device, world: int) -> None:
    """One line refusing evaluate.cuda_graphs where it cannot run (with compile: EvaluateConfig refuses)."""
    require_cuda_graphs(device, "evaluate.cuda_graphs")
    if world > 1:
        raise ConfigError(f"evaluate.cuda_graphs=true captures one process's step; this run has {world} ranks "
                          f"(DDP): set evaluate.cuda_graphs=false or run one process")


def _output_classes(student: nn.Module) -> int:
    """The class count of the student's logits: its last linear layer's outputs (a ClassifierNet's ``fc``); 0
    without one (then only online labels, whose shape the teacher gives)."""
    linear = [m for m in student.modules() if isinstance(m, nn.Linear)]
    return linear[-1].out_features if linear else 0


def _train_epoch(runs: list[_Run], train_set: Dataset, epoch: int) -> tuple[list[dict], "_EpochLosses"]:
    """One epoch of optimizer steps of every run on one batch stream; returns (each run's metrics row, its
    ``loss`` filled in when the returned losses are settled; the epoch's losses)."""
    lead = runs[0]
    started = _clock(lead.device)
    for run in runs:
        run.student.train()
    stored = None
    if lead.stored_labels is not None:
        stored = load_epoch_labels(lead.stored_labels, epoch)
        order, step_params = stored["order"], stored["params"]
    else:
        order, step_params = epoch_order(lead.seed, epoch, len(train_set)), None
    losses, seen, lr = [], 0, lead.recipe.lr
    cropped = crops_in_data(train_set)  # real images cropped at full resolution by the dataset
    if cropped and stored is not None:
        raise ValueError("stored labels replay crop boxes; a dataset that crops itself needs online labels")
    batches = load_batches(at_epoch(train_set, epoch), batches_of(order, lead.recipe.batch_size), lead.recipe.workers)
    for step, (images, labels) in enumerate(batches):
        lr = student_lr(lead.recipe, epoch, step, lead.steps_per_epoch)
        if lead.lr is None:  # a CUDA-graph step writes its lr tensor itself
            for run in runs:
                set_lr(run.optimizer, lr)
        params = step_params[step] if step_params is not None else lead.recipe.sample(
            step_rng(lead.seed, epoch, step), len(labels), lead.image_size)
        if cropped:  # the whole (already cropped) image (the centre window of a padded one); flips, mixing as drawn
            params.boxes[:] = (params.pad, params.pad, lead.image_size, lead.image_size)
        step_losses = _train_step(runs, images, labels, params, stored, step, lr)
        for run in runs:
            run.step_index += 1
        if step_losses is not None:
            losses.append((lead.step_index, lr, step_losses))
        seen += len(labels)
    rows = [{"epoch": epoch + 1, "loss": float("nan"), "lr": lr} for _ in runs]
    return rows, _EpochLosses(epoch, losses, seen, rows, started, _clock(lead.device))


class _EpochLosses:
    """One epoch's step losses, left on the device (a host read per step would wait for the GPU every step).
    ``settle`` reads them once, fills each run's metrics row's ``loss`` and logs the steps' loss and lr, and
    the epoch's mean loss and images/s (its wall time on the device's timeline, ``_clock``)."""

    def __init__(self, epoch: int, steps: list[tuple[int, float, torch.Tensor]], images: int,
                 rows: list[dict], started, ended) -> None:
        self.epoch, self.steps, self.images, self.rows = epoch, steps, images, rows
        self.started, self.ended = started, ended  # the epoch's two _clock points
        self.table = torch.stack([loss for _, _, loss in steps]) if steps else None

    def settle(self, runs: list[_Run]) -> None:
        table = self.table.cpu() if self.table is not None else torch.zeros(0, len(runs))
        seconds = _seconds(self.started, self.ended)
        for i, run in enumerate(runs):
            values = table[:, i].tolist()
            for (index, step_lr, _), value in zip(self.steps, values):
                run.logger.scalars({"train/loss": value, "train/lr": step_lr}, index)
            loss = float(np.mean(values)) if values else float("nan")
            self.rows[i]["loss"] = loss
            run.logger.scalars({"train/loss_epoch": loss,
                                "train/images_per_s": self.images / max(seconds, 1e-9)}, self.epoch + 1)


def _clock(device: torch.device):
    """A point in time on ``device``'s own timeline: a recorded CUDA event (it passes when the GPU reaches the
    work queued before it), else the host clock. An epoch timed between two such points lasts from the end of
    the work queued before it to the end of its own work, idle gaps included: its true wall time, whether the
    host or the GPU is the slower, although its losses are read later."""
    if torch.device(device).type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _seconds(started, ended) -> float:
    if isinstance(ended, float):
        return ended - started
    ended.synchronize()
    return started.elapsed_time(ended) / 1000.0


def _train_step(runs: list[_Run], images: torch.Tensor, labels: torch.Tensor, params: AugParams,
                stored: Optional[dict], step: int, lr: Optional[float] = None) -> Optional[torch.Tensor]:
    """One optimizer step of every run on this rank's share of the batch; returns their losses [runs], left
    on the device (None: empty share). ``lr``: this step's learning rate, written into the optimizers' lr
    tensor by the step itself (a CUDA-graph run, ``run.lr``); the eager loop sets it beforehand instead."""
    lead = runs[0]
    # One copy carries the batch, its labels and its crop/flip/mix parameters (and, when captured, the lr;
    # with stored labels, the targets): each separate copy from pageable memory would make the host wait
    # for the GPU. uint8 crosses (a quarter of fp32's bytes) and becomes float there; a set held on the
    # device (training.batches.on_device) hands over its batch there already, and only the rest crosses.
    host = [images, labels, *param_tensors(params)]
    if lead.lr is not None:
        host.append(torch.tensor([lead.recipe.lr if lr is None else lr], dtype=torch.float32))
    if stored is not None and lead.recipe.loss == "kl":
        host.append(reconstruct_logits(stored, step, lead.num_classes)[lead.rank::lead.world])
    if lead.captured is not None:
        return lead.captured(host)
    return _device_step(runs, to_device_all(host, lead.device))


def _device_step(runs: list[_Run], inputs: list[torch.Tensor]) -> Optional[torch.Tensor]:
    """The step on ``_train_step``'s tensors, on the device: the batch augmented and labelled once, then each
    run's update. Which operations run depends only on the recipe and the shapes, never on the batch's draw,
    so a CUDA graph captured on one batch serves every batch."""
    lead = runs[0]
    images, labels, ints, floats, *rest = inputs
    rank, world, recipe = lead.rank, lead.world, lead.recipe
    if lead.lr is not None:
        lead.lr.copy_(rest.pop(0).view(()))
    mix = recipe.mix if len(labels) > 1 else "none"  # one image is never mixed
    x = apply_moved(lead.normalize(to_unit_float(images)), (ints, floats), mix, recipe.crop_padding
                    if recipe.crop == "pad" else 0, lead.fill)
    if lead.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    partner = labels[ints[:, PARTNER]] if mix != "none" else None
    full = len(labels)
    if world > 1:  # this rank's share of the batch (partners were looked up in the whole batch)
        x, labels = x[rank::world], labels[rank::world]
        partner = partner[rank::world] if partner is not None else None
    target = None
    if len(labels) and recipe.loss == "kl":
        if rest:  # stored labels, reconstructed on the host and moved with the batch
            target = rest[0]
        else:  # online: the teacher labels the batch once for every run
            with torch.no_grad(), autocast(recipe.precision, lead.device):
                target = lead.teacher(x)
            target = target.float()
    losses = [_update(run, x, labels, partner, floats, target, full) for run in runs]
    return torch.stack(losses) if len(labels) else None


def _update(run: _Run, x: torch.Tensor, labels: torch.Tensor, partner: Optional[torch.Tensor],
            floats: torch.Tensor, target: Optional[torch.Tensor], full: int) -> torch.Tensor:
    """One run's forward, loss, backward and optimizer step on the prepared batch; its loss (detached)."""
    recipe, world = run.recipe, run.world
    with autocast(recipe.precision, run.device):
        logits = run.forward(x)
    logits = logits.float()  # the loss in fp32 whatever the forward ran in
    if len(labels) == 0:  # a last batch smaller than the world leaves some ranks nothing
        loss = logits.sum() * 0.0
    elif recipe.loss == "hard":
        # an unmixed batch of a mixing recipe has itself as partner and lam 1: exactly CE(y)
        loss = (mixed_cross_entropy(logits, labels, partner, floats[4], floats[5]) if partner is not None
                else F.cross_entropy(logits, labels))
    else:
        loss = soft_label_kl(logits, target, recipe.temperature)
        if recipe.temperature_squared:
            loss = loss * recipe.temperature ** 2
    run.optimizer.zero_grad(set_to_none=True)
    # DDP averages over ranks; weighting by the share makes it the full batch's mean
    (loss * (len(labels) * world / full) if world > 1 else loss).backward()
    run.optimizer.step()
    return loss.detach().float()
