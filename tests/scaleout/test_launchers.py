"""The launchers run for real: every command of README.md's "Scaling out" and launchers/README.md
with tiny overrides (digits, a 16-wide ConvNet, one epoch), the SLURM script under a local srun.

Commands that need ImageNet or GPUs run with the same launcher and variables on digits or a small
image-folder tree; `sbatch --nodes=N` is the script run with the variables sbatch sets and an srun
stand-in on PATH that starts one task per node on this machine.
"""
import json
import os
import stat
from pathlib import Path

import pytest
import torch

from engine.artifacts.distilled import DistilledSet
from engine.artifacts.layout import RunLayout
from engine.artifacts.teacher import read_teacher
from engine.training.trainers import TRAINER_PRESETS, TRAINERS, resolve_trainer
from realdata import make_imagefolder_tree
from teachers import MODEL_OVERRIDES

REPO = Path(__file__).resolve().parents[2]
TINY = ("data=digits", *MODEL_OVERRIDES, "progress=false", "squeeze.epochs=1", "ssl.batch_size=64",
        "ssl.queue_size=256", "squeeze.supervised.batch_size=64", "squeeze.probe.epochs=2", "squeeze.workers=0")


def _final(run_dir, kind):
    return json.loads((run_dir / "squeeze" / kind / "metrics.json").read_text())["final"]


def _ok(result):
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])


def _readme_commands() -> list[str]:
    """Launcher command lines of README.md and launchers/README.md (the lines tested below)."""
    lines = []
    for doc in (REPO / "README.md", REPO / "launchers" / "README.md"):
        lines += [line.split("#")[0].strip() for line in doc.read_text().splitlines() if "launchers/" in line
                  and (line.startswith("launchers/") or line.startswith("NPROC=") or line.startswith("sbatch"))]
    return lines


def test_the_readme_launcher_commands_are_the_ones_tested_here():
    assert _readme_commands() == [
        "launchers/torchrun.sh stage=squeeze data=imagefolder data.root=/data/imagenet",
        "NPROC=2 MASTER_PORT=29611 launchers/torchrun.sh stage=pipeline",
        "sbatch --nodes=4 --gpus-per-node=8 launchers/slurm.sbatch stage=squeeze data=imagefolder data.root=/data/imagenet",
        "NPROC=8 DS_CONFIG=zero2 launchers/deepspeed.sh stage=squeeze",
        # README "Running on a cluster": run in tests/cluster/test_slurm_array.py
        "sbatch --array=0-2 launchers/slurm_array.sbatch stage=recover teacher=/ckpt/teacher.pt ipc=[2]",
        "NPROC=2 MASTER_PORT=29611 launchers/torchrun.sh stage=squeeze trainer=ddp",
        "NPROC=2 DS_CONFIG=zero1 launchers/deepspeed.sh stage=squeeze data=digits",
    ]


def test_trainer_auto_is_single_for_one_process_and_ddp_for_more():
    assert TRAINER_PRESETS["auto"].name == "auto" and "auto" in TRAINERS
    assert [resolve_trainer("auto", w) for w in (1, 2, 8)] == ["single", "ddp", "ddp"]
    assert [resolve_trainer(n, 4) for n in ("single", "ddp", "deepspeed")] == ["single", "ddp", "deepspeed"]


def test_explicit_trainer_single_with_two_processes_is_refused(compose, tmp_path):
    from engine.cli import build_context
    from engine.distributed import DistEnv
    from engine.errors import ConfigError
    from engine.squeeze.stage import run

    ctx = build_context(compose(*TINY, "stage=squeeze", "trainer=single", "squeeze.teachers=[supervised]"),
                        tmp_path / "run")
    ctx.dist = DistEnv(rank=1, world_size=2)  # refused before any collective, so one rank stands for both
    with pytest.raises(ConfigError, match="trainer=single runs one process but the world size is 2"):
        run(ctx)


def test_readme_pipeline_two_processes_default_trainer_and_idle_recover_ranks(launcher, tmp_path):
    """`NPROC=2 MASTER_PORT=29611 launchers/torchrun.sh stage=pipeline`: no trainer= needed (auto is
    ddp), and at ipc 1 each distilled set is one class batch, so rank 1 has none and waits."""
    run_dir = tmp_path / "run"
    result = launcher("torchrun.sh", "stage=pipeline", *TINY, "ipc=[1]", "recover.iterations=3",
                      "evaluate.epochs=2", "evaluate.eval_every=1", "evaluate.full_data_epochs=1",
                      run_dir=run_dir, env={"NPROC": "2"})
    _ok(result)
    for kind in ("ssl", "supervised"):
        final = _final(run_dir, kind)
        assert (final["trainer"], final["world_size"], final["finished"]) == ("ddp", 2, True)
    layout = RunLayout(run_dir)
    for name, init in (("ssl", "noise"), ("supervised", "noise"), ("ssl", "real")):
        images = DistilledSet.open(layout.recover_set(name, init)).tensors()["images"]
        assert images.shape == (10, 1, 8, 8)
    assert result.stdout.count("rank 1 of 2 has no class batch") == 3
    report = json.loads((run_dir / "report.json").read_text())
    assert (run_dir / "report.md").is_file() and report


def test_readme_squeeze_command_with_its_default_process_count(launcher, tmp_path):
    """`launchers/torchrun.sh stage=squeeze data=imagefolder data.root=...` without NPROC: one process
    on a machine without GPUs (trainer=auto is single), here on a small real image-folder tree."""
    make_imagefolder_tree(tmp_path / "tree", "imagenet")
    run_dir = tmp_path / "run"
    result = launcher("torchrun.sh", "stage=squeeze", "data=imagefolder", f"data.root={tmp_path / 'tree'}",
                      "data.image_size=16", *MODEL_OVERRIDES, "progress=false", "squeeze.epochs=1",
                      "ssl.batch_size=8", "ssl.queue_size=16", "ssl.shuffle_groups=2",
                      "squeeze.supervised.batch_size=8", "squeeze.probe.epochs=2", "squeeze.workers=0",
                      run_dir=run_dir)
    _ok(result)
    for kind in ("ssl", "supervised"):
        final = _final(run_dir, kind)
        assert (final["trainer"], final["world_size"], final["finished"]) == ("single", 1, True)


def test_launchers_readme_squeeze_with_ddp(launcher, tmp_path):
    """`NPROC=2 MASTER_PORT=29611 launchers/torchrun.sh stage=squeeze trainer=ddp`."""
    run_dir = tmp_path / "run"
    result = launcher("torchrun.sh", "stage=squeeze", "trainer=ddp", *TINY, "squeeze.teachers=[ssl]",
                      run_dir=run_dir, env={"NPROC": "2"})
    _ok(result)
    folder = run_dir / "squeeze" / "ssl"
    final = _final(run_dir, "ssl")
    assert (final["trainer"], final["world_size"], final["finished"]) == ("ddp", 2, True)
    assert 0.3 < final["probe_top1"] <= 1.0
    assert sorted(p.name for p in folder.iterdir()) == ["bn_stats.json", "metrics.csv", "metrics.json",
                                                       "teacher.pt"]  # per-rank states removed
    assert read_teacher(folder / "teacher.pt")["kind"] == "ssl"


SRUN = """#!/usr/bin/env bash
# srun stand-in: one task per node of the job (SLURM_JOB_NUM_NODES), all on this machine, with the
# variables srun gives each task; fails when a task fails, as --kill-on-bad-exit=1 does.
while [[ $# -gt 0 && "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_JOB_NUM_NODES; i++)); do
  SLURM_PROCID=$i SLURM_NODEID=$i SLURM_LOCALID=0 SLURM_NTASKS=$SLURM_JOB_NUM_NODES SLURMD_NODENAME=localhost \\
    SLURM_STEP_NODELIST=localhost "$@" > "$SRUN_LOG_DIR/task$i.out" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""


def test_readme_sbatch_command_under_a_local_srun(launcher, tmp_path):
    """`sbatch --nodes=N launchers/slurm.sbatch stage=squeeze ...`: the script with the variables sbatch
    sets for 2 nodes, each srun task a torchrun agent (NPROC default: 1 without GPUs) meeting at the
    c10d rendezvous on the first host of SLURM_JOB_NODELIST; trainer=auto picks ddp for the 2 ranks."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text(SRUN)
    srun.chmod(srun.stat().st_mode | stat.S_IXUSR)
    logs = tmp_path / "logs"
    logs.mkdir()
    run_dir = tmp_path / "run"
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SRUN_LOG_DIR": str(logs),
           "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2",
           "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": str(REPO)}
    result = launcher("slurm.sbatch", "stage=squeeze", *TINY, "squeeze.teachers=[supervised]", run_dir=run_dir,
                      env=env)
    tasks = {p.name: p.read_text()[-3000:] for p in sorted(logs.iterdir())}
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-2000:], tasks)
    assert "scdd: 2 node(s) x 1 process(es), rendezvous localhost:" in result.stdout
    assert sorted(tasks) == ["task0.out", "task1.out"]
    final = _final(run_dir, "supervised")
    assert (final["trainer"], final["world_size"], final["finished"]) == ("ddp", 2, True)


def _dtypes(state: dict) -> dict:
    return {k: v.dtype for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()}


def test_readme_deepspeed_zero2_bf16_keeps_the_teacher_fp32(launcher, tmp_path):
    """`NPROC=8 DS_CONFIG=zero2 launchers/deepspeed.sh stage=squeeze` (2 processes) with bf16: the
    forward runs under autocast; the saved weights and BN running statistics are fp32."""
    run_dir = tmp_path / "run"
    result = launcher("deepspeed.sh", "stage=squeeze", *TINY, "squeeze.teachers=[ssl]", "deepspeed.bf16=true",
                      run_dir=run_dir, env={"NPROC": "2", "DS_CONFIG": "zero2"})
    _ok(result)
    payload = read_teacher(run_dir / "squeeze" / "ssl" / "teacher.pt")
    final = payload["metrics"]
    assert (final["trainer"], final["world_size"], final["zero_stage"], final["bf16"]) == ("deepspeed", 2, 2, True)
    dtypes = _dtypes(payload["state_dict"])
    assert any(k.endswith("running_var") for k in dtypes) and set(dtypes.values()) == {torch.float32}, dtypes
    assert 0.3 < final["probe_top1"] <= 1.0


def test_deepspeed_zero0_bf16_keeps_moco_key_encoder_and_bn_statistics_fp32(launcher, tmp_path):
    """DS_CONFIG=zero0 with bf16, stopped after one of two epochs: each rank's checkpoint holds the
    whole MoCo state (key encoder, queue, BN running statistics), all fp32."""
    run_dir = tmp_path / "run"
    result = launcher("deepspeed.sh", "stage=squeeze", *TINY, "squeeze.teachers=[ssl]", "deepspeed.bf16=true",
                      "squeeze.epochs=2", "squeeze.stop_after_epochs=1", run_dir=run_dir,
                      env={"NPROC": "2", "DS_CONFIG": "zero0"})
    _ok(result)
    folder = run_dir / "squeeze" / "ssl"
    states = sorted(folder.glob("state.rank*of2.pt"))
    assert [p.name for p in states] == ["state.rank0of2.pt", "state.rank1of2.pt"]
    for path in states:
        method = torch.load(path, map_location="cpu", weights_only=False)["method"]
        dtypes = _dtypes(method)
        for part in ("key_backbone.", "key_head.", "queue", "running_mean", "running_var"):
            assert any(part in k for k in dtypes), part
        assert set(dtypes.values()) == {torch.float32}, {k: v for k, v in dtypes.items() if v != torch.float32}
    assert not (folder / "teacher.pt").exists()
