"""Helpers for multi-process tests: a free rendezvous port and `torchrun -m engine.cli`."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from teachers import train_digits_teacher

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def torchrun():
    """Run ``engine.cli`` under torchrun with ``nproc`` processes; returns the CompletedProcess."""

    def _run(nproc: int, *overrides: str, run_dir: Path, timeout: int = 240) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
               f"--nproc_per_node={nproc}", f"--master_port={_free_port()}", "-m", "engine.cli",
               *overrides, f"hydra.run.dir={run_dir}"]
        # One thread per process (torchrun's default, stated so the in-process references can match
        # it); DeepSpeed's C++ ops, if any get built, are cached in the repo's gitignored .cache/.
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
               "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions")}
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)

    return _run


LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "NPROC", "DS_CONFIG", "SCDD_ROOT", "PYTHON", "TORCHELASTIC_RUN_ID")


def launch_env(**extra: str) -> dict:
    """The environment a launcher runs in: this interpreter and checkout, one thread per process,
    none of the caller's rank variables (a SLURM or torchrun job running the suite)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES and not k.startswith("SLURM_")}
    env.update(PYTHON=sys.executable, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
               TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"), MASTER_PORT=str(_free_port()))
    env.update(extra)
    return env


@pytest.fixture
def launcher():
    """Run ``launchers/<script> *overrides hydra.run.dir=run_dir`` with ``env`` on top of launch_env()."""

    def _run(script: str, *overrides: str, run_dir: Path, env: dict | None = None,
             timeout: int = 240) -> subprocess.CompletedProcess:
        cmd = ["bash", str(REPO / "launchers" / script), *overrides, f"hydra.run.dir={run_dir}"]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                              env=launch_env(**(env or {})))

    return _run


@pytest.fixture(scope="session")
def digits_teacher_ckpt(tmp_path_factory):
    return train_digits_teacher(tmp_path_factory.mktemp("teacher") / "teacher.pt")
