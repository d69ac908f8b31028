"""What every stage receives from the entry point: run folder, process placement, shared configs."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Optional

import numpy as np

from engine.artifacts.layout import RunLayout
from engine.data import DataBundle, DataConfig, build_data
from engine.distributed import DistEnv, configure_determinism
from engine.errors import ConfigError
from engine.models import ModelConfig


@dataclass
class RunConfig:
    """Top-level keys of the composed config (registered as ``run_config`` in configs/config.yaml's
    defaults list by engine.config_store)."""

    stage: str = "pipeline"
    """squeeze | recover | relabel | evaluate | pipeline | merge | bench."""
    seed: int = 0
    seeds: Optional[list[int]] = None
    """stage=pipeline: run the whole pipeline once per seed into <run>/seed<s>/ (each a normal run dir
    with seed=s), then write the root report: every row as mean ± sample sd over the seeds. None: one
    run with ``seed``."""
    device: str = "auto"
    """auto (CUDA when present) | cpu | cuda."""
    resume: bool = False
    """Continue an interrupted run in the same run directory (hydra.run.dir=...)."""
    ipc: list[int] = field(default_factory=lambda: [1, 10])
    """Images per class; a list runs recover/evaluate for each."""
    teacher: str | None = None
    """Teacher checkpoint for stages run alone; None means the one squeeze wrote in this run dir."""
    progress: bool = True
    deterministic: bool = False
    """Bit-identical reruns and kill/resume on a GPU as on the CPU (same device type and world size):
    torch.use_deterministic_algorithms(True), cudnn.deterministic (benchmark off) and
    CUBLAS_WORKSPACE_CONFIG=:4096:8; recover resizes its crops with matrix products instead of
    F.interpolate (same values to ~1e-6; PyTorch has no deterministic CUDA backward for it). Costs
    speed: on CUDA cuDNN's autotuned and atomics-based kernels are not used (not measured here: no
    GPU); on the CPU, deterministic either way, the matrix resize measured 1.04x per recover step
    (ConvNet 28 px, batch 100: 140 -> 145 ms) and 1.015x (ResNet-18 CIFAR 32 px: 2.13 -> 2.16 s), one
    thread, shared 2-core machine. false (default): CPU runs are bit-identical across runs anyway."""

    def __post_init__(self) -> None:
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)
                                       or any(s < 0 for s in self.seeds)):
            raise ConfigError(f"seeds={list(self.seeds)} must be null or a non-empty list of distinct seeds >= 0")
        if self.seeds is not None and self.stage != "pipeline":
            raise ConfigError(f"seeds={list(self.seeds)} runs the whole pipeline per seed; it needs stage=pipeline "
                              f"(stage={self.stage}: use seed=S)")
        if not self.ipc or any(n < 1 for n in self.ipc):
            raise ConfigError(f"ipc={list(self.ipc)} must be a non-empty list of images-per-class counts, "
                              f"each >= 1")


@dataclass
class RunContext:
    run: RunConfig
    data_cfg: DataConfig
    model_cfg: ModelConfig
    run_dir: Path
    dist: DistEnv
    sections: dict[str, Any] = field(default_factory=dict)
    """Plain-dict config sections (squeeze, recover, ...) each stage turns into its own dataclass."""

    def __post_init__(self) -> None:
        # Process-wide settings of the run, in force before any stage computes anything.
        configure_determinism(self.run.deterministic)

    @cached_property
    def data(self) -> DataBundle:
        layout = RunLayout(self.run_dir)  # an image tree is decoded once into the run dir's cache
        return build_data(self.data_cfg, {split: layout.decode_cache(split) for split in ("train", "test")})

    def smallest_class(self) -> tuple[str, int]:
        """(name, count) of the class with the fewest images in the training split."""
        bundle = self.data
        counts = np.bincount(np.asarray(bundle.labels("train"), dtype=np.int64), minlength=bundle.num_classes)
        c = int(counts.argmin())
        return (bundle.class_names[c] if bundle.class_names else str(c)), int(counts[c])

    def require_ipc_fits(self, ipc: int, needed_by: str) -> None:
        """Refuse an ipc larger than the smallest training class: ``needed_by`` takes ipc real images per class."""
        name, count = self.smallest_class()
        if ipc > count:
            raise ConfigError(f"ipc={ipc} exceeds the {count} training images of class {name} (the smallest "
                              f"class), and {needed_by} takes ipc real images of every class; use ipc <= {count}")
