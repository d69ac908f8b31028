"""What every stage receives from the entry point: run folder, process placement, shared configs."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from engine.data import DataBundle, DataConfig, build_data
from engine.distributed import DistEnv
from engine.models import ModelConfig


@dataclass
class RunConfig:
    """Top-level keys of the composed config (registered as ``run_config`` in configs/config.yaml's
    defaults list by engine.config_store)."""

    stage: str = "pipeline"
    """squeeze | recover | relabel | evaluate | pipeline | bench."""
    seed: int = 0
    device: str = "auto"
    """auto (CUDA when present) | cpu | cuda."""
    resume: bool = False
    """Continue an interrupted run in the same run directory (hydra.run.dir=...)."""
    ipc: list[int] = field(default_factory=lambda: [1, 10])
    """Images per class; a list runs recover/evaluate for each."""
    teacher: str | None = None
    """Teacher checkpoint for stages run alone; None means the one squeeze wrote in this run dir."""
    progress: bool = True


@dataclass
class RunContext:
    run: RunConfig
    data_cfg: DataConfig
    model_cfg: ModelConfig
    run_dir: Path
    dist: DistEnv
    sections: dict[str, Any] = field(default_factory=dict)
    """Plain-dict config sections (squeeze, recover, ...) each stage turns into its own dataclass."""

    @cached_property
    def data(self) -> DataBundle:
        return build_data(self.data_cfg)
