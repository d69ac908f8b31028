"""Projected wall time and device-hours of a full run from measured throughputs (pure arithmetic)."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class StageProjection:
    stage: str
    work: float
    """Units of work: image-iterations (recover) or image-epochs (pretraining, evaluation)."""
    rate: float
    """Measured units per second on one device."""
    gpus: int
    wall_seconds: float
    gpu_hours: float
    formula: str

    def as_dict(self) -> dict:
        return asdict(self)


def project_stage(stage: str, work: float, rate: float, gpus: int, formula: str = "") -> StageProjection:
    """Time of ``work`` units at ``rate`` units/s per device on ``gpus`` devices.

    wall_seconds = work / rate / gpus and gpu_hours = wall_seconds * gpus / 3600 = work / rate / 3600:
    linear scaling is assumed (recover batches are independent; data-parallel training is close to it),
    so more devices shorten the wall time but not the device-hours.
    """
    if rate <= 0 or gpus < 1 or work < 0:
        raise ValueError(f"need rate > 0, gpus >= 1, work >= 0; got rate={rate}, gpus={gpus}, work={work}")
    wall = work / rate / gpus
    return StageProjection(stage=stage, work=float(work), rate=float(rate), gpus=gpus, wall_seconds=wall,
                           gpu_hours=wall * gpus / 3600.0, formula=formula)


def project_run(*, num_classes: int, train_images: int, ipcs: list[int], iterations: int, ssl_epochs: int,
                eval_epochs: int, recover_rate: float, pretrain_rate: float, eval_rate: float,
                gpus: int) -> dict[str, StageProjection]:
    """Projections of one SC-DD run, stage by stage.

    - pretraining: train_images x ssl_epochs image-epochs at ``pretrain_rate`` images/s (one teacher);
    - recover: num_classes x max(ipcs) images, each optimized ``iterations`` times, at ``recover_rate``
      image-iterations/s (one distilled set: the largest ipc is synthesized once and sliced);
    - evaluation: for each ipc, one student trained ``eval_epochs`` epochs on num_classes x ipc images
      at ``eval_rate`` images/s (soft labels online, so the rate includes the teacher's forward).

    Example: 1000 classes, ipc 50, 1000 iterations, 100 image-iterations/s, 8 GPUs -> 5e7 / 100 / 8 =
    62,500 s wall and 5e7 / 100 / 3600 = 138.9 GPU-hours.
    """
    recover_images = num_classes * max(ipcs)
    eval_images = sum(num_classes * ipc for ipc in sorted(set(ipcs)))
    return {
        "pretrain": project_stage("pretrain", train_images * ssl_epochs, pretrain_rate, gpus,
                                  f"{train_images} images x {ssl_epochs} epochs / {pretrain_rate:.4g} img/s / {gpus}"),
        "recover": project_stage("recover", recover_images * iterations, recover_rate, gpus,
                                 f"{num_classes} classes x {max(ipcs)} ipc x {iterations} iterations / "
                                 f"{recover_rate:.4g} img-it/s / {gpus}"),
        "evaluate": project_stage("evaluate", eval_images * eval_epochs, eval_rate, gpus,
                                  f"{eval_images} images (ipc {'+'.join(map(str, sorted(set(ipcs))))}) x "
                                  f"{eval_epochs} epochs / {eval_rate:.4g} img/s / {gpus}"),
    }


def format_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"
