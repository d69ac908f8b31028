"""How a pretraining method is stepped: one process, DDP, or DeepSpeed (registry ``TRAINERS``).

The method (an ``engine.squeeze.ssl`` module) never wraps itself; ``build_trainer`` wraps it here
and returns a ``Trainer`` whose ``loss``/``backward``/``step`` the epoch loop calls the same way
for every kind. Parameters stay whole on every rank (DDP replicates them, ZeRO 0-2 partitions only
optimizer state and gradients), so the unwrapped method holds the trained weights throughout and
the teacher checkpoint is written from it as in one process.

Per-rank choices worth knowing:
- Buffers are synced at start only (DDP ``forward_sync_buffers=False``, as DeepSpeed): MoCo's
  queue holds each rank's own keys, BN running statistics follow each rank's shard; the squeeze
  stage averages BN statistics across ranks before saving the teacher.
- Parameters outside ``method.trainable()`` (e.g. the classifier of an SSL teacher) are frozen
  while wrapped, so DDP does not wait for gradients that never come.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from engine.distributed import DistEnv, ensure_process_group
from engine.errors import ConfigError
from engine.training.precision import autocast, check_precision, resolve_precision

ZERO_STAGES = (0, 1, 2)
"""ZeRO-3 shards the parameters themselves; MoCo's momentum encoder reads them whole, so it is refused."""


@dataclass
class DeepSpeedSettings:
    """The ``deepspeed=`` group (used with ``trainer=deepspeed``); options in ``DEEPSPEED_PRESETS``."""

    zero_stage: int = 1
    bf16: Optional[bool] = None
    """None: as ssl.precision says (its auto: bf16 on CUDA and on a CPU with native bf16, else fp32); set, it must agree with an
    explicit ssl.precision (a contradiction is refused). bf16 runs the forward under torch.autocast(bfloat16)
    (DeepSpeed's ``torch_autocast``; convolution/linear gradients are all-reduced in bf16); weights,
    optimizer state, the MoCo key encoder and the BN running statistics recover matches stay fp32.
    DeepSpeed's own ``bf16`` mode would cast the whole module: MoCo's momentum update (1 - m =
    0.01-0.001 of a weight) is below bf16's resolution and the BN statistics would be rounded."""
    path: Optional[str] = None
    """A user DeepSpeed JSON; its keys win over the generated ones except batch sizes, which the
    engine sets from ssl.batch_size and the world size."""
    shm_comm: bool = False
    """CPU only: DeepSpeed's shared-memory all-reduce op (compiles for 30-160 s on first use);
    off uses gloo's collectives."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Further DeepSpeed config keys merged into the generated config."""

    def __post_init__(self) -> None:
        if self.zero_stage not in ZERO_STAGES:
            raise ConfigError(f"deepspeed.zero_stage={self.zero_stage} is not supported; use one of "
                              f"{list(ZERO_STAGES)} (deepspeed=zero0|zero1|zero2)")


DEEPSPEED_PRESETS: dict[str, DeepSpeedSettings] = {
    # Stage 0: plain data parallel, no partitioning.
    "zero0": DeepSpeedSettings(zero_stage=0),
    # Stage 1: optimizer state partitioned across ranks.
    "zero1": DeepSpeedSettings(zero_stage=1),
    # Stage 2: optimizer state and gradients partitioned.
    "zero2": DeepSpeedSettings(zero_stage=2),
}
"""The ``deepspeed=`` options (``scdd trainer=deepspeed deepspeed=NAME``), registered with Hydra by
engine.config_store."""

DEEPSPEED_DEFAULT = "zero1"
"""The ``deepspeed=`` option ``trainer=deepspeed`` selects when none is given."""


@dataclass
class TrainerConfig:
    """The ``trainer=`` group; options in ``TRAINER_PRESETS``."""

    name: str = "auto"
    """auto: single for one process, ddp when torchrun/srun start more (the launchers need no
    trainer=) | single: one process trains the teacher (refused with more) | ddp:
    DistributedDataParallel, each rank takes ssl.batch_size / world images of every batch (a world
    of 1 works too) | deepspeed: DeepSpeed ZeRO (torch SGD; the stage comes from the deepspeed=
    group). Rank 0 writes the teacher as squeeze/<kind>/teacher.pt (plain checkpoint) in every case."""


TRAINER_PRESETS: dict[str, TrainerConfig] = {
    "auto": TrainerConfig(name="auto"),
    "single": TrainerConfig(name="single"),
    "ddp": TrainerConfig(name="ddp"),
    "deepspeed": TrainerConfig(name="deepspeed"),
}
"""The ``trainer=`` options (``scdd trainer=NAME``), registered with Hydra by engine.config_store
(trainer=deepspeed also selects ``deepspeed=DEEPSPEED_DEFAULT``)."""


def deepspeed_config(settings: DeepSpeedSettings, micro_batch: int, world_size: int,
                     device: torch.device, precision: str = "auto") -> dict:
    """The DeepSpeed config dict: generated from ``settings``, or read from ``settings.path``.

    ``precision`` (ssl.precision) and DeepSpeed's autocast are one switch: deepspeed.bf16 None follows
    it, and an explicit fp32|bf16 that the final config contradicts is refused."""
    check_precision(precision, "ssl.precision")
    bf16 = settings.bf16 if settings.bf16 is not None else resolve_precision(precision, device) == "bf16"
    config: dict[str, Any] = {
        "zero_optimization": {"stage": settings.zero_stage},
        # bf16 as autocast around the forward: the module stays fp32 (see DeepSpeedSettings.bf16)
        "torch_autocast": {"enabled": bool(bf16), "dtype": "bfloat16"},
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        # our optimizer is torch SGD (no fused op to compile); ZeRO refuses it without this
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    config.update(copy.deepcopy(settings.extra))
    if settings.path:
        path = Path(settings.path)
        if not path.is_file():
            raise ConfigError(f"deepspeed.path={path} does not exist; give a DeepSpeed JSON file or pick "
                              f"deepspeed=zero0|zero1|zero2")
        try:
            user = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"deepspeed.path={path} is not valid JSON ({exc.msg} at line {exc.lineno} "
                              f"column {exc.colno}); fix the file") from None
        if not isinstance(user, dict):
            raise ConfigError(f"deepspeed.path={path} must hold a JSON object, not {type(user).__name__}")
        if "optimizer" in user or "scheduler" in user:
            raise ConfigError(f"deepspeed.path={path} sets 'optimizer'/'scheduler'; remove them: the engine "
                              f"steps its own SGD with the ssl.* learning-rate schedule")
        config.update(user)
        config.setdefault("zero_allow_untested_optimizer", True)
    cast = [key for key in ("bf16", "fp16") if isinstance(config.get(key), dict) and config[key].get("enabled")]
    if cast:
        source = f"deepspeed.path={settings.path}" if settings.path else "deepspeed.extra"
        raise ConfigError(f"{source} enables DeepSpeed's {cast[0]} mode, which casts the whole module (MoCo's "
                          f"key encoder, the BN running statistics); remove it and set deepspeed.bf16=true "
                          f"(autocast, fp32 weights) or a 'torch_autocast' section")
    autocasts = bool((config.get("torch_autocast") or {}).get("enabled"))
    if precision != "auto" and autocasts != (precision == "bf16"):
        source = ("deepspeed.path" if settings.path else "deepspeed.bf16" if settings.bf16 is not None
                  else "deepspeed.extra")
        raise ConfigError(f"ssl.precision={precision} contradicts {source} (DeepSpeed autocast "
                          f"{'on' if autocasts else 'off'}); set one of them only (deepspeed.bf16=null follows "
                          f"ssl.precision)")
    stage = (config.get("zero_optimization") or {}).get("stage", 0)
    if stage not in ZERO_STAGES:
        raise ConfigError(f"DeepSpeed zero_optimization.stage={stage!r} is not supported; use one of "
                          f"{list(ZERO_STAGES)}")
    config["train_micro_batch_size_per_gpu"] = micro_batch
    config["gradient_accumulation_steps"] = 1
    config["train_batch_size"] = micro_batch * world_size
    return config


class _LossModule(nn.Module):
    """Makes ``method.loss`` the forward, so DDP/DeepSpeed hooks run around it."""

    def __init__(self, method: nn.Module) -> None:
        super().__init__()
        self.method = method

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor, draws: list[torch.Tensor]):
        return self.method.loss(views, labels, draws)


@dataclass
class Trainer:
    """What the epoch loop needs, whatever wraps the method."""

    name: str
    optimizer: Any
    """Exposes ``param_groups`` (the lr is set there each step)."""
    loss: Callable[[list[torch.Tensor], torch.Tensor, list[torch.Tensor]], torch.Tensor]
    """(views, labels, the method's draws on the device) -> the batch loss."""
    backward: Callable[[torch.Tensor], None]
    step: Callable[[], None]
    optimizer_state: Callable[[], dict]
    load_optimizer_state: Callable[[dict], None]
    close: Callable[[], None]
    input_dtype: torch.dtype = torch.float32
    """Views are handed over in fp32 by every trainer: a bf16 one casts inside its autocast region."""


def _freeze_untrained(method: nn.Module, trainable: list[nn.Parameter]) -> Callable[[], None]:
    keep = {id(p) for p in trainable}
    frozen = [p for p in method.parameters() if p.requires_grad and id(p) not in keep]
    for p in frozen:
        p.requires_grad_(False)

    def restore() -> None:
        for p in frozen:
            p.requires_grad_(True)

    return restore


def _autocast_loss(loss: Callable, precision: str, device: torch.device) -> Callable:
    """``loss`` with its forward under bf16 autocast (precision bf16), as DeepSpeed's torch_autocast does."""
    if resolve_precision(precision, device) != "bf16":
        return loss

    def autocast_loss(views, labels, draws):
        with autocast("bf16", device):
            return loss(views, labels, draws)

    return autocast_loss


def _single(method, optimizer, dist, ds) -> Trainer:
    if dist.world_size > 1:
        raise ConfigError(f"trainer=single runs one process but the world size is {dist.world_size}; "
                          f"use trainer=ddp or trainer=deepspeed under torchrun/srun (or leave trainer= "
                          f"unset: auto picks ddp)")

    def backward(loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()

    return Trainer("single", optimizer, _autocast_loss(method.loss, ds[2], dist.device), backward,
                   optimizer.step, optimizer.state_dict, optimizer.load_state_dict, lambda: None)


def wrap_ddp(module: nn.Module, dist: DistEnv, **options) -> nn.parallel.DistributedDataParallel:
    """DDP around ``module`` (already on ``dist.device``), joining the process group if needed."""
    ensure_process_group(dist)
    return nn.parallel.DistributedDataParallel(
        module, device_ids=[dist.device] if dist.device.type == "cuda" else None, **options)


def _ddp(method, optimizer, dist, ds) -> Trainer:
    restore = _freeze_untrained(method, [p for g in optimizer.param_groups for p in g["params"]])
    wrapped = wrap_ddp(_LossModule(method), dist, forward_sync_buffers=False)

    def backward(loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()

    return Trainer("ddp", optimizer, _autocast_loss(wrapped, ds[2], dist.device), backward, optimizer.step,
                   optimizer.state_dict, optimizer.load_state_dict, restore)


def _deepspeed(method, optimizer, dist, ds) -> Trainer:
    settings, micro_batch, precision = ds
    config = deepspeed_config(settings, micro_batch, dist.world_size, dist.device, precision)
    ensure_process_group(dist)
    import deepspeed
    import deepspeed.ops

    if dist.device.type == "cpu" and not settings.shm_comm:
        # Read by deepspeed.comm when it wraps the process group; gloo does the collectives instead.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    restore = _freeze_untrained(method, [p for g in optimizer.param_groups for p in g["params"]])
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=_LossModule(method), optimizer=optimizer,
                                                      config=config, dist_init_required=False)
    zero = config["zero_optimization"].get("stage", 0) > 0

    def load_optimizer_state(state: dict) -> None:
        if zero:  # ZeRO keeps this rank's partition; it expects a list indexed by data-parallel rank
            ds_optimizer.load_state_dict([state if r == dist.rank else None for r in range(dist.world_size)],
                                         load_from_fp32_weights=False)
        else:
            ds_optimizer.load_state_dict(state)

    return Trainer("deepspeed", ds_optimizer, engine, engine.backward, engine.step, ds_optimizer.state_dict,
                   load_optimizer_state, restore)


def resolve_trainer(name: str, world_size: int) -> str:
    """The trainer that runs: ``auto`` is single for one process and ddp for more; others as named."""
    if name not in TRAINERS:
        raise ConfigError(f"unknown trainer '{name}'; choose trainer= one of {sorted(TRAINERS)}")
    if name == "auto":
        return "single" if world_size == 1 else "ddp"
    return name


def _auto(method, optimizer, dist, ds) -> Trainer:
    return TRAINERS[resolve_trainer("auto", dist.world_size)](method, optimizer, dist, ds)


TRAINERS: dict[str, Callable[..., Trainer]] = {"auto": _auto, "single": _single, "ddp": _ddp,
                                               "deepspeed": _deepspeed}


def build_trainer(name: str, method: nn.Module, optimizer: torch.optim.Optimizer, dist: DistEnv,
                  deepspeed: Optional[tuple[DeepSpeedSettings, int]] = None, precision: str = "fp32") -> Trainer:
    """Wrap ``method`` (already on its device) and ``optimizer`` for trainer ``name``.

    ``deepspeed`` is (settings, per-rank micro batch) and is needed for name='deepspeed'.
    ``precision`` (auto | fp32 | bf16): bf16 runs ``loss`` under autocast (DeepSpeed: its torch_autocast,
    which must agree); the module, its optimizer state and buffers stay fp32.
    """
    if name not in TRAINERS:
        raise ConfigError(f"unknown trainer '{name}'; choose trainer= one of {sorted(TRAINERS)}")
    check_precision(precision, "ssl.precision")
    settings, micro_batch = deepspeed if deepspeed is not None else (DeepSpeedSettings(), 1)
    return TRAINERS[name](method, optimizer, dist, (settings, micro_batch, precision))
