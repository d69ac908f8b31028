"""Synthesize a whole distilled set: plan the class batches, run this process's share, assemble.

Each finished batch is written atomically as its own file, so a killed run resumes from the
finished batches and several processes share the work without talking to each other until the
final barrier, after which rank 0 assembles the set.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from engine.data import DataBundle
from engine.distributed import DistEnv, barrier
from engine.io import save_json, save_torch
from engine.recover import output
from engine.recover.init import noise_init, real_init, select_real_images
from engine.recover.plan import SynthBatch, batches_for_rank, plan_batches
from engine.recover.settings import RecoverConfig, resolve_augment
from engine.recover.synthesize import Objective, synthesize_batch
from kernels import fused_bn_matching


@dataclass
class RecoverResult:
    out_dir: Path
    distilled: Path
    init: Path | None
    seconds: float
    batches_run: int
    first_ratio: float
    image_iterations_per_s: float


def _batch_file(out_dir: Path, batch: SynthBatch) -> Path:
    return out_dir / "batches" / f"b{batch.index:06d}.pt"


def _load_finished(path: Path) -> dict | None:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # noqa: BLE001 - an unreadable batch file is simply redone
        return None


def recover_distilled_set(teacher: nn.Module, bundle: DataBundle, cfg: RecoverConfig, ipc: int,
                          out_dir: Path, dist: DistEnv, seed: int, resume: bool = False,
                          progress: bool = True, meta: dict | None = None) -> RecoverResult:
    """Write ``out_dir/distilled.pt`` (+ PNG tree, grid, loss log) with ``ipc`` images per class."""
    start = time.time()
    plan = plan_batches(bundle.num_classes, ipc, cfg.classes_per_batch, cfg.ipc_per_batch)
    mine = batches_for_rank(plan, dist.rank, dist.world_size)
    if dist.is_main:
        if not resume and out_dir.exists():
            shutil.rmtree(out_dir)
        (out_dir / "batches").mkdir(parents=True, exist_ok=True)
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
                          lr=cfg.real_init_lr if cfg.init == "real" and cfg.real_init_lr else cfg.lr, log_every=cfg.log_every)
    chosen = None
    if cfg.init == "real":
        chosen = select_real_images(teacher, bundle, ipc, cfg.real_init_select, cfg.real_init_pool,
                                    seed, device)

    todo = [b for b in mine if not (resume and _load_finished(_batch_file(out_dir, b)) is not None)]
    first_ratio = float("nan")
    bar = tqdm(todo, desc=f"recover {out_dir.name}", disable=not progress or not dist.is_main,
               unit="batch", dynamic_ncols=True)
    with fused_bn_matching(teacher, backend=cfg.backend) as bn_modules:
        for batch in bar:
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
            if batch is todo[0]:
                first_ratio = result.first_ratio
                if dist.is_main:
                    tqdm.write(f"recover: first step r_bn*BN/CE = {first_ratio:.3g} "
                               f"(r_bn={cfg.r_bn}; far from ~0.1-10 means r_bn is probably off)")
            save_torch({"images": result.images, "labels": labels,
                        "ipc_index": torch.tensor(batch.ipc_indices, dtype=torch.long),
                        "init": init.cpu() if chosen is not None else None, "log": result.log,
                        "first_ratio": result.first_ratio}, _batch_file(out_dir, batch))
    seconds_synth = time.time() - start
    barrier()
    if dist.is_main:
        _assemble(plan, bundle, cfg, ipc, out_dir, seed, meta or {})
    barrier()
    images_done = sum(len(b.classes) for b in todo)
    rate = images_done * cfg.iterations / seconds_synth if todo else 0.0
    init_path = out_dir / "init" / output.DISTILLED_FILE if cfg.init == "real" else None
    return RecoverResult(out_dir=out_dir, distilled=out_dir / output.DISTILLED_FILE, init=init_path,
                         seconds=time.time() - start, batches_run=len(todo), first_ratio=first_ratio,
                         image_iterations_per_s=rate)


def _assemble(plan: list[SynthBatch], bundle: DataBundle, cfg: RecoverConfig, ipc: int, out_dir: Path,
              seed: int, meta: dict) -> None:
    images, labels, ipc_index, inits, log_rows = [], [], [], [], []
    for batch in plan:
        payload = _load_finished(_batch_file(out_dir, batch))
        if payload is None:
            raise RuntimeError(f"batch {batch.index} missing after synthesis in {out_dir}")
        images.append(payload["images"])
        labels.append(payload["labels"])
        ipc_index.append(payload["ipc_index"])
        if payload["init"] is not None:
            inits.append(payload["init"])
        log_rows.extend({"batch": batch.index, **row} for row in payload["log"])
    images_t, labels_t, ipc_t = torch.cat(images), torch.cat(labels), torch.cat(ipc_index)
    common = {"labels": labels_t, "ipc_index": ipc_t, "class_names": bundle.class_names,
              "mean": bundle.mean, "std": bundle.std, "num_classes": bundle.num_classes,
              "data": bundle.name, "ipc": ipc, "seed": seed,
              "config": dataclasses.asdict(cfg), **meta}
    sets = [(out_dir, images_t)]
    if inits:
        sets.append((out_dir / "init", torch.cat(inits)))
    for folder, tensor in sets:
        images01 = bundle.denormalize(tensor).clamp(0, 1)
        output.write_png_tree(images01, labels_t, ipc_t, bundle.class_names, folder / "images")
        output.write_grid(images01, labels_t, ipc_t, folder / "grid.png")
        # The tensor file goes last: its presence means the set is complete.
        output.save_distilled({"images": tensor, **common, "unrefined": folder != out_dir},
                              folder / output.DISTILLED_FILE)
    output.write_loss_log(log_rows, out_dir / "loss_log.csv")
    first = [row for row in log_rows if row["step"] == 0]
    last = [row for row in log_rows if row["step"] == cfg.iterations - 1]
    save_json({"batches": len(plan), "images": int(len(labels_t)),
               "first_step": {"ce": _mean(first, "ce"), "bn": _mean(first, "bn")},
               "last_step": {"ce": _mean(last, "ce"), "bn": _mean(last, "bn"), "acc": _mean(last, "acc")}},
              out_dir / "summary.json")


def _mean(rows: list[dict], key: str) -> float:
    return float(sum(r[key] for r in rows) / len(rows)) if rows else float("nan")
