"""`scdd stage=squeeze`: config -> typed settings -> pretrain, probe, checkpoints, BN summaries.

Layout written under ``<run_dir>/squeeze/``:
  ssl/teacher.pt, supervised/teacher.pt     teachers (engine.artifacts.teacher format), read by later stages
  <kind>/metrics.json, <kind>/metrics.csv   per-epoch rows (pretrain, probe) and final figures
  <kind>/bn_stats.json                      per-layer BN running-variance summary
  <kind>/state.pt                           last epoch checkpoint while training (removed when done)
  bn_variance.png                           SSL vs supervised BN variances

ssl.init_from / squeeze.supervised.init_from import a teacher from a public checkpoint instead
(engine.artifacts.imports; squeeze.probe.init_from adds a released linear head): the same files, with
no pretraining rows.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from engine.artifacts.fingerprint import announce_overwrite, require_match
from engine.artifacts.imports import Imported, install, read_backbone, read_head
from engine.artifacts.layout import TEACHER_KINDS, RunLayout
from engine.artifacts.teacher import data_facts, load_teacher, read_teacher, save_teacher
from engine.config import from_mapping
from engine.context import RunContext
from engine.errors import ConfigError
from engine.io import save_json, save_text
from engine.loaders.common import LoaderSpec
from engine.loaders.settings import LoaderConfig, parse_loader
from engine.models import ClassifierNet, build_model
from engine.squeeze.augment import probe_image_spec, spec_for
from engine.squeeze.bn_stats import bn_variance_summary, plot_bn_variance
from engine.distributed import average_buffers, barrier
from engine.squeeze.pretrain import (Interrupted, Schedule, check_compile, check_cuda_graphs, rank_state_path,
                                     train)
from engine.squeeze.probe import evaluate_top1, linear_probe
from engine.squeeze.ssl import SupervisedSettings, TrainSettings, check_queue, fit_to_data, method_spec
from engine.training.tb_logger import open_logger, parse_logger
from engine.training.trainers import DeepSpeedSettings, TrainerConfig, deepspeed_config, resolve_trainer

log = logging.getLogger("scdd.squeeze")

_SEED_STREAM = {"ssl": 1, "supervised": 2, "probe": 3}


@dataclass
class ProbeConfig:
    """Linear probe on the frozen SSL backbone (``squeeze.probe``)."""

    epochs: int = 100
    batch_size: int = 256
    lr: float = 1.0
    """Large, as in the paper's probe (30 on raw ResNet features); features are standardized here."""
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "step"
    """step: lr x0.1 at each milestone | cosine."""
    milestones: tuple[float, ...] = (0.6, 0.8)
    """Fractions of ``epochs`` where the step schedule divides lr by 10."""
    standardize: bool = True
    """Standardize features with the train mean/std (folded into the saved fc afterwards)."""
    init_from: Optional[str] = None
    """A released linear head (file) for the backbone of ``ssl.init_from``: the probe is skipped."""
    views: str = "features"
    """augmented: random-resized-crop + flip views of the training images each epoch (the paper's probe) |
    features: unaugmented features computed once (fast; the small built-in data)."""
    mode: str = "linear"
    """linear: frozen eval-mode backbone, BN running statistics untouched (the paper) | finetune: the
    backbone trains with the layer in train mode, so its weights and BN statistics move and the teacher
    written is the fine-tuned model. finetune needs views=augmented (refused otherwise: fixed features
    cannot update the backbone)."""
    backbone_lr_scale: float = 0.01
    """finetune: the backbone's lr is ``lr`` times this (the layer's lr suits a fresh head, not
    pretrained weights); unused by linear."""

    def __post_init__(self) -> None:
        if self.views not in ("augmented", "features") or (self.views == "augmented" and self.standardize):
            raise ConfigError(f"squeeze.probe.views={self.views!r} must be augmented|features; augmented "
                              f"needs squeeze.probe.standardize=false")
        if self.mode not in ("linear", "finetune"):
            raise ConfigError(f"squeeze.probe.mode={self.mode!r} is not one of linear|finetune")
        if self.mode == "finetune" and self.views != "augmented":
            raise ConfigError("squeeze.probe.mode=finetune trains the backbone on fresh views; set "
                              "squeeze.probe.views=augmented squeeze.probe.standardize=false")
        if not self.backbone_lr_scale >= 0:
            raise ConfigError(f"squeeze.probe.backbone_lr_scale={self.backbone_lr_scale} must be >= 0")
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError(f"squeeze.probe needs epochs >= 0, batch_size >= 1, lr > 0; got epochs="
                              f"{self.epochs}, batch_size={self.batch_size}, lr={self.lr}")
        if self.schedule not in ("step", "cosine"):
            raise ConfigError(f"squeeze.probe.schedule={self.schedule!r} is not one of step|cosine")
        if any(not 0 < m < 1 for m in self.milestones):
            raise ConfigError(f"squeeze.probe.milestones={list(self.milestones)} must be fractions in (0, 1)")


@dataclass
class SqueezeConfig:
    """Squeeze stage (``squeeze=default``): pretrain teachers, linear-probe the SSL one, summarize BN
    statistics. The SSL teacher's hyper-parameters come from the ``ssl=`` group (mocov2 | simclr)."""

    teachers: list[str] = field(default_factory=lambda: ["ssl", "supervised"])
    """Which teachers to train: ssl (objective chosen by ssl=) and/or supervised."""
    epochs: Optional[int] = None
    """None: each method's own epochs; a number overrides every teacher's epochs (quick runs)."""
    flip: Optional[bool] = None
    """Horizontal flip in the views; None: on for RGB, off for 1-channel data (a mirrored digit is
    another glyph)."""
    crop_scale: Optional[tuple[float, float]] = None
    """None: the recipe's crop area range; [low, high] overrides it."""
    workers: int = 4
    """DataLoader workers for streaming datasets (in-memory built-ins are sliced directly)."""
    probe_only: bool = False
    """Only linear-probe an existing teacher (teacher=PATH, else this run's squeeze/ssl/teacher.pt)."""
    stop_after_epochs: Optional[int] = None
    """Stop each pretraining after this many epochs, as if killed (resume=true continues)."""
    bn_hist_bins: int = 20
    """Bins of the BN running-variance histogram whose entropy bn_stats.json reports."""
    cuda_graphs: bool = False
    """CUDA, trainer single, training images in memory (built-in sets; trees held in memory): after 3 eager
    steps every pretraining step (views, forwards, MoCo's key update and queue, loss, backward, SGD) replays
    one captured CUDA graph, the eager step's arithmetic without its launch cost. Refused elsewhere, in one
    line. Not part of the teachers' fingerprints."""
    compile: bool = False
    """torch.compile each pretraining's encoders (MoCo: query and key backbones and heads): fused BN+ReLU and
    elementwise kernels, fewer launches; the first steps of each teacher pay the compilation. trainer single
    or ddp (refused with deepspeed); with cuda_graphs the compiled kernels are captured with the rest of the
    step. Not part of the teachers' fingerprints: a run may resume with it on or off."""
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    supervised: SupervisedSettings = field(default_factory=SupervisedSettings)
    """The supervised teacher's hyper-parameters (defaults: ``ssl=supervised``'s)."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.teachers) - set(TEACHER_KINDS))
        if unknown or not self.teachers or len(set(self.teachers)) != len(self.teachers):
            raise ConfigError(f"squeeze.teachers={list(self.teachers)} must be a non-empty list of distinct "
                              f"names from {list(TEACHER_KINDS)}")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"squeeze.epochs={self.epochs} must be >= 1 (or null for each method's own)")
        if self.stop_after_epochs is not None and self.stop_after_epochs < 1:
            raise ConfigError(f"squeeze.stop_after_epochs={self.stop_after_epochs} must be >= 1 or null")
        if self.workers < 0 or self.bn_hist_bins < 2:
            raise ConfigError(f"squeeze.workers={self.workers} must be >= 0 and "
                              f"squeeze.bn_hist_bins={self.bn_hist_bins} >= 2")
        if self.supervised.name != "supervised":
            raise ConfigError(f"squeeze.supervised.name={self.supervised.name!r} must be 'supervised'")


def parse_config(squeeze: dict[str, Any], ssl: dict[str, Any]) -> tuple[SqueezeConfig, TrainSettings]:
    """Plain config sections -> (SqueezeConfig, settings of the ssl= method)."""
    try:
        cfg = from_mapping(SqueezeConfig, squeeze, "squeeze")
    except ConfigError as exc:  # the supervised settings reuse TrainSettings' 'ssl.' messages
        raise ConfigError(re.sub(r"(^|[\s'])ssl\.", r"\1squeeze.supervised.", str(exc))) from exc
    ssl = dict(ssl or {})
    spec = method_spec(str(ssl.get("name", "mocov2")))
    settings = from_mapping(spec.settings, ssl, "ssl")
    if "ssl" in cfg.teachers and spec.kind != "ssl":
        raise ConfigError(f"ssl={settings.name} is not self-supervised; pick ssl=mocov2 or ssl=simclr "
                          f"(the supervised teacher comes from squeeze.teachers=[supervised])")
    if cfg.probe_only and settings.init_from:
        raise ConfigError(f"squeeze.probe_only=true probes an existing teacher, but ssl.init_from="
                          f"{settings.init_from} imports one (and probes it); drop one of the two")
    if cfg.probe.init_from and not settings.init_from and ("ssl" in cfg.teachers or cfg.probe_only):
        raise ConfigError(f"squeeze.probe.init_from={cfg.probe.init_from} is a released head, which fits only the "
                          f"backbone it was trained on; give that backbone as ssl.init_from=PATH, or drop "
                          f"squeeze.probe.init_from to probe the teacher trained here")
    return cfg, settings


def validate(ctx: RunContext) -> None:
    """Every check squeeze makes before training, without training: its settings and the ssl=, trainer=,
    deepspeed= and loader= sections (deepspeed.path read, ffcv files present), each teacher's batch against
    the training split and the process count, and, for squeeze.probe_only, the teacher it will probe."""
    cfg, ssl_settings = parse_config(ctx.sections.get("squeeze", {}), ctx.sections.get("ssl", {}))
    trainer, _ = parse_trainer(ctx.sections, ctx.dist.world_size)
    loader = parse_loader(ctx.sections, ctx.data_cfg, ctx.data)
    bundle, world = ctx.data, ctx.dist.world_size
    if cfg.cuda_graphs and not cfg.probe_only:
        check_cuda_graphs(ctx.dist.device, trainer, f"loader={loader.name}" if loader.external else None)
    if cfg.compile and not cfg.probe_only:
        check_compile(trainer)
    if cfg.probe_only:
        if world > 1:
            raise ConfigError("squeeze.probe_only=true runs in one process; launch it without torchrun/srun")
        load_teacher(Path(ctx.run.teacher) if ctx.run.teacher else RunLayout(ctx.run_dir).teacher("ssl"),
                     ctx.model_cfg, bundle)
        return
    for kind in cfg.teachers:
        settings = ssl_settings if kind == "ssl" else cfg.supervised
        if settings.init_from:  # imported, not trained: the file must be there and fit
            _read_import(ctx, cfg, kind, settings.init_from)
            continue
        where = "ssl" if kind == "ssl" else "squeeze.supervised"
        check_queue(settings, len(bundle.train))
        if len(bundle.train) < settings.batch_size:
            raise ConfigError(f"{where}.batch_size={settings.batch_size} exceeds the {len(bundle.train)} "
                              f"training images; lower {where}.batch_size")
        if settings.batch_size % world or settings.batch_size // world < 2:
            raise ConfigError(f"{where}.batch_size={settings.batch_size} must split into equal shards of >= 2 "
                              f"images over {world} processes; use a multiple of {world}")
        spec_for(settings.augment, bundle.image_size, _flip_for(cfg, bundle.channels), cfg.crop_scale)


def run(ctx: RunContext) -> dict:
    cfg, ssl_settings = parse_config(ctx.sections.get("squeeze", {}), ctx.sections.get("ssl", {}))
    trainer, ds_settings = parse_trainer(ctx.sections, ctx.dist.world_size)
    loader = parse_loader(ctx.sections, ctx.data_cfg, ctx.data)
    layout = RunLayout(ctx.run_dir)
    if cfg.probe_only:
        if ctx.dist.world_size > 1:
            raise ConfigError("squeeze.probe_only=true runs in one process; launch it without torchrun/srun")
        return _probe_only(ctx, cfg, loader, ssl_settings.precision)
    results: dict[str, dict] = {}
    for kind in cfg.teachers:
        settings = ssl_settings if kind == "ssl" else cfg.supervised
        if settings.init_from:
            results[kind] = _import_teacher(ctx, cfg, kind, settings.init_from, loader, settings.precision)
            continue
        settings = fit_to_data(settings, len(ctx.data.train))
        if cfg.epochs is not None:
            settings = dataclasses.replace(settings, epochs=cfg.epochs,
                                           warmup_epochs=min(settings.warmup_epochs, cfg.epochs - 1))
        try:
            results[kind] = _train_teacher(ctx, cfg, kind, settings, layout.squeeze_dir(kind), trainer,
                                           ds_settings, loader)
        except Interrupted as exc:
            log.warning("%s; rerun with resume=true to continue", exc)
            return {"interrupted": kind, "teachers": results}
    result: dict[str, Any] = {"teachers": results}
    barrier()
    if not ctx.dist.is_main:
        return result
    summaries = {kind: _read_json(layout.bn_stats(kind))["layers"] for kind in TEACHER_KINDS
                 if layout.bn_stats(kind).is_file()}
    if summaries:
        result["bn_plot"] = str(plot_bn_variance(summaries, layout.bn_variance_plot))
        result["bn_stats"] = {kind: str(layout.bn_stats(kind)) for kind in summaries}
    return result


def parse_trainer(sections: dict[str, Any], world_size: int = 1) -> tuple[str, Optional[DeepSpeedSettings]]:
    """The trainer that runs (trainer=auto resolved for ``world_size``: single for one process, ddp
    for more) and, for trainer=deepspeed, the deepspeed= settings."""
    trainer = from_mapping(TrainerConfig, sections.get("trainer") or {}, "trainer")
    name = resolve_trainer(trainer.name, world_size)
    if name != "deepspeed":
        return name, None
    settings = from_mapping(DeepSpeedSettings, sections.get("deepspeed") or {}, "deepspeed")
    deepspeed_config(settings, 1, 1, torch.device("cpu"))  # a bad JSON or ZeRO stage fails before training
    return name, settings


def _read_json(path: Path) -> Any:
    import json

    return json.loads(path.read_text())


def _flip_for(cfg: SqueezeConfig, channels: int) -> bool:
    return cfg.flip if cfg.flip is not None else channels == 3


def _finished_teacher(ctx: RunContext, kind: str, path: Path, fingerprint: dict) -> Optional[dict]:
    """With resume=true, the summary of a finished teacher made with ``fingerprint`` (one made with other
    settings is refused); None when it has to be trained (resume=false announces the replacement)."""
    if not path.is_file():
        return None
    payload = read_teacher(path)
    if ctx.run.resume and payload["metrics"].get("finished"):
        require_match(path, payload.get("fingerprint"), fingerprint, f"{kind} teacher")
        log.info("%s teacher already finished at %s; skipping (resume=true)", kind, path)
        return _summary(path, payload["metrics"], skipped=True)
    if not ctx.run.resume and ctx.dist.is_main:
        announce_overwrite(path, f"{kind} teacher")
    return None


def _read_import(ctx: RunContext, cfg: SqueezeConfig, kind: str,
                 source: str) -> tuple[ClassifierNet, list[Imported]]:
    """A fresh model and what ``source`` (and, for the SSL teacher, squeeze.probe.init_from) gives it: one
    ConfigError line when a file is missing or does not fit."""
    bundle = ctx.data
    model = build_model(ctx.model_cfg, bundle.num_classes, bundle.channels, bundle.image_size)
    setting = "ssl.init_from" if kind == "ssl" else "squeeze.supervised.init_from"
    name = ctx.model_cfg.name
    imports = [read_backbone(source, model, setting, name, classifier=kind == "supervised")]
    if kind == "ssl" and cfg.probe.init_from:
        imports.append(read_head(cfg.probe.init_from, model, "squeeze.probe.init_from", name))
    return model, imports


def _import_teacher(ctx: RunContext, cfg: SqueezeConfig, kind: str, source: str,
                    loader: Optional[LoaderConfig] = None, precision: str = "fp32") -> dict:
    """A teacher from a public checkpoint instead of pretraining: the SSL backbone is linear-probed unless
    squeeze.probe.init_from gives its released head; written like a trained teacher."""
    started = time.perf_counter()
    layout = RunLayout(ctx.run_dir)
    teacher_path = layout.teacher(kind)
    model, imports = _read_import(ctx, cfg, kind, source)
    backbone, head = imports[0], (imports[1] if len(imports) > 1 else None)
    probes = kind == "ssl" and head is None
    fingerprint = {"import": backbone.record(), "head": head.record() if head else None,
                   "probe": dataclasses.asdict(cfg.probe) if probes else None,
                   "model": dataclasses.asdict(ctx.model_cfg), "data": data_facts(ctx.data),
                   "seed": ctx.run.seed if probes else None}
    if loader is not None and loader.external:
        fingerprint["loader"] = loader.name
    finished = _finished_teacher(ctx, kind, teacher_path, fingerprint)
    if finished is not None:
        return finished
    install(model, *imports)
    log.info("%s teacher: imported %s (%s)%s", kind, backbone.path, backbone.layout,
             f", head from {head.path} ({head.layout})" if head else "")
    if not ctx.dist.is_main:
        return {"path": str(teacher_path), "skipped": False}
    model.to(ctx.dist.device)
    loader = loader or LoaderConfig()
    final: dict[str, Any] = {"method": "import", "epochs": 0, "pretrain_seconds": 0.0,
                             "imported_from": backbone.source, "file": str(backbone.path),
                             "layout": backbone.layout, "sha256": backbone.sha256, "loader": loader.name}
    probe_rows: list[dict] = []
    test_loader = loader.eval_loader(ctx.data, "test") if loader.external else None
    if probes:
        probe_rows, probe_final = _probe(ctx, cfg, model, loader, precision)
        final.update(probe_final)
    elif head is not None:
        final.update(head_from=head.source, head_file=str(head.path), head_layout=head.layout,
                     head_sha256=head.sha256, probe_seconds=0.0,
                     probe_top1=evaluate_top1(model, ctx.data.test, ctx.data.normalize, ctx.dist.device,
                                              workers=cfg.workers, loader=test_loader))
    else:
        final["top1"] = evaluate_top1(model, ctx.data.test, ctx.data.normalize, ctx.dist.device,
                                      workers=cfg.workers, loader=test_loader)
    final["seconds"] = time.perf_counter() - started
    final["finished"] = True
    model.cpu()
    save_json({"teacher": kind, "method": "import", "layers": bn_variance_summary(model, cfg.bn_hist_bins)},
              layout.bn_stats(kind))
    _write_metrics(layout.squeeze_dir(kind), pretrain=[], probe=probe_rows, final=final)
    save_teacher(teacher_path, model, kind=kind, model_cfg=ctx.model_cfg, bundle=ctx.data, metrics=final,
                 fingerprint=fingerprint)
    accuracy = f"probe top-1 {final['probe_top1']:.4f}" if kind == "ssl" else f"top-1 {final['top1']:.4f}"
    log.info("%s teacher imported from %s: %s -> %s", kind, backbone.source, accuracy, teacher_path)
    return _summary(teacher_path, final, skipped=False)


def _train_teacher(ctx: RunContext, cfg: SqueezeConfig, kind: str, settings: TrainSettings,
                   folder: Path, trainer: str = "single", ds_settings: Optional[DeepSpeedSettings] = None,
                   loader: Optional[LoaderConfig] = None) -> dict:
    bundle = ctx.data
    teacher_path = RunLayout(ctx.run_dir).teacher(kind)
    started = time.perf_counter()
    device = ctx.dist.device
    torch.manual_seed(ctx.run.seed)
    model = build_model(ctx.model_cfg, bundle.num_classes, bundle.channels, bundle.image_size)
    generator = torch.Generator().manual_seed(ctx.run.seed * 1000 + _SEED_STREAM[kind])
    spec = method_spec(settings.name)
    method = spec.build(model, settings, generator)
    augment = spec_for(settings.augment, bundle.image_size, _flip_for(cfg, bundle.channels), cfg.crop_scale)
    fingerprint = {"settings": dataclasses.asdict(settings),
                   "augment": dataclasses.asdict(augment) if augment else None,
                   "model": dataclasses.asdict(ctx.model_cfg), "data": data_facts(bundle), "seed": ctx.run.seed,
                   # image trees crop views from the full-resolution files (engine.data.views), others on the device
                   "views_from": "files" if hasattr(bundle.train, "crop_views") else "device"}
    if loader is not None and loader.external:
        fingerprint["loader"] = loader.name
    # The teacher records what made it: the pretraining fingerprint, plus the probe for an SSL teacher.
    teacher_fingerprint = {**fingerprint, "probe": dataclasses.asdict(cfg.probe) if kind == "ssl" else None}
    finished = _finished_teacher(ctx, kind, teacher_path, teacher_fingerprint)
    if finished is not None:
        return finished
    schedule = Schedule(settings.epochs, settings.batch_size, settings.lr, settings.momentum,
                        settings.weight_decay, settings.warmup_epochs)
    loader = loader or LoaderConfig()
    view_loader = None
    if loader.external:  # loader=torch keeps the in-process batches (and its fingerprint)
        view_loader = _view_loader(ctx, loader, augment, settings.batch_size, method.num_views,
                                   ctx.run.seed * 1000 + _SEED_STREAM[kind])

    def write_progress(row: dict) -> None:
        if ctx.dist.is_main:
            _write_metrics(folder, pretrain=history_so_far + [row], probe=[], final={"finished": False})
        history_so_far.append(row)

    history_so_far: list[dict] = []
    pretrain_logger = open_logger(parse_logger(ctx.sections), RunLayout(ctx.run_dir).tensorboard("squeeze", kind),
                                  ctx.dist.is_main)
    history = train(method, bundle.train, schedule=schedule, spec=augment, normalize=bundle.normalize,
                    device=device, generator=generator, state_path=RunLayout(ctx.run_dir).squeeze_state(kind),
                    fingerprint=fingerprint, resume=ctx.run.resume, stop_after_epochs=cfg.stop_after_epochs,
                    workers=cfg.workers, progress=ctx.run.progress, desc=f"{kind}:{settings.name}",
                    on_epoch=write_progress, trainer=trainer, dist=ctx.dist, deepspeed=ds_settings,
                    loader=view_loader, precision=settings.precision, logger=pretrain_logger,
                    cuda_graphs=cfg.cuda_graphs, compile_encoders=cfg.compile)
    pretrain_logger.close()
    state_file = rank_state_path(RunLayout(ctx.run_dir).squeeze_state(kind), ctx.dist.rank, ctx.dist.world_size)
    # BN running statistics followed each rank's shard; the teacher gets their mean.
    average_buffers(model)
    if not ctx.dist.is_main:  # probe, summaries and the teacher file are rank 0's
        state_file.unlink(missing_ok=True)
        return {"path": str(teacher_path), "skipped": False}
    pretrain_seconds = sum(row["seconds"] for row in history)
    images = sum(row["images_per_s"] * row["seconds"] for row in history)
    final: dict[str, Any] = {"method": settings.name, "epochs": settings.epochs,
                             "pretrain_seconds": pretrain_seconds,
                             "images_per_s": images / pretrain_seconds if pretrain_seconds else 0.0,
                             "augment": fingerprint["augment"], "settings": fingerprint["settings"],
                             "trainer": trainer, "world_size": ctx.dist.world_size, "loader": loader.name}
    if ds_settings is not None:
        final["zero_stage"] = ds_settings.zero_stage
        # bf16 = autocast around the forward; the weights and BN statistics saved here stay fp32
        final["bf16"] = deepspeed_config(ds_settings, 1, 1, device, settings.precision)["torch_autocast"]["enabled"]
    probe_rows: list[dict] = []
    if kind == "ssl":
        probe_rows, probe_final = _probe(ctx, cfg, model, loader, settings.precision)
        final.update(probe_final)
    else:
        final["top1"] = evaluate_top1(model, bundle.test, bundle.normalize, device, workers=cfg.workers,
                                      loader=loader.eval_loader(bundle, "test") if loader.external else None)
    final["seconds"] = pretrain_seconds + final.get("probe_seconds", 0.0)
    final["wall_seconds_this_process"] = time.perf_counter() - started
    final["finished"] = True
    model.cpu()
    bn = bn_variance_summary(model, cfg.bn_hist_bins)
    save_json({"teacher": kind, "method": settings.name, "layers": bn}, RunLayout(ctx.run_dir).bn_stats(kind))
    _write_metrics(folder, pretrain=history, probe=probe_rows, final=final)
    save_teacher(teacher_path, model, kind=spec.kind, model_cfg=ctx.model_cfg, bundle=bundle, metrics=final,
                 fingerprint=teacher_fingerprint)
    state_file.unlink(missing_ok=True)
    accuracy = (f"probe top-1 {final['probe_top1']:.4f}" if kind == "ssl" else f"top-1 {final['top1']:.4f}")
    log.info("%s teacher (%s): %s, pretrain %.1fs at %.0f images/s, total %.1fs -> %s", kind, settings.name,
             accuracy, pretrain_seconds, final["images_per_s"], final["seconds"], teacher_path)
    return _summary(teacher_path, final, skipped=False)


def _view_loader(ctx: RunContext, loader: LoaderConfig, augment, batch_size: int, views: int, seed: int):
    """This rank's pretraining batches from loader=ffcv|dali: crop+flip while decoding, [0, 1] views
    (train() adds the photometric steps and normalization), shuffled with ``seed``, full batches."""
    fields = dict(batch_size=max(1, batch_size // ctx.dist.world_size), shuffle=True, seed=seed,
                  drop_last=True, normalize=False, num_workers=loader.num_workers,
                  beton_dir=loader.beton_dir, device=loader.device)
    if augment is not None:
        spec = LoaderSpec.from_augment(augment, views=views, **fields)
    else:  # no augmentation: one eval batch, repeated as identical views
        spec = LoaderSpec(transform="eval", **fields)
    return loader.build(ctx.data, "train", spec, ctx.dist.rank, ctx.dist.world_size)


def _probe(ctx: RunContext, cfg: SqueezeConfig, model,
           loader: Optional[LoaderConfig] = None, precision: str = "fp32") -> tuple[list[dict], dict]:
    p = cfg.probe
    loaders = None
    if loader is not None and loader.external:
        loaders = {split: loader.eval_loader(ctx.data, split) for split in ("train", "test")}
    generator = torch.Generator().manual_seed(ctx.run.seed * 1000 + _SEED_STREAM["probe"])
    logger = open_logger(parse_logger(ctx.sections), RunLayout(ctx.run_dir).tensorboard("squeeze", "probe"),
                         ctx.dist.is_main)
    try:
        return linear_probe(model, ctx.data.train, ctx.data.test, ctx.data.normalize, epochs=p.epochs,
                            batch_size=p.batch_size, lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay,
                            schedule=p.schedule, milestones=tuple(p.milestones), standardize=p.standardize,
                            device=ctx.dist.device, generator=generator, workers=cfg.workers,
                            progress=ctx.run.progress, loaders=loaders, views=p.views,
                            augment=probe_image_spec(ctx.data.image_size, _flip_for(cfg, ctx.data.channels)),
                            precision=precision, logger=logger, mode=p.mode,
                            backbone_lr_scale=p.backbone_lr_scale)
    finally:
        logger.close()


def _probe_only(ctx: RunContext, cfg: SqueezeConfig, loader: Optional[LoaderConfig] = None,
                precision: str = "fp32") -> dict:
    source = Path(ctx.run.teacher) if ctx.run.teacher else RunLayout(ctx.run_dir).teacher("ssl")
    model, payload = load_teacher(source, ctx.model_cfg, ctx.data)
    rows, probe_final = _probe(ctx, cfg, model, loader, precision)
    kind = payload["kind"]
    # A supervised teacher keeps its own classifier; its probed copy goes next to it.
    slot = "ssl" if kind == "ssl" else f"{kind}_probe"
    folder = RunLayout(ctx.run_dir).squeeze_dir(slot)
    metrics = {**payload["metrics"], **probe_final, "probed_from": str(source), "finished": True}
    model.cpu()
    save_json({"teacher": slot, "method": metrics.get("method"),
               "layers": bn_variance_summary(model, cfg.bn_hist_bins)}, RunLayout(ctx.run_dir).bn_stats(slot))
    _write_metrics(folder, pretrain=[], probe=rows, final=metrics)
    path = save_teacher(RunLayout(ctx.run_dir).teacher(slot), model, kind=kind, model_cfg=ctx.model_cfg,
                        bundle=ctx.data, metrics=metrics,
                        fingerprint={"probed_from": payload.get("fingerprint"), "probe": dataclasses.asdict(cfg.probe)})
    log.info("probe of %s: top-1 %.4f -> %s", source, metrics["probe_top1"], path)
    return {"teachers": {slot: _summary(path, metrics, skipped=False)}}


def _summary(path: Path, metrics: dict, skipped: bool) -> dict:
    keys = ("method", "layout", "probe_top1", "top1", "seconds", "pretrain_seconds", "probe_seconds", "images_per_s",
            "epochs")
    return {"path": str(path), "skipped": skipped, **{k: metrics[k] for k in keys if k in metrics}}


_CSV_COLUMNS = ("phase", "epoch", "loss", "lr", "seconds", "images_per_s", "augment_fraction", "train_top1")


def _write_metrics(folder: Path, *, pretrain: list[dict], probe: list[dict], final: dict) -> None:
    save_json({"pretrain": pretrain, "probe": probe, "final": final}, folder / "metrics.json")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for phase, rows in (("pretrain", pretrain), ("probe", probe)):
        for row in rows:
            writer.writerow({"phase": phase, **row})
    save_text(buffer.getvalue(), folder / "metrics.csv")
