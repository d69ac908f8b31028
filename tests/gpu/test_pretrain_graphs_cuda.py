"""squeeze.cuda_graphs on CUDA: MoCo v2 and supervised pretraining with every step after the warm-up replaying
one captured graph end where eager pretraining ends (weights, queue, losses; cuDNN deterministic), fp32 and bf16;
with squeeze.compile (torch.compile'd encoders, with and without graphs) MoCo v2 ends near eager pretraining.
The CPU tier checks the steps' graph readiness (tests/squeeze/test_pretrain_graph_step.py)."""
from __future__ import annotations

import pytest
import torch

from engine.models import ModelConfig, build_model
from engine.squeeze.augment import spec_for
from engine.squeeze.pretrain import Schedule, train
from engine.squeeze.ssl import METHODS, MoCoSettings, SupervisedSettings
from teachers import SMALL_MODEL

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
BATCH, EPOCHS = 32, 2
IPC = 20  # digits32 (tests/gpu/conftest.py): 20 per class, 200 images: 6 steps an epoch (drop_last)
SETTINGS = {"mocov2": MoCoSettings(batch_size=BATCH, queue_size=64, shuffle_groups=2),
            "supervised": SupervisedSettings(batch_size=BATCH, augment="strong")}
MODELS = {"convnet": SMALL_MODEL, "resnet18": ModelConfig(name="resnet18")}




def _pretrain(digits32, method_name, model, precision, graphs, tmp_path, monkeypatch, compiled=False):
    bundle, train_set = digits32
    replays = []
    replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda self: (replays.append(1), replay(self))[1])
    settings = SETTINGS[method_name]
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    method = METHODS[method_name].build(build_model(model, bundle.num_classes, 3, 32), settings, generator)
    history = train(method, train_set, schedule=Schedule(EPOCHS, BATCH, settings.lr, settings.momentum,
                                                         settings.weight_decay),
                    spec=spec_for(settings.augment, 32, True), normalize=bundle.normalize, device=CUDA,
                    generator=generator, state_path=tmp_path / f"{graphs}{compiled}.pt", fingerprint={}, resume=False,
                    progress=False, precision=precision, cuda_graphs=graphs, compile_encoders=compiled)
    monkeypatch.undo()
    saved = torch.load(tmp_path / f"{graphs}{compiled}.pt", weights_only=False)
    assert all(not isinstance(g["lr"], torch.Tensor) for g in saved["optimizer"]["param_groups"])
    return method.state_dict(), [row["loss"] for row in history], len(replays)


@pytest.mark.usefixtures("deterministic_cudnn")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("model", MODELS.values(), ids=MODELS.keys())
@pytest.mark.parametrize("method_name", sorted(SETTINGS))
def test_graphed_pretraining_ends_where_eager_pretraining_ends(digits32, method_name, model, precision, tmp_path,
                                                                monkeypatch):
    eager = _pretrain(digits32, method_name, model, precision, False, tmp_path, monkeypatch)
    graphed = _pretrain(digits32, method_name, model, precision, True, tmp_path, monkeypatch)
    steps = EPOCHS * (IPC * 10 // BATCH)
    assert eager[2] == 0 and graphed[2] == steps - 3
    tolerance = 1e-5 if precision == "fp32" else 1e-3
    assert graphed[1] == pytest.approx(eager[1], rel=tolerance, abs=tolerance)
    for key, value in eager[0].items():
        if value.is_floating_point():
            assert torch.allclose(graphed[0][key], value, rtol=tolerance, atol=tolerance), key
        else:
            assert torch.equal(graphed[0][key], value), key  # queue pointer, BN batch counts


@pytest.mark.usefixtures("deterministic_cudnn")
@pytest.mark.parametrize("precision,graphs", [("fp32", True), ("bf16", True), ("bf16", False)])
def test_compiled_moco_ends_near_eager_moco(digits32, precision, graphs, tmp_path, monkeypatch):
    """Inductor's fused BatchNorm sums in another order, so compiled steps follow eager ones within a share of
    how far training moved each weight (as bf16 follows fp32, tests/squeeze/test_squeeze_precision.py)."""
    eager = _pretrain(digits32, "mocov2", SMALL_MODEL, precision, False, tmp_path, monkeypatch)
    torch.manual_seed(0)  # _pretrain's start: the same seeds before the model and the method are built
    start = METHODS["mocov2"].build(build_model(SMALL_MODEL, digits32[0].num_classes, 3, 32), SETTINGS["mocov2"],
                                    torch.Generator().manual_seed(0)).state_dict()
    compiled = _pretrain(digits32, "mocov2", SMALL_MODEL, precision, graphs, tmp_path, monkeypatch, compiled=True)
    steps = EPOCHS * (IPC * 10 // BATCH)
    assert compiled[2] == (steps - 3 if graphs else 0)
    assert compiled[1] == pytest.approx(eager[1], rel=1e-2 if precision == "bf16" else 1e-3)
    for key, value in eager[0].items():
        if value.is_floating_point() and key != "queue":
            moved = (value - start[key].to(value.device)).norm()
            assert (compiled[0][key] - value).norm() <= 0.2 * moved + 1e-5, key
        elif not value.is_floating_point():
            assert torch.equal(compiled[0][key], value), key
