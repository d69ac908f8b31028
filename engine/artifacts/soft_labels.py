"""Stored soft labels (SRe2L/FKD style) on disk: one file per epoch plus the fingerprint they match.

    <row>/labels/meta.json          fingerprint: format, recipe, seed, top-k, dtype, set and teacher digests
    <row>/labels/epochNNNNN.pt      order, crop boxes (int16 x4), flips, each step's mixing parameters,
                                    top-k values/indices, rest (fp32 per image), temperature

Replaying a file reproduces the online labels for the same crops at a few bytes per image-epoch
instead of a teacher forward pass.

Semantics (FKD's): the stored target is the teacher's softmax(logits / T) on the k largest classes
and the teacher's remaining probability mass spread evenly over the other classes; with k >= the
class count it is the teacher's full distribution. ``rest`` holds logsumexp(logits / T) over the
classes outside the top-k, so that mass is exact. Format 1 put -inf outside the top-k: with 1000
classes at T=20 the top-10 hold a few percent of the teacher's probability, so its target was far
sharper than the online one; its files carry no format and are refused (resume) or replaced.
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
FORMAT = 2
"""Version of the label semantics, part of every label fingerprint (see the module docstring)."""


def epoch_file(folder: Path, epoch: int) -> Path:
    return folder / f"epoch{epoch:05d}.pt"


def open_store(folder: Path, fingerprint: dict[str, Any], resume: bool) -> None:
    """Make ``folder`` hold labels for ``fingerprint``. Labels are a pure function of their fingerprint,
    so matching ones are always kept (whatever stage wrote them); labels made for other settings are
    refused with resume=true and replaced with resume=false (announced)."""
    fingerprint = {"format": FORMAT, **fingerprint}
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


def compress(logits: torch.Tensor, topk: int, temperature: float,
             dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """What a label file keeps of [B, K] teacher logits: the top-k values (``dtype``) and class indices
    (int16), and ``rest`` [B] fp32 = logsumexp of logits / T over the other classes (-inf: none).

    The rest is kept as its own log-sum, not as 1 - (top-k mass): that difference cancels to nothing
    when the top-k hold almost all of the mass (a sharp teacher at low T)."""
    logits = logits.float()
    k = min(topk, logits.shape[1])
    top = logits.topk(k, dim=1)
    scaled = logits / temperature
    outside = scaled.scatter(1, top.indices, -math.inf)
    if k < logits.shape[1]:
        rest = torch.logsumexp(outside, dim=1)
    else:
        rest = torch.full((len(logits),), -math.inf, device=logits.device)
    return {"values": top.values.to(dtype), "indices": top.indices.to(torch.int16), "rest": rest}


def reconstruct_logits(values: torch.Tensor, indices: torch.Tensor, rest: torch.Tensor, num_classes: int,
                       temperature: float) -> torch.Tensor:
    """[B, K] fp32 logits whose softmax(. / T) is the stored target: the top-k as stored, and every other
    class at the logit that gives it an equal share of the teacher's remaining mass exp(rest)."""
    k = values.shape[1]
    out = torch.empty((values.shape[0], num_classes))
    if k < num_classes:
        # exp(r / T) * (K - k) = exp(rest): the other classes' softmax terms sum to the teacher's
        out[:] = (temperature * (rest.float() - math.log(num_classes - k))).unsqueeze(1)
    return out.scatter_(1, indices.long(), values.float())
