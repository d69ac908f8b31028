"""Pretraining steps are ready for CUDA graph capture (squeeze.cuda_graphs), checked without a GPU.

A captured graph replays the operations of the step it recorded, so every MoCo v2, SimCLR and supervised step must run
the same operations on tensors of the same shapes whatever it drew: crops, flips, jitter, grayscale, blur, the
shuffle-BN order, the queue position. Each step is traced on the CPU (every aten operation with its output
shapes and dtypes) and compared. The GPU tier (tests/gpu/test_pretrain_graphs_cuda.py) captures and replays.
"""
from __future__ import annotations

import pytest
import torch

from engine.errors import ConfigError
from engine.squeeze.pretrain import check_cuda_graphs
from op_trace import OpTrace
from sync_steps import cifar_bundle, moco_step
from teachers import SMALL_MODEL

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return cifar_bundle(tmp_path_factory.mktemp("cifar"))


@pytest.mark.parametrize("method_name,precision", [("mocov2", "fp32"), ("mocov2", "bf16"), ("simclr", "bf16"),
                                                    ("supervised", "bf16")])
def test_every_pretraining_step_runs_the_same_operations(cifar, tmp_path, method_name, precision):
    step = moco_step(cifar, torch.device("cpu"), SMALL_MODEL, tmp_path / "state.pt", precision=precision,
                     method_name=method_name)
    step()  # the first step creates SGD's momentum buffers
    traces = []
    for _ in range(5):  # MoCo: queue of 16, batch 8: the pointer wraps
        with OpTrace() as trace:
            assert torch.isfinite(step())
        traces.append(trace.ops)
    assert len(traces[0]) > 100
    for i, ops in enumerate(traces[1:], start=2):
        assert ops == traces[0], f"step {i} ran other operations than step 1"


def test_cuda_graphs_refused_where_pretraining_cannot_capture():
    with pytest.raises(ConfigError, match=r"squeeze.cuda_graphs=true needs a CUDA device \(this run is on cpu\)"):
        check_cuda_graphs(torch.device("cpu"), "single")
    with pytest.raises(ConfigError, match="trainer=ddp: set squeeze.cuda_graphs=false"):
        check_cuda_graphs(torch.device("cuda"), "ddp")
    with pytest.raises(ConfigError, match=r"this data streams \(loader=ffcv\)"):
        check_cuda_graphs(torch.device("cuda"), "single", "loader=ffcv")
