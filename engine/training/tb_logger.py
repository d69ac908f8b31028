"""Metrics of the training loops as TensorBoard event files (``logger=tensorboard|none``).

Stages open one logger per training loop (``open_logger``) in the folder RunLayout gives them and
pass it down; the loops call ``scalars`` with plain floats. ``NULL_LOGGER`` (logger=none, and every
rank but 0) writes nothing and creates no folder. The JSON/CSV metrics files stay the record the
report reads; the event files are for watching a run.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from engine.errors import ConfigError

LOGGERS = ("tensorboard", "none")


@dataclass
class LoggerConfig:
    """The ``logger=`` group; options in ``LOGGER_PRESETS``."""

    name: str = "tensorboard"
    """tensorboard: loss, lr, accuracy and throughput of every training loop to event files under
    <run>/tensorboard/<stage>/<loop>/ (rank 0 only) | none: no event files."""
    flush_seconds: int = 30
    """How often the writer flushes pending events to disk (and at the end of each loop)."""

    def __post_init__(self) -> None:
        if self.name not in LOGGERS:
            raise ConfigError(f"logger={self.name!r} is not one of {'|'.join(LOGGERS)}")
        if self.flush_seconds < 1:
            raise ConfigError(f"logger.flush_seconds={self.flush_seconds} must be >= 1")


LOGGER_PRESETS: dict[str, LoggerConfig] = {
    "tensorboard": LoggerConfig(name="tensorboard"),
    "none": LoggerConfig(name="none"),
}
"""The ``logger=`` options (``scdd logger=NAME``), registered with Hydra by engine.config_store."""


def parse_logger(sections: Mapping[str, Any]) -> LoggerConfig:
    """The logger= section of a RunContext's sections (logger=tensorboard when absent)."""
    from engine.config import from_mapping

    return from_mapping(LoggerConfig, sections.get("logger") or {}, "logger")


class MetricsLogger:
    """Writes nothing: logger=none, ranks other than 0, and library calls given no logger."""

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


NULL_LOGGER = MetricsLogger()


class TensorBoardLogger(MetricsLogger):
    """One SummaryWriter on ``folder``; the folder and writer are made at the first scalar."""

    def __init__(self, folder: Path, flush_seconds: int = 30) -> None:
        self.folder = Path(folder)
        self.flush_seconds = flush_seconds
        self._writer = None

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.folder), flush_secs=self.flush_seconds)
        for tag, value in values.items():
            if value is not None:
                self._writer.add_scalar(tag, float(value), int(step))

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def open_logger(config: LoggerConfig, folder: Path, is_main: bool = True) -> MetricsLogger:
    """The logger of one training loop writing to ``folder`` (rank 0 with logger=tensorboard), else the no-op."""
    if config.name == "none" or not is_main:
        return NULL_LOGGER
    return TensorBoardLogger(folder, config.flush_seconds)


def replay_loss_log(logger: MetricsLogger, path: Path) -> int:
    """A finished recover set's loss log (CSV: batch, step, lr, ce, bn, acc, ...) as one curve per
    quantity under recover/: class batch b's step s at x = b x (steps per batch) + s, so each batch's
    descent follows the last. Written after synthesis (the log is per batch record); returns rows read."""
    import csv

    if not path.is_file():
        return 0
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return 0
    per_batch = max(int(row["step"]) for row in rows) + 1
    for row in rows:
        x = int(row["batch"]) * per_batch + int(row["step"])
        logger.scalars({f"recover/{key}": float(row[key]) for key in ("ce", "bn", "acc", "lr") if row.get(key)}, x)
    logger.flush()
    return len(rows)
