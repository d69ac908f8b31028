"""Stored relabeling (SRe2L/FKD style): per-epoch crop parameters + the teacher's top-k logits.

One file per epoch holds, for every image of the epoch in the order the student sees them: its
crop box (int16 x4), flip bit, CutMix partner, and the teacher's top-k logits on the augmented
batch (fp16 values + int16 class indices). Replaying the file reproduces the online labels for
the same crops, at ~4k+15 bytes per image-epoch instead of a teacher forward pass.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from engine.evaluate.augment import AugParams, apply_params, sample_params, step_rng
from engine.io import save_json, save_torch
from engine.training.batches import batches_of, epoch_order, load_batches, to_unit_float


def epoch_file(folder: Path, epoch: int) -> Path:
    return folder / f"epoch{epoch:05d}.pt"


@torch.no_grad()
def precompute_soft_labels(teacher: nn.Module, train_set, normalize: Callable, recipe, device: torch.device,
                           seed: int, folder: Path, topk: int, dtype: str = "float16",
                           resume: bool = True, progress: bool = True) -> dict:
    """Write one label file per epoch; returns {"bytes": total, "bytes_per_image_epoch": ...}."""
    import dataclasses
    import json
    import shutil

    teacher = teacher.to(device).eval()
    fingerprint = {"recipe": dataclasses.asdict(recipe), "seed": seed, "topk": topk, "dtype": dtype,
                   "count": len(train_set)}
    meta = folder / "meta.json"
    if folder.exists() and (not resume or not meta.is_file()
                            or json.loads(meta.read_text()) != json.loads(json.dumps(fingerprint))):
        shutil.rmtree(folder)  # labels made for another recipe would silently mislabel the crops
    folder.mkdir(parents=True, exist_ok=True)
    save_json(fingerprint, meta)
    count = len(train_set)
    image_size = train_set[0][0].shape[-1]
    store_dtype = torch.float16 if dtype == "float16" else torch.float32
    for epoch in tqdm(range(recipe.epochs), desc="relabel", disable=not progress, unit="ep", leave=False):
        path = epoch_file(folder, epoch)
        if resume and path.is_file():
            continue
        order = epoch_order(seed, epoch, count)
        boxes, flips, cutmix, values, indices = [], [], [], [], []
        for step, (images, _labels) in enumerate(load_batches(train_set, batches_of(order, recipe.batch_size),
                                                               recipe.workers)):
            params = sample_params(step_rng(seed, epoch, step), len(images), image_size, recipe.crop_scale,
                                   recipe.flip, recipe.cutmix_prob, recipe.cutmix_alpha)
            logits = teacher(apply_params(normalize(to_unit_float(images.to(device))), params)).float()
            k = min(topk, logits.shape[1])
            top = logits.topk(k, dim=1)
            values.append(top.values.to(store_dtype).cpu())
            indices.append(top.indices.to(torch.int16).cpu())
            boxes.append(params.boxes)
            flips.append(params.flips)
            cutmix.append(None if params.cutmix_partner is None else
                          (params.cutmix_partner.astype(np.int16), params.cutmix_box, params.cutmix_lam))
        save_torch({"order": order.astype(np.int32), "boxes": np.concatenate(boxes),
                    "flips": np.concatenate(flips), "cutmix": cutmix, "batch_size": recipe.batch_size,
                    "values": torch.cat(values), "indices": torch.cat(indices)}, path)
    total = sum(epoch_file(folder, e).stat().st_size for e in range(recipe.epochs))
    return {"bytes": total, "bytes_per_image_epoch": total / (count * recipe.epochs)}


def load_epoch_labels(folder: Path, epoch: int) -> dict:
    path = epoch_file(folder, epoch)
    if not path.is_file():
        raise FileNotFoundError(f"stored soft labels {path} missing; run the relabel stage first")
    raw = torch.load(path, map_location="cpu", weights_only=False)
    bs = raw["batch_size"]
    params = []
    for step, mix in enumerate(raw["cutmix"]):
        rows = slice(step * bs, (step + 1) * bs)
        p = AugParams(boxes=raw["boxes"][rows], flips=raw["flips"][rows])
        if mix is not None:
            p.cutmix_partner, p.cutmix_box, p.cutmix_lam = mix[0].astype(np.int64), tuple(mix[1]), mix[2]
        params.append(p)
    return {"order": raw["order"].astype(np.int64), "params": params, "values": raw["values"],
            "indices": raw["indices"], "batch_size": bs}


def reconstruct_logits(stored: dict, step: int, num_classes: int) -> torch.Tensor:
    """[B, K] fp32 logits: the stored top-k, -inf elsewhere (zero probability after softmax)."""
    bs = stored["batch_size"]
    values = stored["values"][step * bs:(step + 1) * bs].float()
    indices = stored["indices"][step * bs:(step + 1) * bs].long()
    out = torch.full((values.shape[0], num_classes), -math.inf)
    return out.scatter_(1, indices, values)
