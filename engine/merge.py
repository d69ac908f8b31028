"""`scdd stage=merge`: verify and assemble what the tasks of a job array wrote into one run dir.

Recover tasks (SCDD_TASK_ID/SCDD_TASK_COUNT or SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT) each write
their batches of a set and no index; merge checks that every batch is present, made with this run's
fingerprint (teacher, recover settings, data, ipc, seed), holding the plan's classes and ipc indices,
every (class, ipc index) exactly once, then writes the set's index. Evaluate tasks each train their
rows; merge checks every row's result against its fingerprint and writes the report. A missing or
mismatched share stops the merge with one line naming it and the task that should have made it.

What is merged follows from the run dir: recover sets that have shares but no index (set folders with
a fingerprint.json), then, when there are evaluate results, the evaluate rows. Run it with the same
settings as the tasks (the last task can run it, or a person by hand).
"""
from __future__ import annotations

from pathlib import Path

from engine.artifacts.distilled import FINGERPRINT_FILE, is_complete
from engine.artifacts.student import RESULT_FILE
from engine.context import RunContext
from engine.errors import ConfigError
from engine.evaluate import stage as evaluate_stage
from engine.recover import stage as recover_stage


def _recover_shares(run_dir: Path) -> list[Path]:
    root = run_dir / "recover"
    return sorted(p for p in root.glob("*") if (p / FINGERPRINT_FILE).is_file() and not is_complete(p)) \
        if root.is_dir() else []


def _evaluate_results(run_dir: Path) -> list[Path]:
    root = run_dir / "evaluate"
    return sorted(root.rglob(RESULT_FILE)) if root.is_dir() else []


def validate(ctx: RunContext) -> None:
    if not _recover_shares(ctx.run_dir) and not _evaluate_results(ctx.run_dir):
        raise ConfigError(f"nothing to merge in {ctx.run_dir}: no recover shares without an index and no "
                          f"evaluate results; run the job-array tasks first (same hydra.run.dir)")
    if _recover_shares(ctx.run_dir):
        recover_stage.validate(ctx)


def run(ctx: RunContext) -> dict:
    out = {}
    if _recover_shares(ctx.run_dir):
        out["recover"] = recover_stage.merge(ctx)
    if _evaluate_results(ctx.run_dir):
        out["evaluate"] = evaluate_stage.gather(ctx)
    return out
