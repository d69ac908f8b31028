"""Which classes go together in which batch, and which process synthesizes it.

The plan depends only on the config (class count, classes_per_batch, ipc), never on the number
of processes, so a batch's content and seed are the same however the work is split.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.errors import ConfigError

DEFAULT_CLASSES_PER_BATCH = 50  # SC-DD's public setting for ImageNet-scale class counts
FILL_BATCH_TO = 100  # SRe2L's batch size; ipc_per_batch=None fills small-class-count batches to it


@dataclass(frozen=True)
class SynthBatch:
    """One optimization batch: image k has class ``classes[k]`` and ipc index ``ipc_indices[k]``."""

    index: int
    classes: tuple[int, ...]
    ipc_indices: tuple[int, ...]

    def seed(self, run_seed: int) -> int:
        # Distinct, stable 63-bit seed per (run seed, batch index).
        return (run_seed * 1_000_003 + self.index * 7919 + 12345) % (2**63 - 1)


def plan_batches(num_classes: int, ipc: int, classes_per_batch: int | None,
                 ipc_per_batch: int | None = 1) -> list[SynthBatch]:
    """For each group of ``ipc_per_batch`` ipc indices, one batch per chunk of classes.

    ``ipc_per_batch=1`` is the paper's batching (one image per class per batch); larger values
    put several images of each class in a batch, which fills batches when there are few classes.
    """
    if ipc_per_batch is not None and ipc_per_batch < 1:
        raise ConfigError(f"recover.ipc_per_batch={ipc_per_batch} must be >= 1")
    if ipc < 1:
        raise ConfigError(f"ipc={ipc} must be >= 1 image per class")
    if classes_per_batch is None:
        classes_per_batch = min(DEFAULT_CLASSES_PER_BATCH, num_classes)
    if classes_per_batch > num_classes:
        raise ConfigError(f"recover.classes_per_batch={classes_per_batch} is larger than the "
                          f"{num_classes} classes of the data; use at most {num_classes}")
    if ipc_per_batch is None:
        ipc_per_batch = max(1, FILL_BATCH_TO // classes_per_batch)
    chunks = [tuple(range(start, min(start + classes_per_batch, num_classes)))
              for start in range(0, num_classes, classes_per_batch)]
    groups = [tuple(range(start, min(start + ipc_per_batch, ipc))) for start in range(0, ipc, ipc_per_batch)]
    return [SynthBatch(index=g * len(chunks) + j,
                       classes=tuple(c for _ in group for c in chunk),
                       ipc_indices=tuple(i for i in group for _ in chunk))
            for g, group in enumerate(groups) for j, chunk in enumerate(chunks)]


def step_groups(batches: list[SynthBatch], groups_per_step: int) -> list[list[SynthBatch]]:
    """Split a process's batches into the groups one optimization runs together: at most
    ``groups_per_step`` batches of one size each (BN statistics are per batch, so a group's batches
    must stack into equal parts). Batches of each size keep their order and the groups run in the
    order of their first batch (so G = 1 is the batches' own order); a short last class chunk runs in
    groups of its own. Which batches share a step never changes a batch's images (beyond rounding):
    each keeps its seed and statistics."""
    if groups_per_step < 1:
        raise ConfigError(f"recover.groups_per_step={groups_per_step} must be >= 1")
    by_size: dict[int, list[int]] = {}
    for position, batch in enumerate(batches):
        by_size.setdefault(len(batch.classes), []).append(position)
    chunks = sorted(same[i:i + groups_per_step] for same in by_size.values()
                    for i in range(0, len(same), groups_per_step))
    return [[batches[p] for p in chunk] for chunk in chunks]


def batches_for_rank(plan: list[SynthBatch], rank: int, world_size: int) -> list[SynthBatch]:
    """Rank r's share: batches r, r+W, ... of the plan. With more processes than batches the ranks
    past the last batch get an empty share: they synthesize nothing and only join the barriers."""
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside world size {world_size}; fix the launcher's variables")
    return plan[rank::world_size]


def task_range(n_batches: int, task: int, count: int) -> range:
    """Job-array task ``task`` of ``count``: a contiguous range of plan positions (sizes differ by at most
    one), so a task's share is a range of ipc groups and, within one, of classes."""
    if not 0 <= task < count:
        raise ConfigError(f"job-array task {task} is outside {count} tasks; task ids run from 0 to count-1")
    base, extra = divmod(n_batches, count)
    start = task * base + min(task, extra)
    return range(start, start + base + (1 if task < extra else 0))


def batches_for_task(plan: list[SynthBatch], task: int, count: int) -> list[SynthBatch]:
    """The batches job-array task ``task`` of ``count`` synthesizes (empty when count > batches)."""
    return [plan[i] for i in task_range(len(plan), task, count)]


def task_of_batch(n_batches: int, position: int, count: int) -> int:
    """Which of ``count`` job-array tasks owns plan position ``position``."""
    return next(t for t in range(count) if position in task_range(n_batches, t, count))
