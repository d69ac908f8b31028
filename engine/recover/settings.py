"""Typed settings of the recover stage (``recover=default``: these dataclass defaults)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from engine.errors import ConfigError


REAL_INIT_SELECTS = ("random", "confident", "kcenter", "herding")


@dataclass
class RecoverConfig:
    """Recover: synthesize images per class by matching the teacher's BN statistics. Defaults chosen
    from measurements on MNIST-5k with the ConvNet (see README); the paper's ImageNet recipe lives in
    the experiment presets (configs/experiment/)."""

    iterations: int = 200
    """Optimization steps per batch (paper: 1000; SRe2L: 4000)."""
    lr: float = 0.25
    """Adam learning rate on the pixels (normalized space), cosine-decayed to 0."""
    r_bn: float = 10.0
    """Weight of the BN-matching loss against cross-entropy; depends on depth/width and teacher.
    Measured on MNIST-5k (SSL teacher, IPC 10 student top-1): 3 -> 68.9%, 10 -> 70.2%; the ImageNet
    value 0.01 leaves fragmented images here (the BN loss is tiny next to CE)."""
    first_bn_multiplier: float = 10.0
    classes_per_batch: Optional[int] = None
    """Classes synthesized together in one batch; None: min(50, number of classes)."""
    ipc_per_batch: Optional[int] = None
    """Images of each class per batch: 1 is the paper's batching; None fills batches to ~100 images
    (max(1, 100 // classes_per_batch)), which is 1 for 100+ classes and 10 for MNIST."""
    init: str = "noise"
    """noise (randn, the paper's setting) | real (the class's own training images)."""
    real_init_select: str = "confident"
    """With init=real: random | confident (those the teacher classifies most confidently) | kcenter
    (greedy k-center cover of the pool in the teacher's penultimate features, starting from the most
    confident) | herding (features whose running mean tracks the pool's class mean)."""
    real_init_pool: int = 64
    """Candidates per class scored by the teacher for init=real confident."""
    real_init_iterations: Optional[int] = None
    """Optimization steps with init=real (None: ``iterations``): real starts need less refinement."""
    rded_crops: int = 0
    """RDED-style init (with init=real): > 0 scores this many random crops per candidate image of the
    pool by the teacher's probability of the class and starts from the most confident crops (resized to
    the image size) instead of whole images; 0: whole images."""
    rded_patches: int = 1
    """With rded_crops > 0: each start image stitches k x k of the class's best crops (k = this), each
    shrunk to 1/k of the side; the student's online relabeling labels whatever crop it sees."""
    crop_curriculum: float = 0.0
    """CDA's easy-to-hard crops: over the first this fraction of the iterations the crop scale's lower
    bound falls linearly from 1 to crop_scale's low, then stays there; 0: off (the fixed range)."""
    real_init_lr: Optional[float] = 0.05
    """Pixel lr with init=real (None: ``lr``); real images need smaller steps than noise
    (MNIST-5k, IPC 10 student top-1: lr 0.25 -> 78.3%, 0.05 -> 87.3%)."""
    crop: bool = True
    """Random resized crop each step; false: none (SC-DD's CIFAR-100 script comments its crops out and
    only rolls)."""
    crop_scale: Optional[list[float]] = None
    """Random-resized-crop scale range; None: (0.08, 1) for >=64 px images, (0.5, 1) below."""
    flip: Optional[bool] = None
    """Random horizontal flip each step; None: on for RGB, off for gray (digits are not mirror-symmetric)."""
    jitter: Optional[int] = None
    """Random roll of up to this many pixels; None: 32 at >=224 px, 4 at 32 px, image_size//8 below."""
    jitter_mode: str = "symmetric"
    """symmetric: shifts in [-jitter, jitter] (SRe2L's Tiny-ImageNet script) | forward: [0, jitter]
    (SC-DD's scripts: random.randint(0, jitter); a roll wraps around, so this is a narrower spread)."""
    teachers: list[str] = field(default_factory=lambda: ["ssl", "supervised"])
    """Which squeeze teachers of this run dir to synthesize from (ignored when teacher=PATH is set)."""
    backend: str = "auto"
    """BN-statistics kernel: auto (Triton on CUDA, PyTorch on CPU) | triton | torch."""
    channels_last: bool = True
    """Run the teacher in channels_last (measured faster on CPU too: convnet 28 px 1.5x, ResNet-18 32 px)."""
    groups_per_step: int = 1
    """Class batches optimized together in one teacher pass, each with its own BN statistics, loss,
    seed and augmentation (the paper's per-batch semantics): the images equal those of running the
    batches one after the other up to float rounding; more per pass amortizes per-layer fixed costs.
    Batches of unequal size (a last class chunk) go in groups of their own size."""
    precision: str = "auto"
    """auto | fp32 | bf16: the teacher under bf16 autocast (CUDA or CPU); pixels, Adam state and the BN
    statistics and losses stay fp32. auto: bf16 on CUDA and on a CPU with native bf16 (AVX512-BF16/AMX),
    fp32 elsewhere (engine.training.precision). bf16 changes the images beyond rounding, so the resolved
    precision is part of the set's fingerprint."""
    cuda_graphs: bool = False
    """Capture the whole step (augmentation, teacher, losses, backward, Adam, clip) as a CUDA graph and
    replay it; CUDA only. Same images as without, up to float rounding."""
    log_every: int = 10
    """Write one loss-log row every this many steps (and at the first and last)."""
    image_format: str = "png"
    """How the set's images are stored: png (lossless 8-bit) | jpeg (at ``jpeg_quality``)."""
    jpeg_quality: int = 95
    """JPEG quality for image_format=jpeg; 90-100."""

    @property
    def steps(self) -> int:
        """Optimization steps per batch: ``real_init_iterations`` for real starts when set, else ``iterations``."""
        return (self.real_init_iterations or self.iterations) if self.init == "real" else self.iterations

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ConfigError(f"recover.iterations={self.iterations} must be >= 1")
        if self.lr <= 0 or (self.real_init_lr is not None and self.real_init_lr <= 0):
            raise ConfigError(f"recover.lr={self.lr} and recover.real_init_lr={self.real_init_lr} must be > 0")
        if self.r_bn < 0 or self.first_bn_multiplier < 0:
            raise ConfigError("recover.r_bn and recover.first_bn_multiplier must be >= 0")
        if self.init not in ("noise", "real"):
            raise ConfigError(f"recover.init={self.init!r} is not one of noise|real")
        if self.real_init_select not in REAL_INIT_SELECTS:
            raise ConfigError(f"recover.real_init_select={self.real_init_select!r} is not one of "
                              f"{'|'.join(REAL_INIT_SELECTS)}")
        if self.real_init_iterations is not None and self.real_init_iterations < 1:
            raise ConfigError(f"recover.real_init_iterations={self.real_init_iterations} must be >= 1 (or null)")
        if self.rded_crops < 0 or self.rded_patches < 1:
            raise ConfigError(f"recover.rded_crops={self.rded_crops} must be >= 0 and recover.rded_patches="
                              f"{self.rded_patches} >= 1")
        if not 0 <= self.crop_curriculum <= 1:
            raise ConfigError(f"recover.crop_curriculum={self.crop_curriculum} must be a fraction of the "
                              f"iterations in [0, 1]")
        if self.classes_per_batch is not None and self.classes_per_batch < 1:
            raise ConfigError(f"recover.classes_per_batch={self.classes_per_batch} must be >= 1")
        if self.ipc_per_batch is not None and self.ipc_per_batch < 1:
            raise ConfigError(f"recover.ipc_per_batch={self.ipc_per_batch} must be >= 1")
        if self.log_every < 1 or self.real_init_pool < 1 or (self.jitter is not None and self.jitter < 0):
            raise ConfigError(f"recover.log_every={self.log_every} and recover.real_init_pool={self.real_init_pool} "
                              f"must be >= 1 and recover.jitter={self.jitter} >= 0")
        if self.crop_scale is not None and not (len(self.crop_scale) == 2
                                                and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1):
            raise ConfigError(f"recover.crop_scale={self.crop_scale} must be [low, high] in (0, 1]")
        if self.jitter_mode not in ("symmetric", "forward"):
            raise ConfigError(f"recover.jitter_mode={self.jitter_mode!r} is not one of symmetric|forward")
        if self.backend not in ("auto", "triton", "torch"):
            raise ConfigError(f"recover.backend={self.backend!r} is not one of auto|triton|torch")
        if self.groups_per_step < 1:
            raise ConfigError(f"recover.groups_per_step={self.groups_per_step} must be >= 1")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"recover.precision={self.precision!r} is not one of auto|fp32|bf16")
        if self.image_format not in ("png", "jpeg") or not 90 <= self.jpeg_quality <= 100:
            raise ConfigError(f"recover.image_format={self.image_format!r} must be png|jpeg and "
                              f"recover.jpeg_quality={self.jpeg_quality} in [90, 100]")
        bad = [t for t in self.teachers if t not in ("ssl", "supervised")]
        if bad:
            raise ConfigError(f"recover.teachers has {bad}; use ssl and/or supervised")


@dataclass(frozen=True)
class StepAugment:
    """Resolved per-step augmentation for one image size."""

    image_size: int
    crop_scale: tuple[float, float]
    flip: bool
    jitter: int
    crop: bool = True
    jitter_mode: str = "symmetric"
    crop_curriculum: float = 0.0
    """Fraction of the iterations over which the crop scale's lower bound falls from 1 (``at``)."""

    def at(self, step: int, steps: int) -> "StepAugment":
        """The augmentation of step ``step`` of ``steps``: itself, unless a crop curriculum narrows the
        crop scale's lower bound (1 at step 0, falling linearly to crop_scale's low at
        crop_curriculum * steps)."""
        if not self.crop or self.crop_curriculum <= 0:
            return self
        low = curriculum_low(step, steps, self.crop_scale[0], self.crop_curriculum)
        return replace(self, crop_scale=(min(low, self.crop_scale[1]), self.crop_scale[1]))


def curriculum_low(step: int, steps: int, low: float, fraction: float) -> float:
    """CDA's easy-to-hard lower bound of the crop scale at ``step``: 1 -> ``low`` linearly over the
    first ``fraction`` of ``steps``, ``low`` afterwards."""
    span = fraction * steps
    if span <= 0 or step >= span:
        return low
    return 1.0 - (1.0 - low) * step / span


def resolve_augment(cfg: RecoverConfig, image_size: int, channels: int) -> StepAugment:
    if cfg.crop_scale is not None:
        scale = (float(cfg.crop_scale[0]), float(cfg.crop_scale[1]))
    else:
        scale = (0.08, 1.0) if image_size >= 64 else (0.5, 1.0)
    flip = cfg.flip if cfg.flip is not None else channels == 3
    if cfg.jitter is not None:
        jitter = cfg.jitter
    elif image_size >= 224:
        jitter = 32
    elif image_size >= 32:
        jitter = 4
    else:
        jitter = max(1, image_size // 8)
    return StepAugment(image_size=image_size, crop_scale=scale, flip=flip, jitter=jitter, crop=cfg.crop,
                       jitter_mode=cfg.jitter_mode, crop_curriculum=cfg.crop_curriculum)
