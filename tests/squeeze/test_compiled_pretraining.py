"""squeeze.compile: pretraining with torch.compile'd encoders ends where eager pretraining ends, its checkpoints
are the eager ones' (a run killed with compile on resumes with it off), the encoders run eagerly again after
training, and DeepSpeed is refused in one line.

Tolerance (digits, 10 images per class, ConvNet width 16, batch 32, 2 epochs = 6 SGD steps, CPU fp32): losses
within 1e-4 relative, every weight within 1e-3 (measured: losses within 1e-7, weights within 1e-4; inductor's fused
BatchNorm sums in another order). The GPU tier compiles on CUDA, with and without CUDA graphs
(tests/gpu/test_pretrain_graphs_cuda.py)."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from engine.data import DataConfig, build_data
from engine.errors import ConfigError
from engine.evaluate.stage import random_real_subset
from engine.models import build_model
from engine.squeeze.augment import spec_for
from engine.squeeze.pretrain import Interrupted, Schedule, check_compile, train
from engine.squeeze.ssl import METHODS, MoCoSettings, SupervisedSettings
from teachers import SMALL_MODEL

SETTINGS = {"mocov2": MoCoSettings(epochs=2, batch_size=32, lr=0.06, queue_size=64, shuffle_groups=2),
            "supervised": SupervisedSettings(epochs=2, batch_size=32, lr=0.05, augment="weak")}


@pytest.fixture(scope="module")
def digits():
    bundle = build_data(DataConfig(name="digits"))
    return bundle, random_real_subset(bundle, 10, seed=0).dataset


def _method(digits, name):
    bundle, _ = digits
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(5)
    return METHODS[name].build(build_model(SMALL_MODEL, 10, 1, bundle.image_size), SETTINGS[name], generator), generator


def _train(digits, name, method, generator, state_path, *, compile_encoders, resume=False, stop_after_epochs=None):
    bundle, train_set = digits
    s = SETTINGS[name]
    return train(method, train_set, schedule=Schedule(s.epochs, s.batch_size, s.lr, s.momentum, s.weight_decay),
                 spec=spec_for(s.augment, bundle.image_size, False), normalize=bundle.normalize,
                 device=torch.device("cpu"), generator=generator, state_path=state_path, fingerprint={"run": name},
                 resume=resume, stop_after_epochs=stop_after_epochs, progress=False, precision="fp32",
                 compile_encoders=compile_encoders)


def _assert_close(history, eager_history, method, eager_method):
    assert [r["loss"] for r in history] == pytest.approx([r["loss"] for r in eager_history], rel=1e-4)
    state, eager_state = method.state_dict(), eager_method.state_dict()
    assert list(state) == list(eager_state)  # Module.compile keeps the plain modules' keys
    for key, value in eager_state.items():
        if value.is_floating_point():
            assert torch.allclose(state[key], value, rtol=0, atol=1e-3), key
        else:
            assert torch.equal(state[key], value), key  # queue pointer, BN batch counts


def test_moco_compiled_then_killed_resumes_eagerly_where_eager_pretraining_ends(digits, tmp_path):
    eager, generator = _method(digits, "mocov2")
    eager_history = _train(digits, "mocov2", eager, generator, tmp_path / "eager.pt", compile_encoders=False)

    method, generator = _method(digits, "mocov2")
    graphs_before = counters["stats"]["unique_graphs"]
    with pytest.raises(Interrupted):
        _train(digits, "mocov2", method, generator, tmp_path / "run.pt", compile_encoders=True, stop_after_epochs=1)
    assert counters["stats"]["unique_graphs"] > graphs_before  # the encoders did run compiled
    assert all(m._compiled_call_impl is None for m in method.encoders())  # and run eagerly again after the kill

    method, generator = _method(digits, "mocov2")  # a fresh process: the checkpoint carries everything
    history = _train(digits, "mocov2", method, generator, tmp_path / "run.pt", compile_encoders=False, resume=True)
    _assert_close(history, eager_history, method, eager)


def test_compiled_supervised_teacher_ends_where_the_eager_one_ends(digits, tmp_path):
    eager, generator = _method(digits, "supervised")
    eager_history = _train(digits, "supervised", eager, generator, tmp_path / "eager.pt", compile_encoders=False)
    method, generator = _method(digits, "supervised")
    history = _train(digits, "supervised", method, generator, tmp_path / "run.pt", compile_encoders=True)
    _assert_close(history, eager_history, method, eager)
    assert method.model._compiled_call_impl is None


def test_compile_refused_with_deepspeed():
    check_compile("single")
    check_compile("ddp")
    with pytest.raises(ConfigError, match="squeeze.compile=true compiles the encoders of trainer=single or ddp"):
        check_compile("deepspeed")
