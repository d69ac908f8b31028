"""Preemption: SIGUSR1 (SLURM's --signal) to a running recover and a running student makes it write its
progress, exit with the requeue status, and the resumed run (resume=true) equals an uninterrupted one."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

from engine.artifacts.distilled import DistilledSet
from engine.preemption import REQUEUE_EXIT
from teachers import MODEL_OVERRIDES

REPO = Path(__file__).resolve().parents[2]
BASE = ("data=digits", "device=cpu", *MODEL_OVERRIDES, "progress=false")

pytestmark = pytest.mark.usefixtures("one_thread")


def _signal_when(run_dir: Path, overrides: tuple[str, ...], ready: Callable[[], bool],
                 sig: signal.Signals = signal.SIGUSR1) -> tuple[subprocess.CompletedProcess, float]:
    """Start ``scdd`` in a subprocess, send ``sig`` once ``ready()``; returns (its outcome, seconds from
    the signal to its exit)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", *overrides, f"hydra.run.dir={run_dir}"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    try:
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"the run ended (exit {proc.returncode}) before the signal: {proc.stderr.read()}")
            if time.monotonic() > deadline:
                pytest.fail("not ready within 180 s")
            time.sleep(0.005)
        sent = time.monotonic()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
        seconds = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(f"{overrides[-1]}: signal to exit {seconds:.2f} s")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), seconds


def test_sigusr1_to_recover_keeps_finished_batches_exits_75_and_resumes_to_the_same_set(run_scdd, digits_teacher, tmp_path):
    teacher = digits_teacher
    args = (*BASE, "stage=recover", f"teacher={teacher}", "ipc=[4]", "recover.iterations=40",
            "recover.classes_per_batch=5", "recover.ipc_per_batch=1")  # 8 class batches
    run_scdd(*args, run_dir=tmp_path / "full")
    stopped = tmp_path / "stopped"
    batches = stopped / "recover" / "supervised-noise" / "batches"
    outcome, _ = _signal_when(stopped, args, lambda: batches.is_dir() and any(batches.glob("b*.json")))
    assert outcome.returncode == REQUEUE_EXIT, outcome.stderr[-2000:]
    said = [line for line in outcome.stderr.splitlines() if line.startswith("scdd: preempted")]
    assert len(said) == 1 and "SIGUSR1 received" in said[0] and "exit 75" in said[0], outcome.stderr[-2000:]
    kept = len(list(batches.glob("b*.json")))
    assert 1 <= kept < 8 and not (stopped / "recover" / "supervised-noise" / "index.json").exists()
    run_scdd(*args, "resume=true", run_dir=stopped)
    full, resumed = (DistilledSet.open(run / "recover" / "supervised-noise") for run in (tmp_path / "full", stopped))
    assert full.index == resumed.index
    for rel in full.index["files"]:
        assert (full.folder / rel).read_bytes() == (resumed.folder / rel).read_bytes(), rel


def test_sigusr1_to_a_student_checkpoints_exits_75_and_resumes_to_the_same_result(run_scdd, digits_teacher, tmp_path):
    teacher = digits_teacher
    args = (*BASE, "stage=evaluate", f"teacher={teacher}", "ipc=[2]", "evaluate.epochs=30", "evaluate.eval_every=5",
            "evaluate.batch_size=2", "evaluate.full_data=false")
    runs = {name: tmp_path / name for name in ("full", "stopped")}
    run_scdd(*BASE, "stage=recover", f"teacher={teacher}", "ipc=[2]", "recover.iterations=2",
             run_dir=runs["full"])
    shutil.copytree(runs["full"], runs["stopped"])
    run_scdd(*args, run_dir=runs["full"])
    state = runs["stopped"] / "evaluate" / "ipc2" / "sre2l" / "student_state.pt"
    outcome, _ = _signal_when(runs["stopped"], args, state.is_file)  # first written after 3 epochs
    assert outcome.returncode == REQUEUE_EXIT, outcome.stderr[-2000:]
    said = [line for line in outcome.stderr.splitlines() if line.startswith("scdd: preempted")]
    assert len(said) == 1 and "SIGUSR1 received" in said[0], outcome.stderr[-2000:]
    saved = torch.load(state, weights_only=False)["epoch"]
    assert 3 <= saved < 30 and f"stopped after epoch {saved} of 30" in said[0]
    assert not (state.parent / "result.json").exists()
    run_scdd(*args, "resume=true", run_dir=runs["stopped"])
    a, b = (json.loads((run / "evaluate" / "ipc2" / "sre2l" / "result.json").read_text()) for run in runs.values())
    assert (a["top1"], a["top5"], a["history"]) == (b["top1"], b["top5"], b["history"])
    assert len(a["history"]) == 30


def test_sigusr1_to_a_run_with_row_processes_reaches_them_and_resumes_to_the_same_results(run_scdd, digits_teacher,
                                                                                          tmp_path):
    """The signal goes to the run's own process only (as a launcher forwards it); its forked row processes stop
    after their epoch in flight, and the run exits 75 and resumes to what one process trains."""
    args = (*BASE, "stage=evaluate", f"teacher={digits_teacher}", "ipc=[2]", "evaluate.epochs=30",
            "evaluate.eval_every=5", "evaluate.batch_size=2", "evaluate.full_data=false")
    runs = {name: tmp_path / name for name in ("full", "stopped")}
    run_scdd(*BASE, "stage=recover", f"teacher={digits_teacher}", "ipc=[2]", "recover.iterations=2",
             run_dir=runs["full"])
    shutil.copytree(runs["full"], runs["stopped"])
    run_scdd(*args, "evaluate.row_processes=1", run_dir=runs["full"])
    rows = ("sre2l", "random_real")
    states = [runs["stopped"] / "evaluate" / "ipc2" / row / "student_state.pt" for row in rows]
    outcome, _ = _signal_when(runs["stopped"], (*args, "evaluate.row_processes=2"),
                              lambda: all(state.is_file() for state in states))  # both rows in flight
    assert outcome.returncode == REQUEUE_EXIT, outcome.stderr[-2000:]
    assert outcome.stdout.count("scdd: SIGUSR1 received; stopped after epoch") == 2, outcome.stdout[-2000:]
    assert not any((state.parent / "result.json").exists() for state in states)
    run_scdd(*args, "evaluate.row_processes=2", "resume=true", run_dir=runs["stopped"])
    for row in rows:
        a, b = (json.loads((run / "evaluate" / "ipc2" / row / "result.json").read_text()) for run in runs.values())
        assert (a["top1"], a["top5"], a["history"]) == (b["top1"], b["top5"], b["history"]), row


@pytest.fixture
def stop_requested():
    from engine import preemption

    preemption.request("SIGUSR1")  # what the CLI's handler records; a signal in-process would reach pytest
    yield preemption
    preemption.reset()


def test_a_stop_request_ends_squeeze_after_the_epoch_checkpoint_and_resume_equals_uninterrupted(
        run_scdd, tmp_path, stop_requested):
    from engine.preemption import Preempted
    from teachers import assert_same_teacher

    args = (*BASE, "stage=squeeze", "squeeze.teachers=[supervised]", "squeeze.epochs=3", "squeeze.probe.epochs=1")
    with pytest.raises(Preempted, match="SIGUSR1 received; stopped after epoch 1 of 3"):
        run_scdd(*args, run_dir=tmp_path / "stopped")
    stopped = tmp_path / "stopped" / "squeeze" / "supervised"
    assert torch.load(stopped / "state.pt", weights_only=False)["epoch"] == 1
    assert not (stopped / "teacher.pt").exists()
    stop_requested.reset()
    run_scdd(*args, "resume=true", run_dir=tmp_path / "stopped")
    run_scdd(*args, run_dir=tmp_path / "full")
    assert_same_teacher(stopped / "teacher.pt", tmp_path / "full" / "squeeze" / "supervised" / "teacher.pt")
