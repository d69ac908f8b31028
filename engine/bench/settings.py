"""Typed settings of the bench stage (``bench=default``: these dataclass defaults)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from engine.errors import ConfigError


@dataclass
class BenchConfig:
    """Bench: throughput of every stage, a recover-step breakdown, and a projection of a full run."""

    target: str = "current"
    """Run to project: current (the configured data) | imagenet1k | tinyimagenet | cifar100."""
    gpus: int = 1
    """Devices the projected run uses; work is assumed to split evenly (linear scaling)."""
    steps: int = 5
    """Timed steps per measurement (after ``warmup`` untimed ones)."""
    warmup: int = 2
    batch: Optional[int] = None
    """Recover batch; None: the run's own (recover.classes_per_batch, else min(50, classes))."""
    pretrain_batch: Optional[int] = None
    """Pretraining batch; None: ssl.batch_size (capped by the training split)."""
    eval_batch: Optional[int] = None
    """Student batch; None: evaluate.batch_size."""
    repeats: int = 3
    """Recover timings (engine and peer interleaved) per shape; the best is kept (1 for target shapes on CPU)."""
    peer: bool = True
    """Also time the peer-style recover loop (hooks + activation copies) on the same shapes."""
    variants: bool = True
    """Also time recover by option on each recover shape: the floor (teacher forward + input backward)
    and this engine at each of ``groups`` class-batches per step, fp32/bf16, CUDA graphs off/on
    (engine.bench.recover_variants; options this build lacks print n/a)."""
    groups: Optional[list[int]] = None
    """Groups per step tried by ``variants``; None: [1, 2, 4, 8] on CUDA, [1, 2] on CPU."""
    precisions: Optional[list[str]] = None
    """Precisions timed by ``variants`` (fp32 | bf16); None: both on CUDA, fp32 on CPU."""
    breakdown_steps: int = 3
    """Recover steps run under torch.profiler for the per-phase breakdown (0: skip it)."""
    trace: bool = False
    """Write the profiled steps as a chrome trace (recover_trace.json, open in chrome://tracing or Perfetto)."""
    measure_target: bool = True
    """When the target's model/size differ from the configured ones, time the target's model at the
    target's size on synthetic tensors and project from those rates."""
    target_steps: Optional[int] = None
    """Timed steps of target-shape measurements; None: 2 on CPU (big models are slow there), else ``steps``."""
    target_warmup: Optional[int] = None
    """None: 1 on CPU, else ``warmup``."""
    target_batch: Optional[int] = None
    """Batch of every target-shape measurement; None: 4 on CPU, else each stage's own batch."""
    ssl_epochs: Optional[int] = None
    """Pretraining epochs to project; None: the target's (paper: 200; current: ssl.epochs)."""
    eval_epochs: Optional[int] = None
    """Student epochs to project; None: the target's (paper: 300; current: evaluate.epochs)."""

    def __post_init__(self) -> None:
        from engine.bench.targets import TARGET_NAMES

        if self.target not in TARGET_NAMES:
            raise ConfigError(f"bench.target={self.target!r} is not one of {'|'.join(TARGET_NAMES)}")
        if self.gpus < 1:
            raise ConfigError(f"bench.gpus={self.gpus} must be >= 1")
        if self.steps < 1 or self.warmup < 0:
            raise ConfigError(f"bench.steps={self.steps} must be >= 1 and bench.warmup={self.warmup} >= 0")
        if self.repeats < 1:
            raise ConfigError(f"bench.repeats={self.repeats} must be >= 1")
        if self.breakdown_steps < 0:
            raise ConfigError(f"bench.breakdown_steps={self.breakdown_steps} must be >= 0")
        for name in ("batch", "pretrain_batch", "eval_batch", "target_batch", "target_steps",
                     "ssl_epochs", "eval_epochs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"bench.{name}={value} must be >= 1 (or null for the default)")
        if self.pretrain_batch is not None and self.pretrain_batch < 2:
            raise ConfigError(f"bench.pretrain_batch={self.pretrain_batch} must be >= 2 (BatchNorm needs a batch)")
        if self.groups is not None and (not self.groups or min(self.groups) < 1):
            raise ConfigError(f"bench.groups={self.groups} must be a non-empty list of integers >= 1 (or null)")
        if self.precisions is not None and (not self.precisions
                                            or any(p not in ("fp32", "bf16") for p in self.precisions)):
            raise ConfigError(f"bench.precisions={self.precisions} must be a non-empty list of fp32|bf16 (or null)")
        if self.target_warmup is not None and self.target_warmup < 0:
            raise ConfigError(f"bench.target_warmup={self.target_warmup} must be >= 0")
