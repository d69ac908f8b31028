"""Synthesize a whole distilled set: plan the class batches, run this process's share, assemble.

Each finished batch writes its image files and then a small record (engine.artifacts.distilled),
so a killed run resumes from the finished batches, several processes share the work without
talking to each other until the final barrier, and no process ever holds the whole set: rank 0
assembles only the index. A set's fingerprint (settings, teacher, data, seed) is checked before
any batch is reused.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from engine.artifacts import distilled as store
from engine.artifacts.fingerprint import canonical, digest
from engine.artifacts.teacher import data_facts
from engine.data import DataBundle
from engine.distributed import DistEnv, barrier
from engine.io import save_json
from engine.recover.init import noise_init, real_init, select_real_images
from engine.recover.plan import SynthBatch, batches_for_rank, plan_batches
from engine.recover.settings import RecoverConfig, resolve_augment
from engine.recover.synthesize import Objective, synthesize_batch
from kernels import fused_bn_matching

log = logging.getLogger("scdd.recover")

NON_SEMANTIC_KEYS = ("log_every", "teachers", "backend", "channels_last")
"""RecoverConfig fields that change how a set is made, not what it holds (beyond float rounding)."""


def set_fingerprint(cfg: RecoverConfig, bundle: DataBundle, ipc: int, seed: int, teacher_digest: str) -> dict:
    """What a distilled set depends on: every semantic recover setting, the teacher, the data, ipc, seed."""
    recover = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NON_SEMANTIC_KEYS}
    return {"recover": recover, "teacher": teacher_digest, "data": data_facts(bundle), "ipc": ipc, "seed": seed}


@dataclass
class RecoverResult:
    out_dir: Path
    init: Path | None
    seconds: float
    batches_run: int
    first_ratio: float
    image_iterations_per_s: float


def _reusable(out_dir: Path, fingerprint: dict) -> bool:
    """A complete set made with the same settings for at least this ipc serves smaller ipcs too."""
    if not store.is_complete(out_dir):
        return False
    saved = store.DistilledSet.open(out_dir).index["fingerprint"]
    return saved.get("ipc", 0) >= fingerprint["ipc"] and {**saved, "ipc": fingerprint["ipc"]} == fingerprint


def recover_distilled_set(teacher: nn.Module, bundle: DataBundle, cfg: RecoverConfig, ipc: int,
                          out_dir: Path, dist: DistEnv, seed: int, resume: bool = False,
                          progress: bool = True, meta: dict | None = None,
                          teacher_digest: str = "") -> RecoverResult:
    """Write the set ``out_dir`` (image tree + index.json, grid, loss log) with ``ipc`` images per class."""
    start = time.time()
    fingerprint = set_fingerprint(cfg, bundle, ipc, seed, teacher_digest)
    set_digest = digest(fingerprint)
    init_path = out_dir / "init" if cfg.init == "real" else None
    if resume and _reusable(out_dir, canonical(fingerprint)):
        return RecoverResult(out_dir=out_dir, init=init_path, seconds=time.time() - start, batches_run=0,
                             first_ratio=float("nan"), image_iterations_per_s=0.0)
    plan = plan_batches(bundle.num_classes, ipc, cfg.classes_per_batch, cfg.ipc_per_batch)
    mine = batches_for_rank(plan, dist.rank, dist.world_size)
    if not mine:  # more processes than class batches: this rank only joins the barriers
        log.info("rank %d of %d has no class batch of %s (%d in all); it waits for the others",
                 dist.rank, dist.world_size, out_dir.name, len(plan))
    if dist.is_main:
        store.prepare_set_dir(out_dir, fingerprint, resume)
    barrier()

    device = dist.device
    teacher = teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    channels_last = cfg.channels_last
    if channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    aug = resolve_augment(cfg, bundle.image_size, bundle.channels)
    bounds = bundle.pixel_bounds()
    objective = Objective(r_bn=cfg.r_bn, first_bn_multiplier=cfg.first_bn_multiplier,
                          iterations=cfg.iterations,
                          lr=cfg.real_init_lr if cfg.init == "real" and cfg.real_init_lr else cfg.lr,
                          log_every=cfg.log_every)
    codec = store.Codec(cfg.image_format, cfg.jpeg_quality)
    chosen = None
    if cfg.init == "real":
        chosen = select_real_images(teacher, bundle, ipc, cfg.real_init_select, cfg.real_init_pool,
                                    seed, device)

    todo = [b for b in mine if not (resume and store.read_batch(out_dir, b.index, set_digest) is not None)]
    first_ratio = float("nan")
    bar = tqdm(todo, desc=f"recover {out_dir.name}", disable=not progress or not dist.is_main,
               unit="batch", dynamic_ncols=True)
    with fused_bn_matching(teacher, backend=cfg.backend) as bn_modules:
        for batch in bar:
            ratio = _synthesize_one(batch, teacher, bn_modules, bundle, chosen, objective, aug, bounds, seed,
                                    channels_last, device, out_dir, codec, set_digest, bar)
            if batch is todo[0]:
                first_ratio = ratio
                if dist.is_main:
                    tqdm.write(f"recover: first step r_bn*BN/CE = {first_ratio:.3g} "
                               f"(r_bn={cfg.r_bn}; far from ~0.1-10 means r_bn is probably off)")
    seconds_synth = time.time() - start
    barrier()
    if dist.is_main:
        _assemble(plan, bundle, cfg, ipc, out_dir, seed, meta or {}, fingerprint, set_digest)
    barrier()
    images_done = sum(len(b.classes) for b in todo)
    rate = images_done * cfg.iterations / seconds_synth if todo else 0.0
    return RecoverResult(out_dir=out_dir, init=init_path, seconds=time.time() - start, batches_run=len(todo),
                         first_ratio=first_ratio, image_iterations_per_s=rate)


def _synthesize_one(batch: SynthBatch, teacher, bn_modules, bundle: DataBundle, chosen, objective: Objective,
                    aug, bounds, seed: int, channels_last: bool, device, out_dir: Path, codec, set_digest: str,
                    bar) -> float:
    """Optimize one class batch and write it (images, then its record); returns its first-step ratio."""
    generator = torch.Generator().manual_seed(batch.seed(seed))
    labels = torch.tensor(batch.classes, dtype=torch.long)
    if chosen is not None:
        init = real_init(bundle, chosen, batch.classes, batch.ipc_indices)
    else:
        init = noise_init(len(batch.classes), bundle.channels, bundle.image_size, generator)
    result = synthesize_batch(
        teacher, bn_modules, init.to(device), labels.to(device), objective, aug, bounds,
        generator, channels_last=channels_last,
        on_step=lambda row: bar.set_postfix(ce=f"{row['ce']:.3f}", bn=f"{row['bn']:.3f}"))
    store.write_batch(out_dir, batch.index, images01=bundle.denormalize(result.images).clamp(0, 1),
                      labels=batch.classes, ipc_index=batch.ipc_indices, class_names=bundle.class_names,
                      codec=codec, set_digest=set_digest, log_rows=result.log, first_ratio=result.first_ratio,
                      init01=bundle.denormalize(init.cpu()).clamp(0, 1) if chosen is not None else None)
    return result.first_ratio


def _assemble(plan: list[SynthBatch], bundle: DataBundle, cfg: RecoverConfig, ipc: int, out_dir: Path,
              seed: int, meta: dict, fingerprint: dict, set_digest: str) -> None:
    records = []
    for batch in plan:
        record = store.read_batch(out_dir, batch.index, set_digest)
        if record is None:
            raise RuntimeError(f"batch {batch.index} missing after synthesis in {out_dir}")
        records.append(record)
    log_rows = [{"batch": batch.index, **row} for batch, record in zip(plan, records) for row in record["log"]]
    index_meta: dict[str, Any] = {"class_names": list(bundle.class_names), "num_classes": bundle.num_classes,
                                  "channels": bundle.channels, "image_size": bundle.image_size,
                                  "mean": list(bundle.mean), "std": list(bundle.std), "data": bundle.name,
                                  "ipc": ipc, "seed": seed, "image_format": cfg.image_format,
                                  "jpeg_quality": cfg.jpeg_quality, **meta}
    store.finalize_set(out_dir, records, index_meta, fingerprint)
    store.write_loss_log(log_rows, out_dir / "loss_log.csv")
    first = [row for row in log_rows if row["step"] == 0]
    last = [row for row in log_rows if row["step"] == cfg.iterations - 1]
    save_json({"batches": len(plan), "images": sum(len(r["labels"]) for r in records),
               "first_step": {"ce": _mean(first, "ce"), "bn": _mean(first, "bn")},
               "last_step": {"ce": _mean(last, "ce"), "bn": _mean(last, "bn"), "acc": _mean(last, "acc")}},
              out_dir / "summary.json")


def _mean(rows: list[dict], key: str) -> float:
    return float(sum(r[key] for r in rows) / len(rows)) if rows else float("nan")
