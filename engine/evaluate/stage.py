"""`scdd stage=evaluate` and `stage=relabel`: students on each distilled set and the baselines.

Rows, for each ipc: every distilled set under <run_dir>/recover/ (keyed by report name), a random
real subset with the same images per class; plus (once) a student on the full training split.
Every row uses the same student recipe and the same soft-label teacher, so rows differ only in
their training images.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from engine.checkpoint import load_teacher
from engine.config import from_mapping
from engine.context import RunContext
from engine.data import DataBundle
from engine.distributed import barrier
from engine.errors import ConfigError
from engine.evaluate.relabel import precompute_soft_labels
from engine.evaluate.settings import EvaluateConfig
from engine.evaluate.student import StudentRecipe, train_student
from engine.io import save_json
from engine.loaders.settings import LoaderConfig, parse_loader
from engine.models import ModelConfig, build_model
from engine.recover.output import DISTILLED_FILE, load_distilled
from engine.recover.stage import teacher_path
from engine.report import SET_FOLDERS, write_report

class InMemoryImages(Dataset):
    """Float images [N,C,H,W] in [0,1] with labels: the distilled set or a real subset."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images = images.float()
        self.labels = [int(v) for v in labels]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], self.labels[index]


def distilled_dataset(path: Path, bundle: DataBundle, ipc: int) -> InMemoryImages:
    payload = load_distilled(path, max_ipc=ipc)
    if payload["num_classes"] != bundle.num_classes:
        raise ConfigError(f"distilled set {path} has {payload['num_classes']} classes but the data has "
                          f"{bundle.num_classes}; evaluate it with the data config it was made from")
    return InMemoryImages(bundle.denormalize(payload["images"]).clamp(0, 1), payload["labels"])


def random_real_subset(bundle: DataBundle, ipc: int, seed: int) -> InMemoryImages:
    labels = np.asarray(bundle.labels("train"))
    rng = np.random.default_rng([seed, ipc, 7])
    picks = []
    for c in range(bundle.num_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) < ipc:
            raise ConfigError(f"class {c} has {len(idx)} training images, fewer than ipc={ipc}")
        picks.extend(idx[rng.permutation(len(idx))[:ipc]].tolist())
    images = torch.stack([bundle.train[i][0] for i in picks])
    return InMemoryImages(images, torch.tensor(labels[picks]))


def build_eval_config(ctx: RunContext, **overrides) -> EvaluateConfig:
    section = dict(ctx.sections.get("evaluate") or {})
    section.update(overrides)
    return from_mapping(EvaluateConfig, section, "evaluate")


def make_recipe(cfg: EvaluateConfig, bundle: DataBundle, epochs: Optional[int] = None) -> StudentRecipe:
    scale = tuple(cfg.crop_scale) if cfg.crop_scale else ((0.08, 1.0) if bundle.image_size >= 64 else (0.5, 1.0))
    flip = cfg.flip if cfg.flip is not None else bundle.channels == 3
    return StudentRecipe(epochs=epochs or cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                         weight_decay=cfg.weight_decay, temperature=cfg.temperature, loss=cfg.loss,
                         crop_scale=scale, flip=flip, cutmix_prob=cfg.cutmix_prob,
                         cutmix_alpha=cfg.cutmix_alpha, eval_every=cfg.eval_every, workers=cfg.workers)


def student_model_config(cfg: EvaluateConfig, teacher_cfg: ModelConfig) -> ModelConfig:
    return teacher_cfg if cfg.student is None else ModelConfig(name=cfg.student)


@dataclass
class Evaluator:
    """Trains one student per row with a fixed recipe, teacher and seed; caches results on disk."""

    ctx: RunContext
    cfg: EvaluateConfig
    teacher: Optional[torch.nn.Module]
    out_root: Path
    loader: Optional[LoaderConfig] = None
    """loader=ffcv|dali: the test split is read through it (loader=torch: in-process batches)."""

    def run_row(self, key: str, ipc: Optional[int], train_set: Dataset, epochs: Optional[int] = None,
                seed_offset: int = 0) -> dict:
        ctx, bundle = self.ctx, self.ctx.data
        folder = self.out_root / (f"ipc{ipc}" if ipc else "full") / (key + (f"_s{seed_offset}" if seed_offset else ""))
        result_file = folder / "result.json"
        if ctx.run.resume and result_file.is_file():
            return json.loads(result_file.read_text())
        recipe = make_recipe(self.cfg, bundle, epochs)
        seed = ctx.run.seed + seed_offset
        stored = None
        if recipe.loss == "kl" and self.cfg.relabel == "stored":
            stored = folder / "labels"
            for turn in ("main", "others"):  # rank 0 writes the labels; the others then find them done
                if ctx.dist.is_main == (turn == "main"):
                    storage = precompute_soft_labels(self.teacher, train_set, bundle.normalize, recipe,
                                                     ctx.dist.device, seed, stored, self.cfg.stored_topk,
                                                     self.cfg.stored_dtype, resume=True,
                                                     progress=ctx.run.progress and ctx.dist.is_main)
                barrier()
        student_cfg = student_model_config(self.cfg, ctx.model_cfg)
        torch.manual_seed(seed)
        student = build_model(student_cfg, bundle.num_classes, bundle.channels, bundle.image_size)
        test_loader = None
        if self.loader is not None and self.loader.external:
            test_loader = self.loader.eval_loader(bundle, "test", batch_size=500)
        result = train_student(student, train_set, bundle.test, bundle.normalize, recipe, ctx.dist.device, seed,
                               teacher=self.teacher if stored is None else None, stored_labels=stored,
                               checkpoint=folder / "student_state.pt", progress=ctx.run.progress,
                               desc=f"{key} ipc={ipc}" if ipc else key, dist=ctx.dist, test_loader=test_loader)
        row = {"top1": result.top1, "top5": result.top5, "images": len(train_set), "epochs": recipe.epochs,
               "seconds": result.seconds, "images_per_s": result.images_per_s, "history": result.history}
        if stored is not None:
            row["stored_labels_bytes_per_image_epoch"] = storage["bytes_per_image_epoch"]
        if ctx.dist.is_main:
            save_json(row, result_file)
            (folder / "student_state.pt").unlink(missing_ok=True)
        barrier()
        return row


def label_teacher(ctx: RunContext, cfg: EvaluateConfig):
    """The soft-label teacher: teacher=PATH when given, else this run's squeeze teacher."""
    path = Path(ctx.run.teacher) if ctx.run.teacher else teacher_path(ctx.run_dir, cfg.label_teacher)
    model, payload = load_teacher(path, ctx.model_cfg, ctx.data)
    return model, payload


def available_sets(run_dir: Path) -> dict[str, Path]:
    return {key: run_dir / "recover" / folder / DISTILLED_FILE for key, folder in SET_FOLDERS.items()
            if (run_dir / "recover" / folder / DISTILLED_FILE).is_file()}


def evaluate_rows(ctx: RunContext, cfg: EvaluateConfig, sets: dict[str, Path],
                  loader: Optional[LoaderConfig] = None) -> dict:
    """Train every row's student; returns the nested result dict the report is built from."""
    bundle = ctx.data
    loader = loader or parse_loader(ctx.sections, ctx.data_cfg, bundle)
    teacher = None
    if cfg.loss == "kl":
        teacher, _ = label_teacher(ctx, cfg)
        teacher = teacher.to(ctx.dist.device).eval()
    evaluator = Evaluator(ctx, cfg, teacher, ctx.run_dir / "evaluate", loader)
    results: dict = {"ipc": {}}
    for ipc in sorted(set(ctx.run.ipc)):
        rows = {}
        for key, path in sets.items():
            rows[key] = evaluator.run_row(key, ipc, distilled_dataset(path, bundle, ipc))
        seeds = [evaluator.run_row("random_real", ipc, random_real_subset(bundle, ipc, ctx.run.seed + s),
                                   seed_offset=s) for s in range(cfg.random_real_seeds)]
        rows["random_real"] = dict(seeds[0])
        rows["random_real"]["top1"] = float(np.mean([s["top1"] for s in seeds]))
        rows["random_real"]["top1_std"] = float(np.std([s["top1"] for s in seeds]))
        rows["random_real"]["seconds"] = float(sum(s["seconds"] for s in seeds))
        results["ipc"][str(ipc)] = rows
    if cfg.full_data:
        results["full_data"] = evaluator.run_row("full_data", None, bundle.train, epochs=cfg.full_data_epochs)
    return results


def run(ctx: RunContext, **overrides) -> dict:
    cfg = build_eval_config(ctx, **overrides)
    loader = parse_loader(ctx.sections, ctx.data_cfg, ctx.data)
    if any(n < 1 for n in ctx.run.ipc):
        raise ConfigError(f"ipc={ctx.run.ipc} must hold positive images-per-class counts")
    sets = available_sets(ctx.run_dir)
    if not sets:
        raise ConfigError(f"no distilled set under {ctx.run_dir / 'recover'}; run `scdd stage=recover` in this "
                          f"run dir first (hydra.run.dir=...)")
    start = time.time()
    results = evaluate_rows(ctx, cfg, sets, loader)
    results["seconds"] = {"evaluate": time.time() - start}
    if ctx.dist.is_main:
        write_report(ctx, results)
    return results


def run_relabel(ctx: RunContext) -> dict:
    """Precompute stored soft labels for every distilled set and ipc of this run dir."""
    cfg = build_eval_config(ctx, relabel="stored")
    sets = available_sets(ctx.run_dir)
    if not sets:
        raise ConfigError(f"no distilled set under {ctx.run_dir / 'recover'}; run `scdd stage=recover` first")
    teacher, _ = label_teacher(ctx, cfg)
    out = {}
    for ipc in sorted(set(ctx.run.ipc)):
        for key, path in sets.items():
            train_set = distilled_dataset(path, ctx.data, ipc)
            recipe = make_recipe(cfg, ctx.data)
            folder = ctx.run_dir / "evaluate" / f"ipc{ipc}" / key / "labels"
            out[f"{key}/ipc{ipc}"] = precompute_soft_labels(
                teacher, train_set, ctx.data.normalize, recipe, ctx.dist.device, ctx.run.seed, folder,
                cfg.stored_topk, cfg.stored_dtype, resume=ctx.run.resume, progress=ctx.run.progress)
            print(f"relabel {key} ipc={ipc}: {out[f'{key}/ipc{ipc}']['bytes_per_image_epoch']:.1f} "
                  f"bytes per image-epoch -> {folder}")
    return out
