"""Teacher checkpoints: one file with backbone + classifier, the configs it came from, its metrics
and the fingerprint of the settings that made it."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from engine.data import DataBundle
from engine.errors import ConfigError
from engine.artifacts.fingerprint import digest
from engine.io import save_torch
from engine.models import ClassifierNet, ModelConfig, build_model

FORMAT = "scdd-teacher-v1"
"""Unchanged since v1: the fingerprint is an optional key (absent in files from older versions)."""


def data_facts(bundle: DataBundle) -> dict[str, Any]:
    """What a teacher must agree on with the data it is used with."""
    return {"name": bundle.name, "num_classes": bundle.num_classes, "channels": bundle.channels,
            "image_size": bundle.image_size, "mean": list(bundle.mean), "std": list(bundle.std)}


def save_teacher(path: str | Path, model: ClassifierNet, *, kind: str, model_cfg: ModelConfig,
                 bundle: DataBundle, metrics: dict[str, Any], fingerprint: dict[str, Any] | None = None) -> Path:
    """``fingerprint``: the settings the teacher was trained with (squeeze checks it on resume)."""
    payload = {"format": FORMAT, "kind": kind, "model": dataclasses.asdict(model_cfg),
               "data": data_facts(bundle), "metrics": metrics, "fingerprint": fingerprint,
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    return save_torch(payload, path)


def read_teacher(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"teacher checkpoint {path} does not exist; run `scdd stage=squeeze` "
                          f"first or set teacher=PATH")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure has the same fix
        raise ConfigError(f"teacher checkpoint {path} is corrupt ({type(exc).__name__}); "
                          f"re-run the squeeze stage") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ConfigError(f"{path} is not an SC-DD teacher checkpoint; use a file written by "
                          f"`scdd stage=squeeze`")
    return payload


def load_teacher(path: str | Path, model_cfg: ModelConfig, bundle: DataBundle) -> tuple[ClassifierNet, dict]:
    """Rebuild the teacher, refusing a checkpoint from another model or data config."""
    payload = read_teacher(path)
    saved_model = payload["model"]
    if saved_model != dataclasses.asdict(model_cfg):
        raise ConfigError(f"teacher {path} was trained as model={saved_model} but the config asks for "
                          f"{dataclasses.asdict(model_cfg)}; pass the matching model= overrides")
    wanted = data_facts(bundle)
    saved = payload["data"]
    for key in ("name", "num_classes", "channels", "image_size"):
        if saved[key] != wanted[key]:
            raise ConfigError(f"teacher {path} was trained on data with {key}={saved[key]} but the "
                              f"config gives {key}={wanted[key]}; use the data config it was trained with")
    model = build_model(model_cfg, bundle.num_classes, bundle.channels, bundle.image_size)
    model.load_state_dict(payload["state_dict"])
    return model, payload


def teacher_digest(payload: dict[str, Any]) -> str:
    """What downstream fingerprints record of a teacher: its own fingerprint's digest, or, for a
    file without one, a digest of its weights."""
    if payload.get("fingerprint") is not None:
        return digest(payload["fingerprint"])
    import hashlib

    h = hashlib.sha256()
    for key in sorted(payload["state_dict"]):
        h.update(key.encode())
        h.update(payload["state_dict"][key].float().numpy().tobytes())
    return h.hexdigest()[:16]
