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


@pytest.fixture(scope="session")
def digits_teacher_ckpt(tmp_path_factory):
    return train_digits_teacher(tmp_path_factory.mktemp("teacher") / "teacher.pt")
