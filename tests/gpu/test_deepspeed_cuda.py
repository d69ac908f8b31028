"""DeepSpeed on CUDA (one process, NCCL): bf16 is on by default there and runs as autocast; the saved
teacher's weights and BN running statistics stay fp32."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.artifacts.teacher import read_teacher
from teachers import MODEL_OVERRIDES

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_deepspeed_default_bf16_on_cuda_keeps_the_teacher_fp32(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(PYTHON=sys.executable, PYTHONPATH=str(REPO), NPROC="1", MASTER_PORT=str(_free_port()), DS_CONFIG="zero2",
               TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"))
    run_dir = tmp_path / "run"
    result = subprocess.run(["bash", str(REPO / "launchers" / "deepspeed.sh"), "stage=squeeze", "data=digits",
                             *MODEL_OVERRIDES, "device=cuda", "progress=false", "squeeze.teachers=[ssl]",
                             "squeeze.epochs=1", "ssl.batch_size=64", "ssl.queue_size=256", "squeeze.probe.epochs=2",
                             "squeeze.workers=0", f"hydra.run.dir={run_dir}"],
                            capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    payload = read_teacher(run_dir / "squeeze" / "ssl" / "teacher.pt")
    assert (payload["metrics"]["trainer"], payload["metrics"]["bf16"], payload["metrics"]["zero_stage"]) == (
        "deepspeed", True, 2)
    floats = {k: v.dtype for k, v in payload["state_dict"].items() if v.is_floating_point()}
    assert set(floats.values()) == {torch.float32}, floats
    assert payload["metrics"]["probe_top1"] > 0.3
