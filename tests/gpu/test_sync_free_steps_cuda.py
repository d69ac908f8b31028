"""Student steps and MoCo v2 steps on CUDA never make the host wait for the GPU: after a warm-up step (cached
constants, optimizer state, cuDNN's choices), steps run under ``torch.cuda.set_sync_debug_mode("error")``, so a
pageable host->device copy, an item(), a nonzero or a boolean mask among them raises. fp32 and bf16, ConvNet
and ResNet-18 (NHWC, fused optimizers: the CUDA defaults). The CPU tier counts the copies on the meta device
(tests/training/test_sync_free_steps.py)."""
from __future__ import annotations

import pytest
import torch

from engine.models import ModelConfig
from sync_steps import cifar_bundle, moco_step, student_step
from teachers import SMALL_MODEL

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
MODELS = {"convnet": SMALL_MODEL, "resnet18": ModelConfig(name="resnet18")}
STEPS = 3


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return cifar_bundle(tmp_path_factory.mktemp("cifar"))


def _run_without_syncs(step) -> list[float]:
    losses = [step()]  # warm-up: may sync (constants, first optimizer step, cuDNN autotuning)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses += [step() for _ in range(STEPS)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    values = torch.stack(losses).float().cpu().tolist()
    assert all(v == v and abs(v) < float("inf") for v in values), values
    return values


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("model", MODELS.values(), ids=MODELS.keys())
@pytest.mark.parametrize("options", [dict(loss="kl", crop="rrc", mix="cutmix"),
                                     dict(loss="hard", crop="pad", mix="mixup")], ids=["rrc-cutmix-kl", "pad-mixup-hard"])
def test_student_steps_never_wait_for_the_gpu(cifar, model, precision, options):
    _run_without_syncs(student_step(cifar, CUDA, model, precision=precision, **options))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("model", MODELS.values(), ids=MODELS.keys())
def test_moco_steps_never_wait_for_the_gpu(cifar, model, precision, tmp_path):
    _run_without_syncs(moco_step(cifar, CUDA, model, tmp_path / "state.pt", precision=precision))
