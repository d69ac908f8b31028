"""engine.bench.bn_layers: per-BN-layer costs inside the real recover loop."""
from __future__ import annotations

import pytest
from torch.autograd.profiler_util import FunctionEvent

from engine.bench import bn_layers
from engine.models import ModelConfig, build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _event(i, name, start, end, kernels=()):
    event = FunctionEvent(id=i, name=name, thread=0, start_us=start, end_us=end)
    for kernel, us in kernels:
        event.append_kernel(kernel, 0, us)
    return event


def test_device_attribution_forward_by_label_backward_in_reverse_layer_order():
    """Two layers, two steps: launches inside a layer's label are its forward, the k-th BN backward of a
    step is layer L-1-k; kernels launched outside any range (the convolutions) count for no layer."""
    bwd = "autograd::engine::evaluate_function: FusedBNMatchingFunctionBackward"
    events = []
    t = 0
    for _step in range(2):
        events.append(_event(len(events), "recover/bn_layer/0", t, t + 10))
        events.append(_event(len(events), "triton_launch", t + 1, t + 2, [("_bn_matching_fwd_kernel", 7.0)]))
        events.append(_event(len(events), "aten::conv", t + 11, t + 12, [("conv", 100.0)]))
        events.append(_event(len(events), "recover/bn_layer/1", t + 20, t + 30))
        events.append(_event(len(events), "aten::rsqrt", t + 21, t + 22, [("rsqrt", 1.0)]))
        events.append(_event(len(events), "triton_launch", t + 23, t + 24, [("_bn_matching_fwd_kernel", 5.0)]))
        events.append(_event(len(events), bwd, t + 40, t + 50))  # layer 1 first in backward
        events.append(_event(len(events), "triton_launch", t + 41, t + 42, [("_bn_matching_bwd_kernel", 9.0)]))
        events.append(_event(len(events), bwd, t + 60, t + 70))
        events.append(_event(len(events), "triton_launch", t + 61, t + 62, [("_bn_matching_bwd_kernel", 3.0)]))
        t += 100
    result = bn_layers.layer_costs(events, layers=2, steps=2, on_device=True)
    assert result["basis"] == "cuda kernel time"
    first, second = result["layers"]
    assert (first["fwd_launches"], first["fwd_us"], first["bwd_launches"], first["bwd_us"]) == (1, 7.0, 1, 3.0)
    assert (second["fwd_launches"], second["fwd_us"], second["bwd_launches"], second["bwd_us"]) == (2, 6.0, 1, 9.0)
    assert result["bn_launches_per_step"] == 5
    assert result["bn_us_per_step"] == pytest.approx(25.0)
    assert result["device_us_per_step"] == pytest.approx(125.0)  # the convolution counts for the step only


def test_cpu_profile_of_the_real_loop_names_every_layer():
    model = build_model(ModelConfig(name="convnet", width=8, depth=2), 10, 3, 16)
    result = bn_layers.profile_layers(model, batch=4, groups=2, image_size=16, num_classes=10, precision="fp32",
                                      steps=2, device=__import__("torch").device("cpu"), channels_last=False,
                                      backend="torch")
    assert result["basis"] == "cpu time"
    assert [row["input"] for row in result["layers"]] == ["8x8x16x16", "8x8x8x8"]
    for row in result["layers"]:
        assert row["fwd_us"] > 0 and row["bwd_us"] > 0
        assert row["fwd_launches"] >= 1 and row["bwd_launches"] >= 1
    text = bn_layers.render(result)
    assert "| 1 | 8x8x8x8 |" in text and "G=2 x batch 4" in text
