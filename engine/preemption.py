"""Preemption: SIGTERM or SIGUSR1 (SLURM's ``--signal``) asks the long stages to stop at a safe point.

``install()`` (called by the CLI for a single process; a torchrun/srun world keeps the default, as
its ranks would not stop at the same point) turns the signals into a flag. Recover looks at it
between class batches (the batch in flight is finished and written, then the process stops);
squeeze pretraining and student training look at it after every epoch (the epoch in flight is
finished, its checkpoint written atomically). Relabel is not stopped this way (killed, it resumes
from its finished label files).
Then ``Preempted`` is raised, and the CLI exits with ``REQUEUE_EXIT`` (75, EX_TEMPFAIL), which
launchers/slurm*.sbatch turn into ``scontrol requeue``; the requeued job runs with resume=true and
continues from what was written, giving the same result as an uninterrupted run.
"""
from __future__ import annotations

import signal
from typing import Optional

REQUEUE_EXIT = 75
"""Exit status of a preempted run that saved its progress: requeue it (EX_TEMPFAIL)."""

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_requested: Optional[str] = None


class Preempted(Exception):
    """Raised at a safe point after a preemption signal; progress so far is on disk."""


def _handler(signum, _frame) -> None:
    global _requested
    _requested = signal.Signals(signum).name


def install() -> None:
    """Turn SIGTERM and SIGUSR1 into a stop request (main thread only)."""
    for sig in SIGNALS:
        signal.signal(sig, _handler)


def requested() -> Optional[str]:
    """The name of the signal that asked this process to stop, or None."""
    return _requested


def reset() -> None:
    global _requested
    _requested = None


def request(name: str = "SIGUSR1") -> None:
    """Ask for a stop as the signal handler does (tests; a caller embedding the engine)."""
    global _requested
    _requested = name


def check(where: str) -> None:
    """At a safe point: raise Preempted if a stop was requested (``where``: what was saved)."""
    if _requested is not None:
        raise Preempted(f"{_requested} received; stopped after {where}")
