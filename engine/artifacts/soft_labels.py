"""Stored soft labels (SRe2L/FKD style) on disk: one file per epoch plus the fingerprint they match.

    <row>/labels/meta.json          fingerprint: recipe, seed, top-k, dtype, set and teacher digests
    <row>/labels/epochNNNNN.pt      order, crop boxes (int16 x4), flips, CutMix, top-k values/indices

Replaying a file reproduces the online labels for the same crops at a few bytes per image-epoch
instead of a teacher forward pass.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from engine.artifacts.fingerprint import announce_overwrite, differences, require_match
from engine.io import save_json, save_torch

META_FILE = "meta.json"


def epoch_file(folder: Path, epoch: int) -> Path:
    return folder / f"epoch{epoch:05d}.pt"


def open_store(folder: Path, fingerprint: dict[str, Any], resume: bool) -> None:
    """Make ``folder`` hold labels for ``fingerprint``. Labels are a pure function of their fingerprint,
    so matching ones are always kept (whatever stage wrote them); labels made for other settings are
    refused with resume=true and replaced with resume=false (announced)."""
    meta = folder / META_FILE
    if folder.exists() and any(folder.iterdir()):
        saved = json.loads(meta.read_text())["fingerprint"] if meta.is_file() else None
        if saved is None or differences(saved, fingerprint):
            if resume:
                require_match(folder, saved, fingerprint, "stored soft labels")
            announce_overwrite(folder, "stored soft labels")
            shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_json({"fingerprint": fingerprint}, meta)


def save_epoch(folder: Path, epoch: int, payload: dict) -> None:
    save_torch(payload, epoch_file(folder, epoch))


def has_epoch(folder: Path, epoch: int) -> bool:
    return epoch_file(folder, epoch).is_file()


def load_epoch(folder: Path, epoch: int) -> dict:
    path = epoch_file(folder, epoch)
    if not path.is_file():
        raise FileNotFoundError(f"stored soft labels {path} missing; run the relabel stage first")
    return torch.load(path, map_location="cpu", weights_only=False)


def total_bytes(folder: Path, epochs: int) -> int:
    return sum(epoch_file(folder, e).stat().st_size for e in range(epochs))


def reconstruct_logits(values: torch.Tensor, indices: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[B, K] fp32 logits: the stored top-k, -inf elsewhere (zero probability after softmax)."""
    out = torch.full((values.shape[0], num_classes), -math.inf)
    return out.scatter_(1, indices.long(), values.float())
