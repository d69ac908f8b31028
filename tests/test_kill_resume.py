"""Kill anywhere: each stage, SIGKILLed in a subprocess at a random point after it has written some progress,
then resumed (resume=true, same run dir), ends with exactly what an uninterrupted run gives.

The kill point is random (the progress count it waits for and a short delay after it, drawn from a generator
seeded per stage) but chosen well before the end, so every run is really interrupted; the outcome compared is
deterministic on the CPU: teacher weights, distilled images, stored label files, student results. Label files
are compared by content: torch.save names its archive after the (random) temp file it writes, so the bytes of
two identical label files differ in that name.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from engine.artifacts.distilled import DistilledSet
from teachers import MODEL_OVERRIDES, train_digits_teacher

REPO = Path(__file__).resolve().parent.parent
BASE = ("data=digits", "device=cpu", *MODEL_OVERRIDES, "progress=false")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return train_digits_teacher(tmp_path_factory.mktemp("kill_teacher") / "teacher.pt", epochs=2)


@pytest.fixture(scope="module")
def set_run(teacher, tmp_path_factory) -> Path:
    """A run dir holding one distilled set (supervised-noise, 10 images per class) for relabel and evaluate."""
    from hydra import compose, initialize_config_dir

    from engine.cli import execute

    run_dir = tmp_path_factory.mktemp("kill_set")
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = compose(config_name="config", overrides=[*BASE, "stage=recover", f"teacher={teacher}", "ipc=[10]",
                                                       "recover.iterations=2"])
    execute(cfg, run_dir)
    return run_dir


def _kill_at_random_point(run_dir: Path, overrides: tuple[str, ...], progress: Callable[[], int],
                          first: int, last: int, rng: random.Random) -> str:
    """Start ``scdd`` in a subprocess, wait until ``progress()`` reaches a random count in [first, last], sleep
    a random 0-50 ms more, SIGKILL it; returns where it was killed (for failure messages)."""
    at, delay = rng.randint(first, last), rng.uniform(0.0, 0.05)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", *overrides, f"hydra.run.dir={run_dir}"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    try:
        while progress() < at:
            if proc.poll() is not None:
                pytest.fail(f"the run ended (exit {proc.returncode}) before progress {at}: {proc.stderr.read()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no progress {at} within 180 s")
            time.sleep(0.005)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    where = f"killed at progress {at} + {delay * 1000:.0f} ms"
    assert proc.returncode == -signal.SIGKILL, f"the run finished before the kill ({where})"
    return where


def _count(folder: Path, pattern: str) -> Callable[[], int]:
    return lambda: len(list(folder.glob(pattern))) if folder.is_dir() else 0


def _same(a: Any, b: Any) -> bool:
    """Deep, exact equality of loaded artifacts (tensors, arrays, containers, numbers)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def test_squeeze_killed_and_resumed_gives_the_same_teacher(run_scdd, tmp_path):
    args = (*BASE, "stage=squeeze", "squeeze.teachers=[ssl]", "squeeze.epochs=8", "squeeze.probe.epochs=2")
    run_scdd(*args, run_dir=tmp_path / "full")
    killed = tmp_path / "killed"

    def epochs_done() -> int:
        try:
            return len(json.loads((killed / "squeeze" / "ssl" / "metrics.json").read_text())["pretrain"])
        except (OSError, ValueError, KeyError):
            return 0

    where = _kill_at_random_point(killed, args, epochs_done, 1, 4, random.Random("squeeze"))
    assert not (killed / "squeeze" / "ssl" / "teacher.pt").exists(), where
    run_scdd(*args, "resume=true", run_dir=killed)
    a, b = (torch.load(run / "squeeze" / "ssl" / "teacher.pt", weights_only=False) for run in (tmp_path / "full", killed))
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"]), where  # bit-identical
    assert a["fingerprint"] == b["fingerprint"] and a["metrics"]["probe_top1"] == b["metrics"]["probe_top1"], where


def test_recover_killed_and_resumed_gives_the_same_images(run_scdd, teacher, tmp_path):
    args = (*BASE, "stage=recover", f"teacher={teacher}", "ipc=[4]", "recover.iterations=60",
            "recover.classes_per_batch=5", "recover.ipc_per_batch=1")  # 8 class batches
    run_scdd(*args, run_dir=tmp_path / "full")
    killed = tmp_path / "killed"
    records = _count(killed / "recover" / "supervised-noise" / "batches", "b*.json")
    where = _kill_at_random_point(killed, args, records, 1, 4, random.Random("recover"))
    assert not (killed / "recover" / "supervised-noise" / "index.json").exists(), where
    run_scdd(*args, "resume=true", run_dir=killed)
    full, resumed = (DistilledSet.open(run / "recover" / "supervised-noise") for run in (tmp_path / "full", killed))
    assert full.index["files"] == resumed.index["files"] and full.digest == resumed.digest
    a, b = full.tensors(), resumed.tensors()
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"]), where
    for rel in full.index["files"]:  # the PNG files themselves, byte for byte
        assert (full.folder / rel).read_bytes() == (resumed.folder / rel).read_bytes(), (rel, where)


def test_relabel_killed_and_resumed_gives_the_same_label_files(run_scdd, teacher, set_run, tmp_path):
    args = (*BASE, "stage=relabel", f"teacher={teacher}", "ipc=[10]", "evaluate.epochs=60",
            "evaluate.batch_size=10")
    runs = {name: tmp_path / name for name in ("full", "killed")}
    for run in runs.values():
        shutil.copytree(set_run, run)
    run_scdd(*args, run_dir=runs["full"])
    labels = runs["killed"] / "evaluate" / "ipc10" / "sre2l" / "labels"
    where = _kill_at_random_point(runs["killed"], args, _count(labels, "epoch*.pt"), 2, 20, random.Random("relabel"))
    assert len(list(labels.glob("epoch*.pt"))) < 60, where
    run_scdd(*args, "resume=true", run_dir=runs["killed"])
    full = runs["full"] / "evaluate" / "ipc10" / "sre2l" / "labels"
    names = sorted(p.name for p in full.iterdir())
    assert names == sorted(p.name for p in labels.iterdir()) and len(names) == 61  # meta.json + 60 epochs
    assert (full / "meta.json").read_text() == (labels / "meta.json").read_text()
    for name in names[:-1]:
        a, b = (torch.load(folder / name, weights_only=False) for folder in (full, labels))
        assert _same(a, b), (name, where)


def test_evaluate_killed_and_resumed_gives_the_same_student_results(run_scdd, teacher, set_run, tmp_path):
    args = (*BASE, "stage=evaluate", f"teacher={teacher}", "ipc=[2]", "evaluate.epochs=30",
            "evaluate.eval_every=5", "evaluate.batch_size=2", "evaluate.full_data=false")
    runs = {name: tmp_path / name for name in ("full", "killed")}
    for run in runs.values():
        shutil.copytree(set_run, run)
    run_scdd(*args, run_dir=runs["full"])
    state = runs["killed"] / "evaluate" / "ipc2" / "sre2l" / "student_state.pt"

    def epochs_checkpointed() -> int:  # the first row's checkpoint, saved every 3 epochs
        try:
            return torch.load(state, weights_only=False)["epoch"]
        except Exception:  # noqa: BLE001 - absent, or replaced while being read
            return 0

    where = _kill_at_random_point(runs["killed"], args, epochs_checkpointed, 3, 12, random.Random("evaluate"))
    assert not (runs["killed"] / "evaluate" / "ipc2" / "random_real" / "result.json").exists(), where
    run_scdd(*args, "resume=true", run_dir=runs["killed"])
    for row in ("sre2l", "random_real"):
        a, b = (json.loads((run / "evaluate" / "ipc2" / row / "result.json").read_text()) for run in runs.values())
        assert (a["top1"], a["top5"], a["history"]) == (b["top1"], b["top5"], b["history"]), (row, where)
        assert len(a["history"]) == 30
