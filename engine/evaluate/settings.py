"""Typed settings of the relabel/evaluate stage (``evaluate=default``: these dataclass defaults)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from engine.artifacts.layout import SET_FOLDERS
from engine.errors import ConfigError
from engine.models import MODELS
from engine.training.precision import check_precision

RESERVED_ROWS = (*SET_FOLDERS, "random_real", "full_data")
"""Report row keys of our own rows: an external set may not take one of these names."""


@dataclass
class EvaluateConfig:
    """Relabel + evaluate: students trained from scratch with the teacher's soft labels."""

    epochs: int = 200
    """Student epochs over the distilled (or random real) set."""
    batch_size: int = 100
    lr: float = 1e-2
    """Paper: 1e-3 (ImageNet, batch 1024); on MNIST-5k 1e-2 measured far better in the step budget
    (random real IPC 1: 70.9% vs 48.6%)."""
    weight_decay: float = 0.01
    optimizer: str = "adamw"
    """adamw (SC-DD's ImageNet and CIFAR scripts) | sgd (SC-DD's Tiny-ImageNet table: lr 0.2)."""
    momentum: float = 0.9
    """SGD momentum (optimizer=sgd only)."""
    decay_norm_and_bias: bool = True
    """Weight decay also on BatchNorm and bias parameters. The ImageNet script's param groups decay only
    weights with 2+ dimensions (false); the CIFAR script decays everything (true)."""
    warmup_epochs: int = 0
    """Linear lr warm-up before the cosine (SRe2L's Tiny-ImageNet recipe: 5)."""
    lr_floor: float = 0.0
    """Fraction of ``lr`` the cosine reaches at the end: the schedule is the first part of a cosine that
    would fall to 0 later (the CIFAR script's cosine over 2 x 300 epochs, run 200 epochs, ends at 0.75)."""
    lr_per: str = "step"
    """step (lr updated every optimizer step) | epoch (constant within an epoch, as the scripts' LambdaLR)."""
    temperature: float = 4.0
    """Soft-label temperature T (paper: 20 ImageNet, 30 CIFAR; chosen on MNIST-5k, see README)."""
    temperature_squared: bool = False
    """Scale the KL loss by T^2 (Hinton's gradient correction; SRe2L's Tiny-ImageNet script does, the
    ImageNet and CIFAR scripts do not)."""
    loss: str = "kl"
    """kl (soft labels from the teacher) | hard (cross-entropy on the given labels)."""
    relabel: str = "online"
    """online (teacher labels each augmented batch; SC-DD) | stored (precomputed per epoch; SRe2L/FKD)."""
    stored_topk: int = 10
    """Stored relabel keeps this many top fp16 logits per image plus the rest of the teacher's probability mass
    at the temperature, spread evenly over the other classes (FKD); all logits when it covers the classes."""
    stored_dtype: str = "float16"
    mix: str = "cutmix"
    """Per-batch mixing: cutmix | mixup | none. The teacher labels the mixed batch."""
    cutmix_prob: float = 1.0
    cutmix_alpha: float = 1.0
    mixup_alpha: float = 0.8
    """MixUp's lam ~ Beta(alpha, alpha), every batch (the CIFAR script's 0.8)."""
    crop: str = "rrc"
    """rrc (per-image random resized crop, ``crop_scale``) | pad (RandomCrop(size, padding=``crop_padding``),
    the CIFAR script's)."""
    crop_padding: int = 4
    crop_scale: Optional[list[float]] = None
    """Per-image random-resized-crop scale range; None: (0.08, 1) at >=64 px, (0.5, 1) below."""
    flip: Optional[bool] = None
    """Per-image horizontal flip; None: on for RGB, off for gray (digits are not mirror-symmetric)."""
    eval_every: int = 50
    """Test-set accuracy every this many epochs (and at the last), for the per-epoch plot."""
    student: Optional[str] = None
    """Student model name; None: the teacher's architecture (same model config)."""
    students: Optional[list[str]] = None
    """Cross-architecture evaluation: model names (``evaluate.students=[convnet,mobilenet_v2_cifar,vit_tiny]``),
    each a registry preset as ``student`` takes it; every row trains one student per name with the same teacher
    and recipe. The first is the row's headline (its folder and top-level results); each result is under
    ``row["students"][name]``. None: one student, ``student``'s."""
    label_teacher: str = "ssl"
    """ssl | supervised: the teacher that gives the soft labels for every row (same labels for distilled
    and baselines)."""
    full_data: bool = True
    """Also train a student on the full real training split (upper bound)."""
    full_data_epochs: int = 8
    random_real_seeds: int = 1
    """Random real subsets drawn (different seeds) for the baseline row; mean and std reported."""
    workers: int = 0
    """DataLoader workers for streaming (image-folder) training sets."""
    row_processes: Optional[int] = None
    """Processes training rows side by side on a one-process CPU run, one intra-op thread each (rows are
    split by estimated cost; each forked process prints one line per finished row instead of a progress
    bar); None (default): one per torch thread (2 on 2 cores); 1: one row after another in this process.
    Default run on 2 idle cores (bf16, NHWC): evaluate 58.4 s with 2 processes against 74.4 s with 1
    (0.78x; one-thread oneDNN steps on 10-100 small images waste less than two threads sharing them).
    GPU runs, DDP, job-array tasks and merge always take one. See engine.evaluate.stage.row_processes."""
    cache_mb: int = 512
    """Size rule: a training set (distilled or random real) whose 8-bit pixels (N x C x H x W bytes)
    fit this many MiB is decoded once into memory; larger sets stream from disk every epoch."""
    external_sets: Optional[dict[str, str]] = None
    """None, or sets other engines published (SRe2L, CDA, SC-DD, RDED: folders new000/class000_id000.jpg, ...), as
    ``{name: path}`` (``evaluate.external_sets={rded:/data/rded_in1k_ipc10}``): each is imported into
    <run>/external/<name> and trained on as one more report row, ``name``, with the same teacher and recipe.
    Images must be data.image_size square (never resized). None, not {}, by default: Hydra then takes the
    dict as given instead of merging it into an empty one (which struct mode refuses)."""
    precision: str = "auto"
    """auto (bf16 on CUDA and on a CPU with native bf16, else fp32) | fp32 | bf16: the student's and the teacher's soft-label forward
    under bf16 autocast; weights, optimizer state, BN running statistics and the loss stay fp32. bf16 vs fp32
    over a few steps on digits: see tests/evaluate/test_student_precision.py for the tolerance."""
    channels_last: Optional[bool] = None
    """NHWC student, teacher and batches (stored relabeling's teacher too). None: on CUDA, and on the CPU
    under bf16 (default ConvNet, 1 thread, benchmarks/student_speed.py: bf16 1.45x fp32, bf16+NHWC 2.90x);
    fp32 on the CPU keeps the default layout (fp32+NHWC 1.34x, but other rounding than earlier runs)."""
    compile: bool = False
    """torch.compile the student's forward/backward (fixed shapes). Each student pays the compilation once:
    CPU, default ConvNet at batch 100, about 25-55 s for 1.3x fp32 steps (2 shared cores; bf16+channels_last
    without compiling was faster still, 2.3x), so on the CPU it pays off only for runs of many minutes."""
    cuda_graphs: bool = False
    """CUDA, one process: every full batch replays one CUDA graph of the whole student step (augmentation,
    student and teacher forwards, loss, backward, AdamW/SGD), captured after 3 eager steps; the same
    arithmetic as the eager step, without its launch cost (small distilled-set batches are launch-bound).
    Refused on the CPU, with DDP ranks and with evaluate.compile. Not part of a row's fingerprint."""

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.full_data_epochs < 1:
            raise ConfigError("evaluate.epochs and evaluate.full_data_epochs must be >= 1")
        if self.row_processes is not None and self.row_processes < 1:
            raise ConfigError(f"evaluate.row_processes={self.row_processes} must be >= 1 (or null: one per thread)")
        if self.cache_mb < 0:
            raise ConfigError(f"evaluate.cache_mb={self.cache_mb} must be >= 0 (0 streams every set)")
        if self.batch_size < 1:
            raise ConfigError(f"evaluate.batch_size={self.batch_size} must be >= 1")
        if self.temperature <= 0:
            raise ConfigError(f"evaluate.temperature={self.temperature} must be > 0")
        if self.loss not in ("kl", "hard"):
            raise ConfigError(f"evaluate.loss={self.loss!r} is not one of kl|hard")
        if self.relabel not in ("online", "stored"):
            raise ConfigError(f"evaluate.relabel={self.relabel!r} is not one of online|stored")
        if self.stored_dtype not in ("float16", "float32"):
            raise ConfigError(f"evaluate.stored_dtype={self.stored_dtype!r} is not float16|float32")
        if not 0 <= self.cutmix_prob <= 1 or self.cutmix_alpha <= 0:
            raise ConfigError("evaluate.cutmix_prob must be in [0, 1] and cutmix_alpha > 0")
        if self.label_teacher not in ("ssl", "supervised"):
            raise ConfigError(f"evaluate.label_teacher={self.label_teacher!r} is not ssl|supervised")
        if self.optimizer not in ("adamw", "sgd") or self.lr_per not in ("step", "epoch"):
            raise ConfigError(f"evaluate.optimizer={self.optimizer!r} must be adamw|sgd and "
                              f"evaluate.lr_per={self.lr_per!r} step|epoch")
        if self.mix not in ("cutmix", "mixup", "none") or self.crop not in ("rrc", "pad"):
            raise ConfigError(f"evaluate.mix={self.mix!r} must be cutmix|mixup|none and evaluate.crop={self.crop!r} "
                              f"rrc|pad")
        if self.mixup_alpha <= 0 or self.crop_padding < 0 or not 0 <= self.momentum < 1:
            raise ConfigError(f"evaluate.mixup_alpha={self.mixup_alpha} must be > 0, evaluate.crop_padding="
                              f"{self.crop_padding} >= 0 and evaluate.momentum={self.momentum} in [0, 1)")
        if not 0 <= self.lr_floor < 1 or not 0 <= self.warmup_epochs < self.epochs:
            raise ConfigError(f"evaluate.lr_floor={self.lr_floor} must be in [0, 1) and evaluate.warmup_epochs="
                              f"{self.warmup_epochs} in [0, epochs)")
        if self.eval_every < 1 or self.random_real_seeds < 1 or self.stored_topk < 1 or self.workers < 0:
            raise ConfigError(f"evaluate.eval_every={self.eval_every}, evaluate.random_real_seeds="
                              f"{self.random_real_seeds} and evaluate.stored_topk={self.stored_topk} must be >= 1 "
                              f"and evaluate.workers={self.workers} >= 0")
        if self.crop_scale is not None and not (len(self.crop_scale) == 2
                                                and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1):
            raise ConfigError(f"evaluate.crop_scale={self.crop_scale} must be [low, high] in (0, 1]")
        check_precision(self.precision, "evaluate.precision")
        if self.cuda_graphs and self.compile:
            raise ConfigError("evaluate.cuda_graphs=true and evaluate.compile=true are both set; pick one "
                              "(cuda_graphs replays the whole step, compile fuses the forward)")
        self._check_students()
        if self.external_sets is not None and not isinstance(self.external_sets, dict):
            raise ConfigError(f"evaluate.external_sets={self.external_sets!r} must map names to folders: "
                              f"evaluate.external_sets={{name:/path/to/set}}")
        for name, path in (self.external_sets or {}).items():
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", str(name)) or name in RESERVED_ROWS:
                raise ConfigError(f"evaluate.external_sets: name {name!r} must be letters, digits, _ or - (starting "
                                  f"with a letter) and none of our rows {list(RESERVED_ROWS)}; rename it")
            if not isinstance(path, str) or not path:
                raise ConfigError(f"evaluate.external_sets.{name}={path!r} must be the set's folder path")

    def _check_students(self) -> None:
        if self.students is None:
            return
        if self.student is not None:
            raise ConfigError(f"evaluate.student={self.student} and evaluate.students={list(self.students)} are "
                              f"both set (a preset may set the first); pick one: evaluate.student=null with "
                              f"{self.student} in evaluate.students, or drop evaluate.students")
        names = [str(name) for name in self.students]
        if not names:
            raise ConfigError("evaluate.students=[] lists no model; list one or more, or set it to null")
        unknown = [name for name in names if name not in MODELS]
        if unknown:
            raise ConfigError(f"evaluate.students: unknown model {', '.join(unknown)}; choose from {sorted(MODELS)}")
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ConfigError(f"evaluate.students lists {', '.join(twice)} more than once; list each model once")
