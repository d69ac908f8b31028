"""The epoch loop shared by every method: batches, views, SGD + cosine, epoch checkpoints, resume."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from engine.artifacts.fingerprint import require_match
from engine.data.views import CropSpec, at_epoch
from engine.distributed import DistEnv, all_reduce_sum
from engine.errors import ConfigError
from engine import preemption
from engine.io import save_torch
from engine.squeeze.augment import AugmentSpec, apply_view_params, draw_view_params
from engine.training.batches import batches_of, load_batches
from engine.training.graphs import CapturedStep, plain_lr, require_cuda_graphs
from engine.training.precision import compiled, optimizer_options, to_device, to_device_all
from engine.training.schedule import cosine_lr, set_lr
from engine.training.tb_logger import NULL_LOGGER, MetricsLogger
from engine.training.trainers import DeepSpeedSettings, Trainer, build_trainer


class Interrupted(Exception):
    """Raised after an epoch checkpoint when a run was asked to stop early (simulates a kill)."""


@dataclass(frozen=True)
class Schedule:
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    warmup_epochs: int = 0


def rank_state_path(state_path: Path, rank: int, world_size: int) -> Path:
    """Each rank keeps its own state (queue, BN buffers, view generator, optimizer partition)."""
    return state_path if world_size == 1 else state_path.with_name(
        f"{state_path.stem}.rank{rank}of{world_size}{state_path.suffix}")


def rank_order(order: torch.Tensor, batch_size: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's share of each full global batch of ``order``, concatenated (batch_size / world each)."""
    count = len(order) // batch_size * batch_size
    batches = order[:count].view(-1, batch_size)
    return batches[:, rank::world_size].reshape(-1)


def train(method: nn.Module, dataset: Dataset, *, schedule: Schedule, spec: AugmentSpec | None,
          normalize: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
          generator: torch.Generator, state_path: Path, fingerprint: dict, resume: bool,
          stop_after_epochs: int | None = None, workers: int = 0, progress: bool = True,
          desc: str = "pretrain", on_epoch: Callable[[dict], None] | None = None,
          trainer: str = "single", dist: DistEnv | None = None,
          deepspeed: DeepSpeedSettings | None = None, loader=None, precision: str = "fp32",
          logger: MetricsLogger = NULL_LOGGER, cuda_graphs: bool = False,
          compile_encoders: bool = False) -> list[dict]:
    """Train ``method`` for ``schedule.epochs``; returns one metrics row per epoch.

    After every epoch the whole state (method incl. queue and momentum encoder, optimizer,
    generator, history) goes atomically to ``state_path`` (one file per rank when world > 1).
    With ``resume`` and a state there, training continues from it and ends bit-identical to an
    uninterrupted run on the CPU. ``fingerprint`` (plain settings) must match the saved one, so a
    resume never mixes configs.

    ``trainer`` (single | ddp | deepspeed, see engine.training.trainers) wraps the method. With
    world size W every global batch of ``schedule.batch_size`` is split: rank r takes its
    positions r, r+W, ... (the epoch order is the same on every rank); views are drawn from a
    per-rank generator so ranks do not repeat each other's crops.

    An image-folder tree (a dataset with ``crop_views``) is cropped at its own resolution: each
    batch holds ``views`` random resized crops of every full-resolution file (engine.data.views,
    seeded by (generator's seed, epoch, index), so a resume replays them), flipped as ``spec``
    says; ``augment_color`` adds the photometric steps. In-memory data is cropped on the device by
    ``augment_batch``.

    ``loader`` (an engine.loaders BatchLoader of this rank's shard: drop_last, batch_size / W,
    ``views=num_views``, [0, 1] floats, see engine.squeeze.stage) replaces the in-process batches:
    FFCV/DALI crop and flip while decoding (their randomness is their own, so a resume replays the
    order but not the crops), ``augment_color`` adds jitter/grayscale/blur, then ``normalize``.

    ``precision`` (auto | fp32 | bf16, ssl.precision): bf16 runs the method's loss under autocast (see
    engine.training.trainers.build_trainer); the optimizer is SGD with fused (CUDA) or foreach (CPU)
    kernels. ``logger`` gets per-step loss and lr and per-epoch loss and images/s (rank 0's).

    ``cuda_graphs`` (squeeze.cuda_graphs; CUDA, trainer single, data in memory): after a few eager steps the
    whole step (views, the method's forwards and loss, MoCo's key update and queue, backward, SGD) is
    captured as one CUDA graph and replayed for every batch (engine.training.graphs).

    ``compile_encoders`` (squeeze.compile; trainer single or ddp): the method's ``encoders()`` run through
    torch.compile while this trains (engine.training.precision.compiled); the first steps pay the compilation.
    With ``cuda_graphs`` the compiled kernels are captured with the rest of the step.
    """
    if compile_encoders:
        check_compile(trainer)
    run = _setup(method, dataset, schedule=schedule, spec=spec, normalize=normalize, device=device,
                 generator=generator, state_path=state_path, fingerprint=fingerprint, workers=workers,
                 progress=progress, desc=desc, trainer=trainer, dist=dist or DistEnv(device=device),
                 deepspeed=deepspeed, loader=loader, precision=precision)
    run.logger = logger if run.dist.is_main else NULL_LOGGER
    history, start_epoch = _restore(run) if resume else ([], 0)
    if cuda_graphs:  # after the restore, whose optimizer state would replace the groups' lr tensor
        _capture_steps(run)
    with compiled(method.encoders() if compile_encoders else []):
        history = _train_epochs(run, history, start_epoch, stop_after_epochs, on_epoch)
    run.wrapped.close()
    method.to(memory_format=torch.contiguous_format)
    return history


def _train_epochs(run: _Run, history: list[dict], start_epoch: int, stop_after_epochs: int | None,
                  on_epoch: Callable[[dict], None] | None) -> list[dict]:
    """Epochs ``start_epoch``.. of ``run``, each checkpointed; returns the history with their rows."""
    schedule, desc = run.schedule, run.desc
    for epoch in range(start_epoch, schedule.epochs):
        row = _run_epoch(run, epoch)
        run.logger.scalars({"epoch/loss": row["loss"], "epoch/images_per_s": row["images_per_s"],
                            "epoch/augment_fraction": row["augment_fraction"]}, epoch + 1)
        run.logger.flush()
        history.append(row)
        _save(run, epoch + 1, history)
        if on_epoch is not None:
            on_epoch(row)
        if stop_after_epochs is not None and epoch + 1 >= stop_after_epochs and epoch + 1 < schedule.epochs:
            raise Interrupted(f"{desc} stopped after epoch {epoch + 1} (squeeze.stop_after_epochs)")
        if epoch + 1 < schedule.epochs:  # preempted: the epoch in flight is finished and checkpointed
            preemption.check(f"epoch {epoch + 1} of {schedule.epochs} of {desc} (checkpoint {run.state_path})")
    return history


@dataclass
class _Run:
    """What every epoch of ``train`` uses, set up once by ``_setup``."""

    method: nn.Module
    wrapped: Trainer
    dataset: Dataset
    loader: object
    crops: Dataset | None
    """Full-resolution crop views of ``dataset`` (image trees), or None: crops happen on the device."""
    schedule: Schedule
    spec: AugmentSpec | None
    normalize: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device
    dist: DistEnv
    generator: torch.Generator
    """Draws each epoch's order (and, in one process, the views)."""
    view_generator: torch.Generator
    state_path: Path
    """This rank's state file."""
    fingerprint: dict
    micro_batch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    views: int
    workers: int
    progress: bool
    desc: str
    logger: MetricsLogger = NULL_LOGGER
    lr: torch.Tensor | None = None
    """The SGD groups' shared device lr of a CUDA-graph run (the step writes it); None: a float per step."""
    captured: CapturedStep | None = None


def check_cuda_graphs(device: torch.device, trainer: str, streams: str | None = None) -> None:
    """One line refusing squeeze.cuda_graphs where it cannot run: off CUDA, with a trainer other than one
    process's, or on data that streams (``streams``: how, e.g. "loader=ffcv")."""
    require_cuda_graphs(device, "squeeze.cuda_graphs")
    if trainer != "single":
        raise ConfigError(f"squeeze.cuda_graphs=true captures one process's step; this run trains with "
                          f"trainer={trainer}: set squeeze.cuda_graphs=false or run one process")
    if streams is not None:
        raise ConfigError(f"squeeze.cuda_graphs=true needs the training images in memory (built-in sets, or trees "
                          f"stored at their working size with data.eval_crop_ratio=1.0); this data streams "
                          f"({streams}): set squeeze.cuda_graphs=false")


def check_compile(trainer: str) -> None:
    """One line refusing squeeze.compile with DeepSpeed, whose engine owns the module's forward."""
    if trainer == "deepspeed":
        raise ConfigError("squeeze.compile=true compiles the encoders of trainer=single or ddp; DeepSpeed wraps the "
                          "forward itself: set squeeze.compile=false (or use trainer=ddp)")


def _capture_steps(run: _Run) -> None:
    """Make every later step of ``run`` a replay of one captured CUDA graph (after its eager warm-up)."""
    check_cuda_graphs(run.device, run.wrapped.name, f"loader={getattr(run.loader, 'name', 'external')}"
                      if run.loader is not None else "crops decoded from files" if run.crops is not None else None)
    optimizer = run.wrapped.optimizer
    run.lr = torch.tensor(float(optimizer.param_groups[0]["lr"]), dtype=torch.float32, device=run.device)
    for group in optimizer.param_groups:
        group["lr"] = run.lr
    run.captured = CapturedStep(lambda inputs: _memory_step(run, inputs), run.device,
                                before_capture=lambda: optimizer.zero_grad(set_to_none=True), key="squeeze.cuda_graphs")


def _setup(method: nn.Module, dataset: Dataset, *, schedule: Schedule, spec: AugmentSpec | None,
           normalize: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
           generator: torch.Generator, state_path: Path, fingerprint: dict, workers: int, progress: bool,
           desc: str, trainer: str, dist: DistEnv, deepspeed: DeepSpeedSettings | None, loader,
           precision: str = "fp32") -> _Run:
    """Check the batch split, place and wrap the method with its SGD, derive the per-rank state."""
    world = dist.world_size
    if len(dataset) < schedule.batch_size:
        raise ConfigError(f"batch_size={schedule.batch_size} exceeds the {len(dataset)} training images; "
                          f"lower ssl.batch_size")
    if schedule.batch_size % world or schedule.batch_size // world < 2:
        raise ConfigError(f"ssl.batch_size={schedule.batch_size} must split into equal shards of >= 2 "
                          f"images over {world} processes; use a multiple of {world}")
    micro_batch = schedule.batch_size // world
    # channels_last: 1.2-2x faster convolutions and BN on CPU (oneDNN) and GPU (cuDNN). DeepSpeed
    # views parameters as flat bytes (broadcast, ZeRO buffers), which needs the default layout.
    method.to(device=device, memory_format=torch.contiguous_format if trainer == "deepspeed"
              else torch.channels_last)
    # DeepSpeed steps our SGD on its own flat partitions: keep torch's default kernels there
    options = optimizer_options(device) if trainer != "deepspeed" else {}
    optimizer = torch.optim.SGD(method.trainable(), lr=schedule.lr, momentum=schedule.momentum,
                                weight_decay=schedule.weight_decay, **options)
    wrapped = build_trainer(trainer, method, optimizer, dist, (deepspeed or DeepSpeedSettings(), micro_batch),
                            precision)
    # One process draws views from the order generator (as it always has); several need their own.
    view_generator = generator if world == 1 else torch.Generator().manual_seed(
        int(torch.randint(2**62, (1,), generator=generator)) + dist.rank)
    steps_per_epoch = len(dataset) // schedule.batch_size if loader is None else len(loader)
    crops = None if loader is not None else crop_source(dataset, spec, getattr(method, "num_views"),
                                                         generator.initial_seed())
    return _Run(method=method, wrapped=wrapped, dataset=dataset, loader=loader, crops=crops,
                schedule=schedule, spec=spec,
                normalize=normalize, device=device, dist=dist, generator=generator,
                view_generator=view_generator, state_path=rank_state_path(state_path, dist.rank, world),
                fingerprint={**fingerprint, "world_size": world} if world > 1 else fingerprint,
                micro_batch=micro_batch, steps_per_epoch=steps_per_epoch,
                total_steps=steps_per_epoch * schedule.epochs,
                warmup_steps=steps_per_epoch * schedule.warmup_epochs, views=getattr(method, "num_views"),
                workers=workers, progress=progress, desc=desc)


def _restore(run: _Run) -> tuple[list[dict], int]:
    """(history, first epoch to run) from this rank's state file, loading the state into ``run``."""
    if not run.state_path.is_file():
        return [], 0
    state = torch.load(run.state_path, map_location="cpu", weights_only=False)
    require_match(run.state_path, state.get("fingerprint"), run.fingerprint, "pretraining checkpoint")
    run.method.load_state_dict(state["method"])
    run.wrapped.load_optimizer_state(state["optimizer"])
    run.generator.set_state(state["generator"])
    if run.dist.world_size > 1:
        run.view_generator.set_state(state["view_generator"])
    return state["history"], state["epoch"]


def _save(run: _Run, epochs_done: int, history: list[dict]) -> None:
    """The whole state after ``epochs_done`` epochs, atomically to this rank's state file."""
    optimizer = run.wrapped.optimizer_state()
    state = {"epoch": epochs_done, "method": run.method.state_dict(),
             "optimizer": plain_lr(optimizer) if run.lr is not None else optimizer,  # ZeRO's own layout: as it is
             "generator": run.generator.get_state(), "history": history, "fingerprint": run.fingerprint}
    if run.dist.world_size > 1:
        state["view_generator"] = run.view_generator.get_state()
    save_torch(state, run.state_path)


def _epoch_batches(run: _Run, epoch: int):
    """This rank's (images, labels) batches of ``epoch``: a fresh order, or the loader's."""
    if run.loader is not None:
        run.loader.set_epoch(epoch)
        return run.loader
    world = run.dist.world_size
    order = torch.randperm(len(run.dataset), generator=run.generator)
    mine = order if world == 1 else rank_order(order, run.schedule.batch_size, run.dist.rank, world)
    dataset = run.dataset if run.crops is None else at_epoch(run.crops, epoch)
    return load_batches(dataset, batches_of(mine, run.micro_batch, drop_last=True), run.workers)


PROGRESS_EVERY = 20
"""Steps between progress-bar loss updates (each a host read)."""


def _run_epoch(run: _Run, epoch: int) -> dict:
    """One epoch of SGD steps; returns its metrics row (loss and throughput over the whole world)."""
    run.method.train()
    step = epoch * run.steps_per_epoch
    seen, aug_seconds = 0, 0.0
    losses: list[tuple[int, float, int, torch.Tensor]] = []  # (step, lr, images, loss left on the device)
    started = time.perf_counter()
    bar = tqdm(_epoch_batches(run, epoch), total=run.steps_per_epoch,
               desc=f"{run.desc} {epoch + 1}/{run.schedule.epochs}",
               disable=not run.progress or not run.dist.is_main, leave=False)
    for images, labels in bar:
        lr = cosine_lr(step, run.total_steps, run.schedule.lr, run.warmup_steps)
        if run.lr is None:  # a CUDA-graph step writes its lr tensor itself
            set_lr(run.wrapped.optimizer, lr)
        loss, seconds = _train_step(run, images, labels, lr)
        aug_seconds += seconds
        seen += len(labels)
        step += 1
        losses.append((step, lr, len(labels), loss.detach().float()))
        if not bar.disable and step % PROGRESS_EVERY == 0:  # a host read only where someone watches
            bar.set_postfix(loss=f"{losses[-1][3].item():.4f}", lr=f"{lr:.4g}")
    # one host read per epoch: a read per step (item(), an isfinite check) waits for the device every step
    values = torch.stack([loss for *_, loss in losses]).cpu().tolist() if losses else []
    bad = next((v for v in values if not math.isfinite(v)), None)
    if bad is not None:  # raised before this epoch's checkpoint, so resume=true restarts from the last good one
        raise FloatingPointError(f"{run.desc}: loss became {bad} in epoch {epoch + 1}; lower ssl.lr")
    total_loss = 0.0
    for (index, step_lr, images, _), value in zip(losses, values):
        run.logger.scalars({"train/loss": value, "train/lr": step_lr}, index)
        total_loss += value * images
    seconds = time.perf_counter() - started
    if run.dist.world_size > 1:  # the row reports the whole world: mean loss over all images, total throughput
        total_loss, seen = all_reduce_sum([total_loss, float(seen)])
        seen = int(seen)
    return {"epoch": epoch + 1, "loss": total_loss / seen, "lr": lr, "seconds": seconds,
            "images_per_s": seen / seconds, "augment_fraction": aug_seconds / seconds}


def _train_step(run: _Run, images, labels: torch.Tensor, lr: float) -> tuple[torch.Tensor, float]:
    """One optimizer step at ``lr`` (already set, unless the step writes it): (its loss, left on the device;
    seconds spent drawing and making the views). Nothing in it reads the device back, so the host runs
    ahead of a GPU."""
    started = time.perf_counter()
    if run.crops is None and run.loader is None:  # in memory: one copy carries the batch and every draw
        host = _memory_inputs(run, images, labels, lr)
        seconds = time.perf_counter() - started
        if run.captured is not None:
            return run.captured(host), seconds
        return _memory_step(run, to_device_all(host, run.device)), seconds
    batch = _step_views(run, images)
    draws = to_device_all(_method_draws(run, batch[0].shape[0]), run.device)
    seconds = time.perf_counter() - started
    loss = run.wrapped.loss(batch, _step_labels(run, labels), draws)
    run.wrapped.backward(loss)
    run.wrapped.step()
    return loss, seconds


def _labels_moved(run: _Run) -> bool:
    """Whether the method gets its labels on the device: all but a label-free method (MoCo, SimCLR) in one
    process, which never reads them (a copy less per step; DDP and DeepSpeed move their inputs)."""
    return getattr(run.method, "uses_labels", True) or run.wrapped.name != "single"


def _step_labels(run: _Run, labels: torch.Tensor) -> torch.Tensor:
    """The labels as the method gets them (``_labels_moved``)."""
    return to_device(labels, run.device) if _labels_moved(run) else labels


def _method_draws(run: _Run, batch: int) -> list[torch.Tensor]:
    """The method's host-side draws for a step of ``batch`` images (none for a method without ``draw``)."""
    draw = getattr(run.method, "draw", None)
    return draw(batch, run.view_generator) if draw is not None else []


def _memory_inputs(run: _Run, images: torch.Tensor, labels: torch.Tensor, lr: float) -> list[torch.Tensor]:
    """An in-memory batch's host tensors for ``_memory_step``: the images, every view's drawn parameters, the
    method's draws, the labels where moved, and the lr of a CUDA-graph run (``run.lr``)."""
    batch = images.shape[0]
    drawn = [] if run.spec is None else [
        draw_view_params(batch, images.shape[1], run.spec.image_size, run.spec, run.view_generator)
        for _ in range(run.views)]
    host = [images, *drawn, *_method_draws(run, batch)]
    if _labels_moved(run):
        host.append(labels)
    if run.lr is not None:
        host.append(torch.tensor([lr], dtype=torch.float32))
    return host


def _memory_step(run: _Run, inputs: list[torch.Tensor]) -> torch.Tensor:
    """The step on ``_memory_inputs``' tensors on the device: views, loss, backward, optimizer step; returns the
    loss (detached). Its operations depend on the shapes alone, so a CUDA graph of one step serves all."""
    images, rest = inputs[0], list(inputs[1:])
    params = [rest.pop(0) for _ in range(run.views)] if run.spec is not None else [None] * run.views
    if run.lr is not None:
        run.lr.copy_(rest.pop().view(()))
    labels = rest.pop() if _labels_moved(run) else None
    draws = rest  # what remains: the method's draws
    views = [_view(images, run.spec, p, run.normalize).to(run.wrapped.input_dtype) for p in params]
    loss = run.wrapped.loss(views, labels, draws)
    run.wrapped.backward(loss)
    run.wrapped.step()
    return loss.detach()


def _step_views(run: _Run, images) -> list[torch.Tensor]:
    """The method's ``views`` augmented, normalized views of one streamed batch (crops decoded from files, or a
    loader's), in the trainer's input dtype: the batch and every view's random parameters reach the device in
    one copy."""
    if run.crops is not None:
        return [v.to(run.wrapped.input_dtype)
                for v in batch_views(images, run.views, run.spec, run.view_generator, run.normalize, run.device)]
    return [v.to(run.wrapped.input_dtype)
            for v in _loader_views(images, run.views, run.spec, run.view_generator, run.normalize, run.device)]


def crop_source(dataset: Dataset, spec: AugmentSpec | None, views: int, seed: int) -> Dataset | None:
    """``dataset``'s full-resolution crop views for ``spec``'s geometry (image-folder trees), or None
    (in-memory data, or no augmentation): then ``augment_batch`` crops on the device.

    The one switch between the two crop paths, for pretraining and anything else that trains on
    ``spec`` views of a real split (the probe): iterate ``at_epoch(source, epoch)`` and turn its
    batches into views with ``batch_views``."""
    if spec is None or not hasattr(dataset, "crop_views"):
        return None
    return dataset.crop_views(CropSpec(size=spec.image_size, scale=tuple(spec.crop_scale),
                                       ratio=tuple(spec.crop_ratio), views=views,
                                       flip=0.5 if spec.flip else 0.0, seed=seed))


def batch_views(images: torch.Tensor, views: int, spec: AugmentSpec, generator: torch.Generator,
                normalize: Callable[[torch.Tensor], torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """``views`` normalized channels_last views of a ``crop_source`` batch (uint8 [B,C,S,S] for one
    view, [B,V,C,S,S] for V): crops and flips are done, the photometric steps are added here."""
    crops = list(images.unbind(1)) if images.ndim == 5 else [images]
    return _loader_views(crops, views, spec, generator, normalize, device)


def _view(images: torch.Tensor, spec: AugmentSpec | None, params: torch.Tensor | None,
          normalize: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """One normalized channels_last view of ``images`` made with ``draw_view_params``' ``params``."""
    if spec is not None:
        x = apply_view_params(images, params, spec)
    else:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    return normalize(x).contiguous(memory_format=torch.channels_last)


def _loader_views(images, views: int, spec: AugmentSpec | None, generator: torch.Generator,
                  normalize: Callable[[torch.Tensor], torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """A loader batch ([v1, .., vk] cropped+flipped in [0, 1], or one eval batch when ``spec`` is
    None) -> ``views`` normalized channels_last views with the photometric steps applied. The crops and
    every view's drawn parameters reach the device in one copy."""
    many = isinstance(images, (list, tuple))
    sources = list(images) if many else [images]
    picks = range(len(sources)) if many else [0] * views  # one batch: identical views, as _view gives
    drawn = [] if spec is None else [
        draw_view_params(sources[i].shape[0], sources[i].shape[1], sources[i].shape[2], spec, generator, crop=False)
        for i in picks]
    moved = to_device_all([*sources, *drawn], device)
    sources, drawn = moved[:len(sources)], moved[len(sources):]
    out = []
    for k, i in enumerate(picks):
        v = sources[i]
        x = apply_view_params(v, drawn[k], spec, crop=False) if spec is not None else (
            v.float() / 255.0 if v.dtype == torch.uint8 else v.float())
        out.append(normalize(x).contiguous(memory_format=torch.channels_last))
    return out
