"""A metrics logger for tests: keeps every scalar a training loop sends, in memory."""
from __future__ import annotations

from engine.training.tb_logger import MetricsLogger


class Recorder(MetricsLogger):
    """Keeps every scalar the loop sends: {tag: [(step, value), ...]}."""

    def __init__(self):
        self.rows: dict[str, list[tuple[int, float]]] = {}

    def scalars(self, values, step):
        for tag, value in values.items():
            self.rows.setdefault(tag, []).append((step, float(value)))
