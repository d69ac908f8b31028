"""`scdd stage=merge`: verify and assemble what the tasks of a job array wrote into one run dir.

Recover tasks (SCDD_TASK_ID/SCDD_TASK_COUNT or SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT) each write
their batches of a set and no index; merge checks that every batch is present, made with this run's
fingerprint (teacher, recover settings, data, ipc, seed), holding the plan's classes and ipc indices,
every (class, ipc index) exactly once, then writes the set's index. Run it with the same settings as
the tasks (the last task can run it, or a person by hand).
"""
from __future__ import annotations

from engine.context import RunContext
from engine.recover import stage as recover_stage


def validate(ctx: RunContext) -> None:
    recover_stage.validate(ctx)


def run(ctx: RunContext) -> dict:
    return {"recover": recover_stage.merge(ctx)}
