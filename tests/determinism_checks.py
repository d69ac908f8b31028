"""Bit-identity checks of recover and squeeze (reruns, kill/resume), shared by the CPU tests and the
GPU tier (tests/gpu/), which run them with ``device=cuda deterministic=true``."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from engine.artifacts.distilled import DistilledSet
from engine.artifacts.layout import RunLayout
from teachers import assert_same_teacher

RECOVER = ("stage=recover", "progress=false", "recover.log_every=1", "recover.ipc_per_batch=1",
           "recover.classes_per_batch=5", "ipc=[2]")
"""Four class batches (ipc 2 x 10 classes / 5 per batch)."""


def _set(run_dir: Path) -> dict:
    return DistilledSet.open(RunLayout(run_dir).recover_set("supervised", "noise")).tensors()


def recover_reruns_and_resumes_bit_identically(run_scdd, teacher: Path, tmp_path: Path, *overrides: str) -> None:
    """Two runs give identical images and loss logs; a run killed after two of four batches and
    resumed gives the uninterrupted run's images."""
    args = (*RECOVER, f"teacher={teacher}", *overrides)
    run_scdd(*args, run_dir=tmp_path / "a")
    run_scdd(*args, run_dir=tmp_path / "b")
    a, b = _set(tmp_path / "a"), _set(tmp_path / "b")
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])
    out_a = RunLayout(tmp_path / "a").recover_set("supervised", "noise")
    out_b = RunLayout(tmp_path / "b").recover_set("supervised", "noise")
    assert (out_a / "loss_log.csv").read_text() == (out_b / "loss_log.csv").read_text()  # every step's losses

    killed = RunLayout(tmp_path / "killed").recover_set("supervised", "noise")
    shutil.copytree(out_a, killed)
    (killed / "index.json").unlink()
    for name in ("b000001.json", "b000003.json"):
        (killed / "batches" / name).unlink()
    run_scdd(*args, "resume=true", run_dir=tmp_path / "killed")
    resumed = _set(tmp_path / "killed")
    assert torch.equal(resumed["images"], a["images"])
    assert (killed / "loss_log.csv").read_text() == (out_a / "loss_log.csv").read_text()


def squeeze_resumes_to_identical_weights(run_scdd, tmp_path: Path, method: str, *overrides: str) -> None:
    """A teacher trained for 2 epochs equals one stopped after 1 and resumed, bit for bit, and so do
    the per-epoch losses."""
    kind = "supervised" if method == "supervised" else "ssl"
    args = ["stage=squeeze", "progress=false", f"squeeze.teachers=[{kind}]", "squeeze.epochs=2",
            "squeeze.probe.epochs=3", "ssl.batch_size=64", "ssl.queue_size=160", "squeeze.supervised.batch_size=64",
            "squeeze.workers=0", *overrides]
    whole = run_scdd(*args, run_dir=tmp_path / "whole")
    cut = run_scdd(*args, "squeeze.stop_after_epochs=1", run_dir=tmp_path / "cut")
    assert cut["interrupted"] == kind
    resumed = run_scdd(*args, "resume=true", run_dir=tmp_path / "cut")
    a, b = assert_same_teacher(whole["teachers"][kind]["path"], resumed["teachers"][kind]["path"])

    def losses(run):
        return [row["loss"] for row in json.loads((tmp_path / run / "squeeze" / kind / "metrics.json")
                                                  .read_text())["pretrain"]]

    assert losses("whole") == losses("cut")
