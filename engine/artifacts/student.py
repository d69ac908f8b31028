"""Student checkpoints and row results, each tied to the fingerprint of the row that made it.

    <row>/student_state.pt   student + optimizer + epoch + history (while training; removed when done)
    <row>/result.json        top-1/top-5 (final), best top-1, history, timing, and the row's fingerprint

Final top-1 is the headline; best top-1 is the best of the full passes over the test set made during
training (every evaluate.eval_every epochs and at the last), never a running accuracy inside a pass.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from engine.artifacts.fingerprint import require_match
from engine.io import save_json, save_torch

STATE_FILE = "student_state.pt"
RESULT_FILE = "result.json"


def save_state(path: Path, state: dict[str, Any], fingerprint: Optional[dict]) -> None:
    save_torch({**state, "fingerprint": fingerprint}, path)


def load_state(path: Path, fingerprint: Optional[dict]) -> Optional[dict]:
    """The saved training state, None without one; a state from other settings is refused."""
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if fingerprint is not None:
        require_match(path, state.get("fingerprint"), fingerprint, "student checkpoint")
    return state


def best_top1(history: list[dict[str, Any]]) -> Optional[float]:
    """The best top-1 of the test passes in a student's ``history`` (rows without one: no test that epoch)."""
    passes = [row["top1"] for row in history if row.get("top1") is not None]
    return max(passes) if passes else None


def save_result(path: Path, row: dict[str, Any], fingerprint: dict) -> None:
    save_json({**row, "fingerprint": fingerprint}, path)


def load_result(path: Path, fingerprint: dict) -> Optional[dict]:
    """A finished row's result (resume), None without one; one from other settings is refused."""
    if not path.is_file():
        return None
    row = json.loads(path.read_text())
    require_match(path, row.pop("fingerprint", None), fingerprint, "student result")
    if "best_top1" not in row:  # written before best was recorded: its history holds the passes
        row["best_top1"] = best_top1(row.get("history", []))
    return row
