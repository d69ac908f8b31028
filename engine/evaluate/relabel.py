"""Stored relabeling (SRe2L/FKD style): per-epoch crop parameters + the teacher's top-k logits.

For every image of an epoch, in the order the student sees them: its crop box and flip bit, each
step's batch-level parameters (the mixing: partners, box, lam), and the teacher's top-k logits on
the augmented batch (fp16 values + int16 class indices) plus the log of its remaining mass at the
recipe's temperature (fp32). The files (engine.artifacts.soft_labels, which states the semantics)
replay the online labels for the same crops: exactly with k >= the class count, else top-k + the
rest mass spread evenly (FKD).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from engine.artifacts import soft_labels
from engine.evaluate.augment import AugParams, apply_params, step_rng
from engine.training.batches import batches_of, epoch_order, load_batches, to_unit_float
from engine.training.precision import autocast, layout, use_channels_last


@torch.no_grad()
def precompute_soft_labels(teacher: nn.Module, train_set, normalize: Callable, recipe, device: torch.device,
                           seed: int, folder: Path, topk: int, dtype: str = "float16",
                           fingerprint: dict | None = None, resume: bool = True,
                           progress: bool = True) -> dict:
    """Write one label file per epoch; returns {"bytes": total, "bytes_per_image_epoch": ...}.

    ``fingerprint``: what else the labels depend on (the set's and the teacher's digests); the
    recipe, seed, top-k, dtype and image count are added here.
    """
    # the teacher runs exactly as the online student step runs it (layout and autocast), so stored labels
    # replay the online ones
    channels_last = use_channels_last(recipe.channels_last, device, recipe.precision)
    teacher = layout(teacher.to(device).eval(), channels_last)
    count = len(train_set)
    full = {"recipe": dataclasses.asdict(recipe), "seed": seed, "topk": topk, "dtype": dtype, "count": count,
            **(fingerprint or {})}
    soft_labels.open_store(folder, full, resume)
    image_size = train_set[0][0].shape[-1]
    fill = normalize(torch.zeros(1, train_set[0][0].shape[0], 1, 1, device=device))  # a black pad pixel
    store_dtype = torch.float16 if dtype == "float16" else torch.float32
    for epoch in tqdm(range(recipe.epochs), desc="relabel", disable=not progress, unit="ep", leave=False):
        if soft_labels.has_epoch(folder, epoch):
            continue
        order = epoch_order(seed, epoch, count)
        boxes, flips, steps, values, indices, rest = [], [], [], [], [], []
        for step, (images, _labels) in enumerate(load_batches(train_set, batches_of(order, recipe.batch_size),
                                                               recipe.workers)):
            params = recipe.sample(step_rng(seed, epoch, step), len(images), image_size)
            x = apply_params(normalize(to_unit_float(images.to(device))), params, fill)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(recipe.precision, device):
                logits = teacher(x).float()
            kept = soft_labels.compress(logits, topk, recipe.temperature, store_dtype)
            values.append(kept["values"].cpu())
            indices.append(kept["indices"].cpu())
            rest.append(kept["rest"].cpu())
            boxes.append(params.boxes)
            flips.append(params.flips)
            steps.append(_batch_fields(params))
        soft_labels.save_epoch(folder, epoch, {
            "order": order.astype(np.int32), "boxes": np.concatenate(boxes), "flips": np.concatenate(flips),
            "steps": steps, "batch_size": recipe.batch_size, "values": torch.cat(values),
            "indices": torch.cat(indices), "rest": torch.cat(rest), "temperature": recipe.temperature})
    layout(teacher, False)  # handed back in the default layout, as train_student does
    total = soft_labels.total_bytes(folder, recipe.epochs)
    return {"bytes": total, "bytes_per_image_epoch": total / (count * recipe.epochs)}


_PER_IMAGE = ("boxes", "flips")
"""AugParams fields with one row per image, stored concatenated over the epoch's steps."""


def _batch_fields(params: AugParams) -> dict:
    """Every other AugParams field of one step, as drawn (whatever mixing the recipe uses); index arrays
    (partners within the batch) as int16."""
    out = {}
    for f in dataclasses.fields(params):
        if f.name not in _PER_IMAGE:
            value = getattr(params, f.name)
            out[f.name] = value.astype(np.int16) if isinstance(value, np.ndarray) else value
    return out


def load_epoch_labels(folder: Path, epoch: int) -> dict:
    """One epoch's order, per-step augmentation parameters and stored logits (with their rest mass)."""
    raw = soft_labels.load_epoch(folder, epoch)
    bs = raw["batch_size"]
    params = []
    for step, fields in enumerate(raw["steps"]):
        rows = slice(step * bs, (step + 1) * bs)
        fields = {k: v.astype(np.int64) if isinstance(v, np.ndarray) else v for k, v in fields.items()}
        params.append(AugParams(boxes=raw["boxes"][rows], flips=raw["flips"][rows], **fields))
    return {"order": raw["order"].astype(np.int64), "params": params, "values": raw["values"],
            "indices": raw["indices"], "rest": raw["rest"], "temperature": raw["temperature"], "batch_size": bs}


def reconstruct_logits(stored: dict, step: int, num_classes: int) -> torch.Tensor:
    """[B, K] fp32 logits of ``step`` whose softmax(. / T) is the stored target (T: the recipe's)."""
    bs = stored["batch_size"]
    rows = slice(step * bs, (step + 1) * bs)
    return soft_labels.reconstruct_logits(stored["values"][rows], stored["indices"][rows], stored["rest"][rows],
                                          num_classes, stored["temperature"])
