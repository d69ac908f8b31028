"""The distilled set on disk: a class-per-folder PNG tree, one tensor file, a grid, a loss log."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

from engine.io import atomic_write, save_torch

DISTILLED_FILE = "distilled.pt"


def to_uint8(images01: torch.Tensor) -> np.ndarray:
    """[N,C,H,W] in [0,1] -> uint8 [N,H,W,C] (or [N,H,W] for gray)."""
    arr = (images01.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return arr[..., 0] if arr.shape[-1] == 1 else arr


def save_png(array: np.ndarray, path: Path) -> None:
    def write(tmp: str) -> None:
        Image.fromarray(array).save(tmp, format="PNG")

    atomic_write(path, write)


def write_png_tree(images01: torch.Tensor, labels: torch.Tensor, ipc_index: torch.Tensor,
                   class_names: list[str], folder: Path) -> None:
    arrays = to_uint8(images01)
    for array, label, k in zip(arrays, labels.tolist(), ipc_index.tolist()):
        save_png(array, folder / class_names[label] / f"ipc{k:04d}.png")


def write_grid(images01: torch.Tensor, labels: torch.Tensor, ipc_index: torch.Tensor, path: Path,
               max_classes: int = 100, max_ipc: int = 10) -> None:
    """One row per class (up to ``max_classes``), one column per ipc index (up to ``max_ipc``)."""
    num_classes = int(labels.max()) + 1
    rows = min(num_classes, max_classes)
    cols = min(int(ipc_index.max()) + 1, max_ipc)
    cells = torch.zeros(rows * cols, *images01.shape[1:])
    for image, label, k in zip(images01, labels.tolist(), ipc_index.tolist()):
        if label < rows and k < cols:
            cells[label * cols + k] = image
    grid = make_grid(cells, nrow=cols, padding=1, pad_value=1.0)
    array = to_uint8(grid.unsqueeze(0))[0]
    # upscale tiny images so a person can see them
    scale = max(1, 256 // max(array.shape[0], array.shape[1]) + 1) if max(array.shape[:2]) < 256 else 1
    if scale > 1:
        array = np.kron(array, np.ones((scale, scale) + (() if array.ndim == 2 else (1,)), dtype=np.uint8))
    save_png(array, path)


def write_loss_log(rows: list[dict], path: Path) -> None:
    if not rows:
        return
    fields = list(rows[0].keys())
    for row in rows:
        fields.extend(k for k in row if k not in fields)

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def save_distilled(payload: dict, path: Path) -> None:
    save_torch(payload, path)


def load_distilled(path: str | Path, max_ipc: int | None = None) -> dict:
    """Read a distilled set, keeping images whose ipc index is below ``max_ipc``."""
    payload = torch.load(Path(path), map_location="cpu", weights_only=False)
    if max_ipc is not None:
        keep = payload["ipc_index"] < max_ipc
        for key in ("images", "labels", "ipc_index"):
            payload[key] = payload[key][keep]
    return payload
