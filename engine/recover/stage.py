"""`scdd stage=recover`: synthesize the distilled set from each requested teacher."""
from __future__ import annotations

import dataclasses

from pathlib import Path
from typing import Optional, Sequence

from engine.artifacts.layout import RunLayout
from engine.artifacts.teacher import load_teacher, teacher_digest
from engine.config import from_mapping
from engine.context import RunContext
from engine.distributed import task_share
from engine.errors import ConfigError
from engine.training.precision import resolve_precision
from engine.models import ModelConfig, has_batchnorm
from engine.recover.distill import merge_distilled_set, recover_distilled_set
from engine.recover.plan import batches_for_rank, plan_batches
from engine.recover.settings import RecoverConfig
from engine.recover.synthesize import require_cuda_graphs_possible
from engine.training.tb_logger import open_logger, parse_logger, replay_loss_log


def require_bn_teacher(model_cfg: ModelConfig) -> None:
    """Recover matches the teacher's BatchNorm statistics; a model without BN layers has none to match."""
    if not has_batchnorm(model_cfg):
        raise ConfigError(f"model={model_cfg.name} has no BatchNorm layers, so it cannot be the recover teacher "
                          f"(recover matches the teacher's BN statistics); use a BN model as the teacher "
                          f"(e.g. model=resnet18 or model=convnet) and train {model_cfg.name} as a student "
                          f"with evaluate.student={model_cfg.name}")


def requested_teachers(ctx: RunContext, cfg: RecoverConfig) -> list[Path]:
    if ctx.run.teacher:
        return [Path(ctx.run.teacher)]
    layout = RunLayout(ctx.run_dir)
    existing = [layout.teacher(kind) for kind in cfg.teachers if layout.teacher(kind).is_file()]
    if not existing:
        raise ConfigError(f"no teacher checkpoint in {ctx.run_dir / 'squeeze'}; run `scdd stage=squeeze` "
                          f"in this run dir first (hydra.run.dir=...) or pass teacher=PATH")
    return existing


def build_recover_config(ctx: RunContext, **overrides) -> RecoverConfig:
    section = dict(ctx.sections.get("recover") or {})
    section.update(overrides)
    cfg = from_mapping(RecoverConfig, section, "recover")
    # auto is settled here, once, for this run's device: the set's fingerprint records fp32 or bf16
    return dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, ctx.dist.device))


def validate(ctx: RunContext, *, teachers_from_squeeze: Optional[Sequence[str]] = None, **overrides) -> None:
    """Every check recover makes before synthesis, without synthesizing: its settings, a model with BN layers
    to match, ipc against the batch plan, the process count and (recover.init=real) the smallest training
    class, recover.cuda_graphs against the device, and the teachers it will read (they exist, are teacher
    checkpoints and fit model= and data=).
    ``teachers_from_squeeze``: the teacher kinds an earlier stage of this run will write (the pipeline), so
    they need not exist yet."""
    cfg = build_recover_config(ctx, **overrides)
    require_bn_teacher(ctx.model_cfg)
    bundle = ctx.data
    ipc = max(ctx.run.ipc)
    plan = plan_batches(bundle.num_classes, ipc, cfg.classes_per_batch, cfg.ipc_per_batch)
    batches_for_rank(plan, ctx.dist.rank, ctx.dist.world_size)
    if cfg.cuda_graphs:
        require_cuda_graphs_possible(ctx.dist.device)
    task_share()  # a job-array task's variables, checked before any work
    if cfg.init == "real":
        ctx.require_ipc_fits(ipc, "recover.init=real")
    if ctx.run.teacher:
        load_teacher(Path(ctx.run.teacher), ctx.model_cfg, bundle)
        return
    if teachers_from_squeeze is None:
        for path in requested_teachers(ctx, cfg):
            load_teacher(path, ctx.model_cfg, bundle)
        return
    layout = RunLayout(ctx.run_dir)
    coming = [kind for kind in cfg.teachers if kind in teachers_from_squeeze]
    existing = [layout.teacher(kind) for kind in cfg.teachers
                if kind not in coming and layout.teacher(kind).is_file()]
    if not coming and not existing:
        raise ConfigError(f"recover.init={cfg.init} needs a teacher of {list(cfg.teachers)} but squeeze.teachers="
                          f"{list(teachers_from_squeeze)} makes none of them; add it to squeeze.teachers")
    for path in existing:
        load_teacher(path, ctx.model_cfg, bundle)


def _teacher_sets(ctx: RunContext, cfg: RecoverConfig):
    """For each requested teacher: (its model, (name, set folder, teacher digest, index meta))."""
    require_bn_teacher(ctx.model_cfg)
    for path in requested_teachers(ctx, cfg):
        teacher, payload = load_teacher(path, ctx.model_cfg, ctx.data)
        name, source = payload["kind"], teacher_digest(payload)
        meta = {"teacher": str(path), "teacher_kind": name, "teacher_digest": source}
        yield teacher, (name, RunLayout(ctx.run_dir).recover_set(name, cfg.init), source, meta)


def run(ctx: RunContext, **overrides) -> dict:
    cfg = build_recover_config(ctx, **overrides)
    bundle = ctx.data
    ipc = max(ctx.run.ipc)
    results = {}
    task = task_share()
    for teacher, target in _teacher_sets(ctx, cfg):
        name, out_dir, source, meta = target
        result = recover_distilled_set(
            teacher, bundle, cfg, ipc, out_dir, ctx.dist, ctx.run.seed, resume=ctx.run.resume,
            progress=ctx.run.progress, teacher_digest=source, task=task, meta=meta)
        results[f"{name}-{cfg.init}"] = {
            "path": str(result.out_dir), "init_path": str(result.init) if result.init else None,
            "seconds": result.seconds, "first_ratio": result.first_ratio,
            "image_iterations_per_s": result.image_iterations_per_s}
        if ctx.dist.is_main and not task.is_array and result.batches_run:
            logger = open_logger(parse_logger(ctx.sections),
                                 RunLayout(ctx.run_dir).tensorboard("recover", out_dir.name))
            replay_loss_log(logger, result.out_dir / "loss_log.csv")
            logger.close()
        if ctx.dist.is_main and not task.is_array:
            print(f"recover {name}-{cfg.init}: {ipc} ipc x {bundle.num_classes} classes in "
                  f"{result.seconds:.1f}s ({result.image_iterations_per_s:.0f} image-iterations/s) "
                  f"-> {result.out_dir}")
    return {"sets": results}


def merge(ctx: RunContext) -> dict:
    """`scdd stage=merge` for recover: verify and assemble the sets job-array tasks made in this run dir."""
    cfg = build_recover_config(ctx)
    bundle = ctx.data
    ipc = max(ctx.run.ipc)
    results = {}
    for _, target in _teacher_sets(ctx, cfg):
        name, out_dir, source, meta = target
        batches = merge_distilled_set(bundle, cfg, ipc, out_dir, ctx.run.seed, teacher_digest=source, meta=meta)
        results[f"{name}-{cfg.init}"] = {"path": str(out_dir), "batches": batches}
        print(f"merge: {name}-{cfg.init}: {batches} batches verified and assembled -> {out_dir}")
    return {"sets": results}
