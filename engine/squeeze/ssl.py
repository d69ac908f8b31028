"""Pretraining objectives as modules, in a registry keyed by the ``ssl=`` config name.

Each method wraps the ClassifierNet that becomes the teacher and owns whatever else training
needs (projection head, momentum encoder, queue), so one ``state_dict()`` captures a resumable
state. ``draw(batch, generator)`` makes the host-side random draws of a step (MoCo: the shuffle-BN order),
which reach the device with the batch in one copy; ``loss(views, labels, draws)`` returns the batch loss from
the normalized views and those draws on the device.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import ConfigError
from engine.training.precision import check_precision
from engine.models import ClassifierNet
from engine.squeeze.losses import infonce_moco, momentum_update, nt_xent


@dataclass
class TrainSettings:
    """Optimization shared by every method (SGD with momentum, per-step cosine after warmup).

    Each method's subclass sets its own defaults (``ssl=mocov2|simclr|supervised``, ``SSL_PRESETS``);
    the ones here are MoCo v2's."""

    name: str = "mocov2"
    """The ``METHODS`` entry: mocov2 | simclr | supervised."""
    epochs: int = 12
    batch_size: int = 128
    lr: float = 0.06
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 0
    augment: str = "strong"
    """View recipe: strong (small-image spec for <=32 px, large-image spec with blur above) |
    weak (mild crop + flip on RGB) | none."""
    init_from: Optional[str] = None
    """Start from a public checkpoint instead of pretraining: a file path (MoCo v1/v2/v3, DINO, SwAV,
    BYOL-style, torchvision or this engine's teacher files) or ``torchvision:<arch>`` from the local
    torchvision cache. Never downloaded."""
    precision: str = "auto"
    """auto (bf16 on CUDA and on a CPU with native bf16, else fp32) | fp32 | bf16: the encoders' forwards under bf16 autocast, for
    every trainer (trainer=deepspeed: its autocast; deepspeed.bf16 null follows this, a contradiction is
    refused) and for the probe's frozen features. Weights, SGD state, BN running statistics, MoCo's key
    encoder (its EMA) and queue and the losses stay fp32 (tests/squeeze/test_squeeze_precision.py)."""

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"ssl.epochs={self.epochs} must be >= 1")
        if self.batch_size < 2:
            raise ConfigError(f"ssl.batch_size={self.batch_size} must be >= 2 (BatchNorm needs a batch)")
        if self.lr <= 0:
            raise ConfigError(f"ssl.lr={self.lr} must be > 0")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ConfigError(f"ssl.weight_decay={self.weight_decay} must be >= 0 and "
                              f"ssl.momentum={self.momentum} in [0, 1)")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ConfigError(f"ssl.warmup_epochs={self.warmup_epochs} must be in [0, epochs)")
        check_precision(self.precision, "ssl.precision")
        if self.init_from is not None and not self.init_from.strip():
            raise ConfigError("ssl.init_from is empty; give a checkpoint file or torchvision:<arch>, or null to train")


@dataclass
class MoCoSettings(TrainSettings):
    """MoCo v2 (the paper's public recipe: SGD, cosine, MLP head, T 0.2, queue), sized for MNIST-5k
    on CPU: 15 epochs x 31 steps of 128 reach ~95% probe top-1 (10 epochs: 94.9%).
    Paper: lr 0.03-0.06, batch 256, 200 epochs. (name, epochs, batch_size, lr: TrainSettings'.)"""

    temperature: float = 0.2
    proj_hidden_dim: Optional[int] = 512
    """Hidden width of the MLP head; None: the backbone's feature width (MoCo v2's head: 2048 for
    ResNet-50, 512 for ResNet-18)."""
    proj_dim: int = 128
    queue_size: Optional[int] = None
    """Negatives K. It must stay below the training split, else the queue holds every image's own key of
    the previous epoch as a negative. None: 4096, or for smaller splits the largest power of two below
    the split (MNIST-5k: 2048)."""
    key_momentum: float = 0.99
    """MoCo's m for the key encoder (0.999 in the paper's 200-epoch ImageNet recipe; the few steps
    here need faster keys)."""
    shuffle_groups: int = 4
    """Keys are forwarded in this many shuffled sub-batches: MoCo's shuffle-BN on one device."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temperature <= 0:
            raise ConfigError(f"ssl.temperature={self.temperature} must be > 0")
        if (self.queue_size is not None and self.queue_size < 1) or self.proj_dim < 1 or (
                self.proj_hidden_dim is not None and self.proj_hidden_dim < 1):
            raise ConfigError("ssl.queue_size, ssl.proj_dim and ssl.proj_hidden_dim must be >= 1")
        if not 0 <= self.key_momentum < 1:
            raise ConfigError(f"ssl.key_momentum={self.key_momentum} must be in [0, 1)")
        if not 1 <= self.shuffle_groups <= self.batch_size // 2:
            raise ConfigError(f"ssl.shuffle_groups={self.shuffle_groups} must be in [1, batch_size/2]")


DEFAULT_QUEUE = 4096


def fit_to_data(settings: TrainSettings, train_size: int) -> TrainSettings:
    """``settings`` with values left to the data resolved (MoCo's queue_size None)."""
    if isinstance(settings, MoCoSettings) and settings.queue_size is None:
        queue = DEFAULT_QUEUE if train_size > DEFAULT_QUEUE else 2 ** max(0, (train_size - 1).bit_length() - 1)
        return dataclasses.replace(settings, queue_size=queue)
    return settings


def check_queue(settings: TrainSettings, train_size: int) -> None:
    """A MoCo queue as large as the training split would hold each image's own older key as a negative."""
    if isinstance(settings, MoCoSettings) and settings.queue_size is not None and settings.queue_size >= train_size:
        raise ConfigError(f"ssl.queue_size={settings.queue_size} must be below the {train_size} training images "
                          f"(the queue would hold each image's own key as a negative); lower it or set null")


@dataclass
class SimCLRSettings(TrainSettings):
    """SimCLR: NT-Xent over two views of each image."""

    name: str = "simclr"
    epochs: int = 30
    batch_size: int = 256
    lr: float = 0.3
    temperature: float = 0.5
    proj_hidden_dim: int = 512
    proj_dim: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temperature <= 0:
            raise ConfigError(f"ssl.temperature={self.temperature} must be > 0")


@dataclass
class SupervisedSettings(TrainSettings):
    """Supervised teacher (SRe2L-style): backbone + classifier trained with cross-entropy.
    MNIST-5k, 8 epochs: batch 64 / lr 0.1 / no augmentation 97.5% top-1; batch 128 lr 0.1: 97.3%;
    weak augmentation (crop 0.5-1): 96.6%."""

    name: str = "supervised"
    epochs: int = 8
    batch_size: int = 64
    lr: float = 0.1
    augment: str = "none"
    """none | weak: mild crop (+ flip on RGB) | strong: the SSL views."""
    label_smoothing: float = 0.0


def fp32_loss(loss: Callable[..., torch.Tensor], *tensors: torch.Tensor, **options) -> torch.Tensor:
    """``loss`` of fp32 copies of ``tensors`` with autocast off: under bf16 autocast the similarity matmuls
    and the softmax would otherwise run in bf16 (no-op casts in fp32)."""
    kind = tensors[0].device.type
    # a device without autocast (meta, where tests run steps shape-only) has none to turn off
    with torch.autocast(kind, enabled=False) if torch.amp.is_autocast_available(kind) else contextlib.nullcontext():
        return loss(*[t.float() if t.is_floating_point() else t for t in tensors], **options)


def projection_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Module:
    """MoCo v2 / SimCLR MLP head; discarded after pretraining (the teacher keeps only the backbone)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


class MoCo(nn.Module):
    """MoCo v2: query encoder + MLP head, momentum key encoder, queue of negatives."""

    num_views = 2
    uses_labels = False

    def __init__(self, model: ClassifierNet, s: MoCoSettings, generator: torch.Generator) -> None:
        super().__init__()
        self.model = model
        self.head = projection_head(model.feature_dim, s.proj_hidden_dim or model.feature_dim, s.proj_dim)
        self.key_backbone = copy.deepcopy(model.backbone)
        self.key_head = copy.deepcopy(self.head)
        for p in [*self.key_backbone.parameters(), *self.key_head.parameters()]:
            p.requires_grad_(False)
        queue = torch.randn(s.queue_size or DEFAULT_QUEUE, s.proj_dim, generator=generator)
        self.register_buffer("queue", F.normalize(queue, dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.temperature = s.temperature
        self.key_momentum = s.key_momentum
        self.shuffle_groups = s.shuffle_groups

    def trainable(self) -> list[nn.Parameter]:
        return [*self.model.backbone.parameters(), *self.head.parameters()]

    def encoders(self) -> list[nn.Module]:
        """The modules whose forwards a step runs (squeeze.compile compiles each)."""
        return [self.model.backbone, self.head, self.key_backbone, self.key_head]

    def _query_params(self):
        return [*self.model.backbone.parameters(), *self.head.parameters()]

    def _key_params(self):
        return [*self.key_backbone.parameters(), *self.key_head.parameters()]

    def draw(self, batch: int, generator: torch.Generator) -> list[torch.Tensor]:
        """The step's shuffle-BN order of the keys' batch (host)."""
        return [torch.randperm(batch, generator=generator)]

    @torch.no_grad()
    def _keys(self, x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        # One device has no cross-GPU shuffle; forwarding shuffled sub-batches gives each its own
        # BN statistics, so a query cannot find its key through shared batch statistics.
        chunks = [self.key_head(self.key_backbone(part)) for part in x[order].chunk(self.shuffle_groups)]
        keys = torch.empty_like(torch.cat(chunks))
        keys[order] = torch.cat(chunks)
        return F.normalize(keys, dim=1)

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor) -> None:
        size = self.queue.shape[0]
        # the pointer stays on the device: reading it (int(queue_ptr)) would wait for the GPU every step
        index = (torch.arange(keys.shape[0], device=keys.device) + self.queue_ptr) % size
        keys = keys.to(self.queue.dtype)  # bf16 keys under autocast; the queue stays fp32
        self.queue[index] = keys[-size:] if keys.shape[0] > size else keys
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % size)

    def loss(self, views: list[torch.Tensor], labels: torch.Tensor, draws: list[torch.Tensor]) -> torch.Tensor:
        x_q, x_k = views
        q = self.head(self.model.backbone(x_q))
        momentum_update(self._key_params(), self._query_params(), self.key_momentum)
        k = self._keys(x_k, draws[0])
        loss = fp32_loss(infonce_moco, q, k, self.queue.clone(), temperature=self.temperature)
        self._enqueue(k)
        return loss


class SimCLR(nn.Module):
    """SimCLR: one encoder + MLP head, NT-Xent over both views (BN sees both views together)."""

    num_views = 2
    uses_labels = False

    def __init__(self, model: ClassifierNet, s: SimCLRSettings, generator: torch.Generator) -> None:
        super().__init__()
        self.model = model
        self.head = projection_head(model.feature_dim, s.proj_hidden_dim, s.proj_dim)
        self.temperature = s.temperature

    def trainable(self) -> list[nn.Parameter]:
        return [*self.model.backbone.parameters(), *self.head.parameters()]

    def encoders(self) -> list[nn.Module]:
        return [self.model.backbone, self.head]

    def draw(self, batch: int, generator: torch.Generator) -> list[torch.Tensor]:
        return []

    def loss(self, views: list[torch.Tensor], labels: torch.Tensor, draws: list[torch.Tensor]) -> torch.Tensor:
        z = self.head(self.model.backbone(torch.cat(views)))
        z1, z2 = z.chunk(2)
        return fp32_loss(nt_xent, z1, z2, temperature=self.temperature)


class Supervised(nn.Module):
    """SRe2L-style teacher: backbone + classifier trained with cross-entropy."""

    num_views = 1
    uses_labels = True

    def __init__(self, model: ClassifierNet, s: SupervisedSettings, generator: torch.Generator) -> None:
        super().__init__()
        self.model = model
        self.label_smoothing = s.label_smoothing

    def trainable(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def encoders(self) -> list[nn.Module]:
        return [self.model]

    def draw(self, batch: int, generator: torch.Generator) -> list[torch.Tensor]:
        return []

    def loss(self, views: list[torch.Tensor], labels: torch.Tensor, draws: list[torch.Tensor]) -> torch.Tensor:
        return fp32_loss(F.cross_entropy, self.model(views[0]), labels, label_smoothing=self.label_smoothing)


@dataclass(frozen=True)
class MethodSpec:
    settings: type[TrainSettings]
    build: Callable[[ClassifierNet, TrainSettings, torch.Generator], nn.Module]
    kind: str
    """Teacher kind written into the checkpoint: 'ssl' or 'supervised'."""


METHODS: dict[str, MethodSpec] = {
    "mocov2": MethodSpec(MoCoSettings, MoCo, "ssl"),
    "simclr": MethodSpec(SimCLRSettings, SimCLR, "ssl"),
    "supervised": MethodSpec(SupervisedSettings, Supervised, "supervised"),
}


SSL_PRESETS: dict[str, TrainSettings] = {
    "mocov2": MoCoSettings(),
    "simclr": SimCLRSettings(),
    "supervised": SupervisedSettings(),
}
"""The ``ssl=`` options (``scdd ssl=NAME``): each method's settings with their defaults, registered
with Hydra by engine.config_store (``supervised`` is also squeeze.supervised's default)."""


def method_spec(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ConfigError(f"unknown ssl method '{name}'; choose ssl= one of {sorted(METHODS)}")
    return METHODS[name]
