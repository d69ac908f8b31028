"""Synthesize a whole distilled set: plan the class batches, run this process's share, assemble.

Each finished batch writes its image files and then a small record (engine.artifacts.distilled),
so a killed run resumes from the finished batches, several processes share the work without
talking to each other until the final barrier, and no process ever holds the whole set: rank 0
assembles only the index. A set's fingerprint (settings, teacher, data, seed) is checked before
any batch is reused.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from engine.artifacts import distilled as store
from engine.artifacts.fingerprint import canonical, digest, require_match
from engine.artifacts.teacher import data_facts
from engine.data import DataBundle
from engine import preemption
from engine.distributed import DistEnv, TaskShare, barrier
from engine.errors import ConfigError
from engine.io import save_json
from engine.recover.init import noise_init, rded_starts, real_init, select_real_images
from engine.recover.plan import (SynthBatch, batches_for_rank, batches_for_task, plan_batches, step_groups,
                                 task_of_batch)
from engine.recover.settings import RecoverConfig, resolve_augment
from engine.recover.synthesize import Objective, require_cuda_graphs_possible, synthesize_groups
from engine.training.precision import resolve_precision
from kernels import fused_bn_matching

log = logging.getLogger("scdd.recover")

NON_SEMANTIC_KEYS = ("log_every", "teachers", "backend", "channels_last", "groups_per_step", "cuda_graphs")
"""RecoverConfig fields that change how a set is made, not what it holds (beyond float rounding).
groups_per_step and cuda_graphs belong here like backend: every batch keeps its own statistics, seed
and augmentation, so a batch's images differ only by rounding (tests/recover/test_groups.py), and a
resumed run or a job-array task may use another G and still reuse or merge finished batches."""


NEW_KEY_DEFAULTS = {"precision": "fp32", "real_init_iterations": None, "rded_crops": 0, "rded_patches": 1,
                    "crop_curriculum": 0.0}
"""Settings added after sets were made, at the value that makes what they made before."""


def set_fingerprint(cfg: RecoverConfig, bundle: DataBundle, ipc: int, seed: int, teacher_digest: str) -> dict:
    """What a distilled set depends on: every semantic recover setting, the teacher, the data, ipc, seed."""
    recover = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NON_SEMANTIC_KEYS}
    # a default adds nothing, so sets made before the setting existed keep their fingerprint
    for key, default in NEW_KEY_DEFAULTS.items():
        if recover[key] == default:
            del recover[key]
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
                          teacher_digest: str = "", task: TaskShare = TaskShare()) -> RecoverResult:
    """Write the set ``out_dir`` (image tree + index.json, grid, loss log) with ``ipc`` images per class.

    Under a job array (``task.count > 1``) only this task's contiguous range of plan batches is made, in a
    folder the tasks share: nothing is deleted (a folder made with other settings is refused), finished
    batches are kept, and no index is written: ``scdd stage=merge`` verifies the shares and writes it.
    A preemption signal stops the run between batches (the batch in flight is finished and written)."""
    start = time.time()
    cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, dist.device))
    fingerprint = set_fingerprint(cfg, bundle, ipc, seed, teacher_digest)
    set_digest = digest(fingerprint)
    init_path = out_dir / "init" if cfg.init == "real" else None
    if resume and _reusable(out_dir, canonical(fingerprint)):
        return RecoverResult(out_dir=out_dir, init=init_path, seconds=time.time() - start, batches_run=0,
                             first_ratio=float("nan"), image_iterations_per_s=0.0)
    plan = plan_batches(bundle.num_classes, ipc, cfg.classes_per_batch, cfg.ipc_per_batch)
    shared = task.is_array  # the folder is shared by the array's tasks: never delete, keep finished batches
    mine = batches_for_rank(batches_for_task(plan, task.index, task.count), dist.rank, dist.world_size)
    if not mine:  # more processes than class batches: this rank only joins the barriers
        log.info("rank %d of %d has no class batch of %s (%d in all); it waits for the others",
                 dist.rank, dist.world_size, out_dir.name, len(plan))
    if dist.is_main:
        store.prepare_set_dir(out_dir, fingerprint, resume or shared)
    barrier()

    device = torch.device(dist.device)
    if cfg.cuda_graphs:
        require_cuda_graphs_possible(device)
    teacher = teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    channels_last = cfg.channels_last
    if channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    aug = resolve_augment(cfg, bundle.image_size, bundle.channels)
    bounds = bundle.pixel_bounds()
    objective = Objective(r_bn=cfg.r_bn, first_bn_multiplier=cfg.first_bn_multiplier,
                          iterations=cfg.steps,
                          lr=cfg.real_init_lr if cfg.init == "real" and cfg.real_init_lr else cfg.lr,
                          log_every=cfg.log_every)
    codec = store.Codec(cfg.image_format, cfg.jpeg_quality)
    chosen = None
    if cfg.init == "real" and cfg.rded_crops:
        chosen = rded_starts(teacher, bundle, ipc, cfg.real_init_pool, cfg.rded_crops, cfg.rded_patches,
                             aug.crop_scale, seed, device)
    elif cfg.init == "real":
        chosen = select_real_images(teacher, bundle, ipc, cfg.real_init_select, cfg.real_init_pool,
                                    seed, device)

    todo = [b for b in mine
            if not ((resume or shared) and store.read_batch(out_dir, b.index, set_digest) is not None)]
    first_ratio = float("nan")
    bar = tqdm(total=len(todo), desc=f"recover {out_dir.name}", disable=not progress or not dist.is_main,
               unit="batch", dynamic_ncols=True)
    step_options = {"channels_last": channels_last, "precision": cfg.precision, "cuda_graphs": cfg.cuda_graphs}
    with fused_bn_matching(teacher, backend=cfg.backend) as bn_modules:
        done = 0
        for chunk in step_groups(todo, cfg.groups_per_step):
            preemption.check(f"{done} of {len(todo)} batches of {out_dir} (each finished batch is kept)")
            ratio = _synthesize_chunk(chunk, teacher, bn_modules, bundle, chosen, objective, aug, bounds, seed,
                                      step_options, device, out_dir, codec, set_digest, bar, task)
            if done == 0:
                first_ratio = ratio
                if dist.is_main:
                    tqdm.write(f"recover: first step r_bn*BN/CE = {first_ratio:.3g} "
                               f"(r_bn={cfg.r_bn}; far from ~0.1-10 means r_bn is probably off)")
            done += len(chunk)
            bar.update(len(chunk))
    bar.close()
    seconds_synth = time.time() - start
    barrier()
    if shared:
        if dist.is_main:
            print(f"recover task {task.index} of {task.count}: wrote {len(mine)} of {len(plan)} batches of "
                  f"{out_dir}; when every task is done, run `scdd stage=merge` with the same settings")
    elif dist.is_main:
        _assemble(plan, bundle, cfg, ipc, out_dir, seed, meta or {}, fingerprint, set_digest)
    barrier()
    images_done = sum(len(b.classes) for b in todo)
    rate = images_done * objective.iterations / seconds_synth if todo else 0.0
    return RecoverResult(out_dir=out_dir, init=init_path, seconds=time.time() - start, batches_run=len(todo),
                         first_ratio=first_ratio, image_iterations_per_s=rate)


def _synthesize_chunk(chunk: list[SynthBatch], teacher, bn_modules, bundle: DataBundle, chosen,
                      objective: Objective, aug, bounds, seed: int, step_options: dict, device, out_dir: Path,
                      codec, set_digest: str, bar, task: TaskShare = TaskShare()) -> float:
    """Optimize class batches of one size together (one teacher pass per step, per-batch statistics,
    seeds and augmentation) and write each (images, then its record); returns the first one's
    first-step ratio."""
    generators, inits, labels = [], [], []
    for batch in chunk:
        generator = torch.Generator().manual_seed(batch.seed(seed))
        if chosen is not None:
            init = real_init(bundle, chosen, batch.classes, batch.ipc_indices)
        else:
            init = noise_init(len(batch.classes), bundle.channels, bundle.image_size, generator)
        generators.append(generator)
        inits.append(init)
        labels.append(torch.tensor(batch.classes, dtype=torch.long))
    results = synthesize_groups(
        teacher, bn_modules, [init.to(device) for init in inits], [t.to(device) for t in labels], objective, aug,
        bounds, generators, **step_options,
        # the bar's live losses are a device read per log step: only when the bar is shown
        on_step=None if bar.disable else (lambda row: bar.set_postfix(ce=f"{row['ce']:.3f}", bn=f"{row['bn']:.3f}")))
    for batch, init, result in zip(chunk, inits, results):
        store.write_batch(out_dir, batch.index, images01=bundle.denormalize(result.images).clamp(0, 1),
                          labels=batch.classes, ipc_index=batch.ipc_indices, class_names=bundle.class_names,
                          codec=codec, set_digest=set_digest, log_rows=result.log, first_ratio=result.first_ratio,
                          init01=bundle.denormalize(init.cpu()).clamp(0, 1) if chosen is not None else None,
                          task={"index": task.index, "count": task.count})
    return results[0].first_ratio


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
    last = [row for row in log_rows if row["step"] == cfg.steps - 1]
    save_json({"batches": len(plan), "images": sum(len(r["labels"]) for r in records),
               "first_step": {"ce": _mean(first, "ce"), "bn": _mean(first, "bn")},
               "last_step": {"ce": _mean(last, "ce"), "bn": _mean(last, "bn"), "acc": _mean(last, "acc")}},
              out_dir / "summary.json")


def _mean(rows: list[dict], key: str) -> float:
    return float(sum(r[key] for r in rows) / len(rows)) if rows else float("nan")


def merge_distilled_set(bundle: DataBundle, cfg: RecoverConfig, ipc: int, out_dir: Path, seed: int,
                        meta: dict | None = None, teacher_digest: str = "",
                        task_count: int | None = None) -> int:
    """Assemble a set made by job-array tasks: every plan batch's record present, made with this
    fingerprint, holding the classes and ipc indices the plan gives it, every (class, ipc index) exactly
    once; then write the index. Returns the number of batches. A missing or mismatched share is refused
    with one line naming the batch and the task that should have made it."""
    # the tasks ran on this kind of device (the stage resolves auto with the run's device first)
    cfg = dataclasses.replace(cfg, precision=resolve_precision(
        cfg.precision, torch.device("cuda" if torch.cuda.is_available() else "cpu")))
    fingerprint = set_fingerprint(cfg, bundle, ipc, seed, teacher_digest)
    set_digest = digest(fingerprint)
    plan = plan_batches(bundle.num_classes, ipc, cfg.classes_per_batch, cfg.ipc_per_batch)
    saved_file = out_dir / store.FINGERPRINT_FILE
    if not saved_file.is_file():
        raise ConfigError(f"{out_dir} holds no shares of a distilled set ({store.FINGERPRINT_FILE} missing); run "
                          f"the recover tasks first (SCDD_TASK_ID/SCDD_TASK_COUNT or a SLURM array)")
    require_match(out_dir, json.loads(saved_file.read_text()).get("fingerprint"), canonical(fingerprint),
                  "distilled set")
    raw = {}
    for batch in plan:
        path = store.batch_record_path(out_dir, batch.index)
        try:
            raw[batch.index] = json.loads(path.read_text()) if path.is_file() else None
        except (OSError, ValueError):
            raw[batch.index] = None  # torn: the same as missing
    counts = {r["task"]["count"] for r in raw.values() if r and isinstance(r.get("task"), dict)}
    count = task_count or (max(counts) if counts else 1)

    def owner(position: int) -> str:
        t = task_of_batch(len(plan), position, count)
        return (f"job-array task {t} of {count} should have made it; rerun that task (SCDD_TASK_ID={t} "
                f"SCDD_TASK_COUNT={count}) with resume=true, then merge again")

    seen: dict[tuple[int, int], int] = {}
    for position, batch in enumerate(plan):
        record, path = raw[batch.index], store.batch_record_path(out_dir, batch.index)
        where = (f"batch {batch.index} (classes {batch.classes[0]}-{max(batch.classes)}, ipc "
                 f"{min(batch.ipc_indices)}-{max(batch.ipc_indices)})")
        if record is None:
            raise ConfigError(f"merge: {where} of {out_dir} is missing or unreadable ({path.name}); {owner(position)}")
        if record.get("digest") != set_digest:
            raise ConfigError(f"merge: {where} of {out_dir} was made with other settings (set digest "
                              f"{record.get('digest')}, this merge expects {set_digest}: teacher or recover "
                              f"settings differ); {owner(position)}")
        if (tuple(record["labels"]) != batch.classes or tuple(record["ipc_index"]) != batch.ipc_indices
                or len(record["files"]) != len(batch.classes)):
            raise ConfigError(f"merge: {where} of {out_dir} holds other classes or ipc indices than the plan "
                              f"gives it; {owner(position)}")
        absent = [f for f in record["files"] if not (out_dir / f).is_file()]
        if absent:
            raise ConfigError(f"merge: {where} of {out_dir} lacks its image {absent[0]}; {owner(position)}")
        for pair in zip(record["labels"], record["ipc_index"]):
            if pair in seen:
                raise ConfigError(f"merge: class {pair[0]} ipc index {pair[1]} is in batches {seen[pair]} and "
                                  f"{batch.index} of {out_dir}; delete {out_dir} and recover it again")
            seen[pair] = batch.index
    wanted = {(c, k) for c in range(bundle.num_classes) for k in range(ipc)}
    if set(seen) != wanted:
        c, k = sorted(wanted - set(seen))[0]
        raise ConfigError(f"merge: class {c} ipc index {k} is in no batch of {out_dir}; delete it and recover again")
    _assemble(plan, bundle, cfg, ipc, out_dir, seed, meta or {}, fingerprint, set_digest)
    return len(plan)
