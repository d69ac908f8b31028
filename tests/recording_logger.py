"""A metrics logger for tests: keeps every scalar a training loop sends, in memory."""
from __future__ import annotations

import numpy as np

from engine.training.tb_logger import MetricsLogger


class Recorder(MetricsLogger):
    """Keeps every scalar the loop sends: {tag: [(step, value), ...]}."""

    def __init__(self):
        self.rows: dict[str, list[tuple[int, float]]] = {}

    def scalars(self, values, step):
        for tag, value in values.items():
            self.rows.setdefault(tag, []).append((step, float(value)))


def assert_bf16_losses_follow_fp32(fp32: Recorder, bf16: Recorder, steps: int, rtol: float) -> None:
    """Both runs logged ``steps`` step losses; bf16 changed them (autocast ran) but within ``rtol`` of fp32."""
    loss32 = np.array([v for _, v in fp32.rows["train/loss"]])
    loss16 = np.array([v for _, v in bf16.rows["train/loss"]])
    assert len(loss32) == len(loss16) == steps
    assert not np.array_equal(loss32, loss16), "bf16 autocast changed nothing: the forward did not run in bf16"
    np.testing.assert_allclose(loss16, loss32, rtol=rtol)
