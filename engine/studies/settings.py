"""Typed settings of the studies (``+study=NAME``: one preset per study in ``STUDY_PRESETS``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from engine.errors import ConfigError
from engine.models import ModelConfig

STUDY_NAMES = ("cross_arch", "teacher_size", "probe_vs_finetune", "bn_variance")
SCALES = ("reduced", "full")


@dataclass
class ReducedSettings:
    """What ``study.scale=reduced`` sets in every variant (the built-in data on 2 CPU cores); ``full`` keeps the
    run's own (the data preset's or the command line's) values."""

    ssl_epochs: int = 4
    """squeeze.epochs of every pretraining (MoCo v2 on MNIST-5k: 4 epochs measured 25 s with its probe)."""
    probe_epochs: Optional[int] = None
    """squeeze.probe.epochs; None keeps the run's (100 on fixed features costs a second or two)."""
    recover_iterations: int = 100
    student_epochs: int = 60
    student_batch_size: int = 25
    """evaluate.batch_size: IPC 10 x 10 classes is one batch of 100 per epoch; quarter batches give 4x the steps
    for the same images (MNIST-5k, 30 epochs at batch 100: the SC-DD row's ConvNet student stayed at chance)."""
    ipc: int = 10
    eval_every: int = 20

    def __post_init__(self) -> None:
        values = {"ssl_epochs": self.ssl_epochs, "recover_iterations": self.recover_iterations,
                  "student_epochs": self.student_epochs, "student_batch_size": self.student_batch_size,
                  "ipc": self.ipc, "eval_every": self.eval_every,
                  "probe_epochs": 1 if self.probe_epochs is None else self.probe_epochs}
        bad = {k: v for k, v in values.items() if v < 1}
        if bad:
            raise ConfigError(f"study.reduced: {', '.join(f'{k}={v}' for k, v in bad.items())} must be >= 1")


@dataclass
class StudyConfig:
    """A study (``scdd +study=NAME``): several SC-DD runs (variants) in <run>/study/<variant>/, one table and
    plot in <run>/report.md and study.json. Each field is read by the studies named in its comment."""

    name: str = "cross_arch"
    """cross_arch | teacher_size | probe_vs_finetune | bn_variance."""
    scale: str = "reduced"
    """reduced: ``reduced``'s short settings in every variant (built-in data, CPU) | full: the run's own
    settings (a data preset, e.g. +experiment=cifar100_ipc50, on GPUs)."""
    seeds: Optional[list[int]] = None
    """None: one run of each variant with the run's ``seed``; a list repeats every variant per seed (in
    <run>/study/<variant>/s<seed>/) and reports mean ± sd."""
    reduced: ReducedSettings = field(default_factory=ReducedSettings)
    students: list[str] = field(default_factory=lambda: ["convnet", "resnet18_cifar", "vit_tiny"])
    """cross_arch: student architectures (model= names), each trained on every row; the first is the headline."""
    teachers: list[ModelConfig] = field(default_factory=lambda: [
        ModelConfig(width=16), ModelConfig(width=32), ModelConfig(width=64), ModelConfig(width=128),
        ModelConfig(width=64, depth=2)])
    """teacher_size and bn_variance (reduced scale): the teachers' models, ConvNet widths and depths."""
    full_teachers: list[ModelConfig] = field(default_factory=lambda: [
        ModelConfig(name="resnet18"), ModelConfig(name="resnet50"), ModelConfig(name="resnet101")])
    """teacher_size and bn_variance (full scale): the teachers' models."""
    student: Optional[str] = None
    """teacher_size and bn_variance: the fixed student; None: convnet (reduced) or the run's model (full)."""
    finetune_lr_scale: Optional[float] = None
    """probe_vs_finetune: squeeze.probe.backbone_lr_scale of the finetune variant; None keeps the run's."""
    bootstrap: int = 2000
    """bn_variance: bootstrap resamples of the teachers for the rank correlation's 90% interval."""

    def __post_init__(self) -> None:
        if self.name not in STUDY_NAMES:
            raise ConfigError(f"study.name={self.name!r} is not a study; pick +study= one of {list(STUDY_NAMES)}")
        if self.scale not in SCALES:
            raise ConfigError(f"study.scale={self.scale!r} is not one of {'|'.join(SCALES)}")
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            raise ConfigError(f"study.seeds={self.seeds} must be a non-empty list of distinct seeds (or null)")
        if not self.students or len(set(self.students)) != len(self.students):
            raise ConfigError(f"study.students={self.students} must be a non-empty list of distinct model names")
        if len(self.teachers) < 2 or len(self.full_teachers) < 2:
            raise ConfigError("study.teachers and study.full_teachers need at least 2 models each to compare sizes")
        if self.bootstrap < 100:
            raise ConfigError(f"study.bootstrap={self.bootstrap} must be >= 100 resamples")


STUDY_PRESETS: dict[str, StudyConfig] = {
    # the small-image ResNet-18 and ViT-Tiny take ~3-5 s per 100-image step on one loaded CPU core: half the epochs
    "cross_arch": StudyConfig(name="cross_arch", students=["convnet", "resnet18_cifar", "vit_tiny"],
                              reduced=ReducedSettings(student_epochs=30, student_batch_size=20, eval_every=30)),
    "teacher_size": StudyConfig(name="teacher_size"),
    # linear and finetune both probe on augmented views (finetune needs them), 10 epochs of them
    "probe_vs_finetune": StudyConfig(name="probe_vs_finetune", reduced=ReducedSettings(probe_epochs=10)),
    # width 128 (teacher_size's largest) would cost a third of this study's CPU time alone
    "bn_variance": StudyConfig(name="bn_variance", teachers=[ModelConfig(width=16), ModelConfig(width=32),
                                                               ModelConfig(width=64, depth=2)]),
}
"""The ``study=`` options (``scdd +study=NAME``), registered with Hydra by engine.config_store."""
