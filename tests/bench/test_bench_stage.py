"""`scdd stage=bench`: bench.json contents, recover-step breakdown, projections, config errors."""
import json

import pytest
import torch

from engine.bench.projection import project_run, project_stage
from engine.bench.settings import BenchConfig
from engine.config import from_mapping
from engine.errors import ConfigError

TINY = ("data=digits", "model.width=16", "model.depth=2", "stage=bench", "bench.steps=2", "bench.warmup=1",
        "bench.repeats=1", "bench.pretrain_batch=16", "bench.eval_batch=16", "bench.breakdown_steps=2", "progress=false")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_bench_writes_every_figure_and_a_trace(run_scdd, tmp_path):
    result = run_scdd(*TINY, "bench.trace=true", "evaluate.epochs=7", run_dir=tmp_path)
    saved = json.loads((tmp_path / "bench.json").read_text())
    for key in ("device", "bench", "pretrain_images_per_s", "recover_image_iterations_per_s",
                "evaluate_images_per_s", "peak_memory_mb", "memory_kind", "measurements", "peer_comparison",
                "breakdown", "projection"):
        assert key in saved, key
    for key in ("pretrain_images_per_s", "recover_image_iterations_per_s", "evaluate_images_per_s",
                "peak_memory_mb"):
        assert saved[key] > 0, key
    stages = {(m["stage"], m["variant"].split()[0]) for m in saved["measurements"]}
    assert stages == {("pretrain", "mocov2"), ("recover", "engine"), ("recover", "peer"), ("evaluate", "student")}
    assert all(m["rate"] > 0 and m["model"] == "convnet" and m["image_size"] == 8 for m in saved["measurements"])
    # every rate is its own timing: batch x steps / measured seconds
    for m in saved["measurements"]:
        assert m["seconds"] > 0 and m["rate"] == pytest.approx(m["batch"] * m["steps"] / m["seconds"], rel=1e-12)
    recover = {m["variant"].split()[0]: m for m in saved["measurements"] if m["stage"] == "recover"}
    engine, peer = recover["engine"], recover["peer"]
    assert (engine["batch"], engine["steps"]) == (peer["batch"], peer["steps"])  # the same work, timed twice
    comparison = saved["peer_comparison"]
    assert comparison["engine_image_iterations_per_s"] == engine["rate"] == saved["recover_image_iterations_per_s"]
    assert comparison["peer_image_iterations_per_s"] == peer["rate"]
    # the reported speedup is the ratio of those two rates, i.e. of the peer's to the engine's seconds
    assert comparison["speedup"] == pytest.approx(engine["rate"] / peer["rate"], rel=1e-12)
    assert comparison["speedup"] == pytest.approx(peer["seconds"] / engine["seconds"], rel=1e-9)
    fractions = saved["breakdown"]["fractions"]
    assert set(fractions) == {"augmentation", "teacher_forward", "bn_statistics", "backward", "optimizer", "other"}
    assert all(v >= 0 for v in fractions.values())
    assert sum(fractions.values()) == pytest.approx(1.0, abs=1e-6)
    assert fractions["teacher_forward"] > 0 and fractions["backward"] > 0 and fractions["bn_statistics"] > 0
    assert saved["breakdown"]["basis"] == "cpu time" and saved["breakdown"]["step_ms"] > 0
    assert saved["breakdown"]["step_ms"] <= saved["breakdown"]["wall_step_ms"] + 1e-9
    trace = json.loads((tmp_path / "recover_trace.json").read_text())
    assert any(e.get("name") == "recover/bn_statistics" for e in trace["traceEvents"])
    # current target: the configured run's own sizes and schedule
    proj = saved["projection"]
    assert proj["target"]["name"] == "current" and proj["target"]["num_classes"] == 10
    assert proj["target"]["eval_epochs"] == 7  # evaluate.epochs, as configured
    assert result["projection"]["total_gpu_hours"] == pytest.approx(saved["projection"]["total_gpu_hours"])


def test_named_target_projection_rests_on_measured_rates(run_scdd, tmp_path):
    """measure_target=false: the target's sizes with the configured run's rates; arithmetic by hand."""
    saved = run_scdd(*TINY, "bench.peer=false", "bench.breakdown_steps=0", "bench.target=imagenet1k",
                     "bench.measure_target=false", "ipc=[50]", "recover.iterations=1000", "bench.gpus=8",
                     run_dir=tmp_path)
    stages = saved["projection"]["stages"]
    rec, pre, ev = (saved["recover_image_iterations_per_s"], saved["pretrain_images_per_s"],
                    saved["evaluate_images_per_s"])
    assert stages["recover"]["wall_seconds"] == pytest.approx(1000 * 50 * 1000 / rec / 8)
    assert stages["recover"]["gpu_hours"] == pytest.approx(1000 * 50 * 1000 / rec / 3600)
    assert stages["pretrain"]["wall_seconds"] == pytest.approx(1_281_167 * 200 / pre / 8)
    assert stages["evaluate"]["wall_seconds"] == pytest.approx(1000 * 50 * 300 / ev / 8)
    assert saved["target_measurements"] is None and saved["peer_comparison"] is None
    assert "configured data (digits)" in saved["projection"]["based_on"]["recover"]


def test_target_shapes_are_measured_when_they_differ(run_scdd, tmp_path):
    saved = run_scdd(*TINY, "bench.peer=false", "bench.breakdown_steps=0", "bench.target=cifar100",
                     "bench.target_batch=4", "bench.target_steps=1", "bench.target_warmup=0", "ipc=[10]",
                     run_dir=tmp_path)
    rows = saved["target_measurements"]
    assert {r["stage"] for r in rows} == {"pretrain", "recover", "evaluate"}
    assert all(r["model"] == "resnet18_cifar" and r["image_size"] == 32 and r["batch"] == 4 and r["rate"] > 0
               for r in rows)
    recover = next(r for r in rows if r["stage"] == "recover")
    assert saved["projection"]["stages"]["recover"]["rate"] == pytest.approx(recover["rate"])
    assert "synthetic cifar100 shapes" in saved["projection"]["based_on"]["recover"]
    # recover by option on both shapes: peer, floor and engine rows, the target's at its own model/size
    for key, model in (("recover_variants", "convnet"), ("target_recover_variants", "resnet18_cifar")):
        variants = {r["variant"]: r for r in saved[key]}
        assert {"peer (hooks, copies)", "floor G=1 fp32", "floor G=2 fp32", "engine G=1 fp32 graphs off",
                "engine G=2 fp32 graphs off"} == set(variants)
        measured = [r["rate"] for r in variants.values() if r["rate"]]
        assert len(measured) >= 4 and all(r["model"] == model and r["rate"] > 0 for r in measured)
        assert variants["floor G=2 fp32"]["rate"]["batch"] == 2 * variants["floor G=1 fp32"]["rate"]["batch"]


def test_projection_arithmetic_by_hand():
    # 1000 classes x 50 ipc x 1000 iterations = 5e7 image-iterations at 100/s on 8 GPUs
    stage = project_stage("recover", 5e7, 100.0, 8)
    assert stage.wall_seconds == pytest.approx(62_500.0)
    assert stage.gpu_hours == pytest.approx(5e7 / 100 / 3600)  # 138.89 h, independent of gpus
    out = project_run(num_classes=100, train_images=50_000, ipcs=[10, 50], iterations=1000, ssl_epochs=200,
                      eval_epochs=300, recover_rate=250.0, pretrain_rate=2000.0, eval_rate=5000.0, gpus=4)
    assert out["recover"].wall_seconds == pytest.approx(100 * 50 * 1000 / 250 / 4)  # 5,000 s: largest ipc once
    assert out["pretrain"].wall_seconds == pytest.approx(50_000 * 200 / 2000 / 4)  # 1,250 s
    assert out["evaluate"].work == 100 * (10 + 50) * 300  # one student per ipc
    assert out["evaluate"].gpu_hours == pytest.approx(1_800_000 / 5000 / 3600)  # 0.1 h
    with pytest.raises(ValueError):
        project_stage("recover", 1.0, 0.0, 1)


@pytest.mark.parametrize("bad", [{"gpus": 0}, {"steps": 0}, {"warmup": -1}, {"target": "mars"}, {"batch": 0},
                                 {"pretrain_batch": 1}, {"target_steps": 0}, {"breakdown_steps": -1},
                                 {"repeats": 0}, {"gpus": "eight"}, {"no_such_key": 1}, {"groups": [0]},
                                 {"groups": []}, {"precisions": ["fp16"]}])
def test_bad_bench_values_raise_config_error(bad):
    with pytest.raises(ConfigError):
        from_mapping(BenchConfig, bad, "bench")


def test_bad_bench_value_fails_through_the_cli(run_scdd, tmp_path):
    with pytest.raises(ConfigError, match="bench.gpus"):
        run_scdd(*TINY, "bench.gpus=0", run_dir=tmp_path)


def test_breakdown_profiles_the_real_recover_loop(monkeypatch):
    """recover_breakdown runs engine.recover.synthesize.synthesize_batch itself and sums its labelled ranges."""
    from engine.bench import measure
    from engine.models import ModelConfig, build_model
    from engine.recover.settings import StepAugment
    from engine.recover.synthesize import Objective, synthesize_batch

    calls = []

    def counted(*args, **kwargs):
        calls.append(args[4].iterations)
        return synthesize_batch(*args, **kwargs)

    monkeypatch.setattr(measure, "synthesize_batch", counted)
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="convnet", width=8, depth=2), 10, 1, 8)
    aug = StepAugment(image_size=8, crop_scale=(0.5, 1.0), flip=False, jitter=1)
    out = measure.recover_breakdown(model, num_classes=10, batch=4, aug=aug,
                                    objective=Objective(r_bn=0.01, first_bn_multiplier=10.0, iterations=3, lr=0.1),
                                    steps=3, device=torch.device("cpu"), channels_last=False, backend="torch")
    assert calls == [1, 3]  # one warm-up step, then the profiled steps
    assert out["steps"] == 3 and out["basis"] == "cpu time" and out["step_ms"] > 0
    assert sum(out["fractions"].values()) == pytest.approx(1.0)
    assert all(out["fractions"][k] > 0 for k in ("augmentation", "teacher_forward", "bn_statistics", "backward",
                                                  "optimizer"))
    assert out["top_ops"] and all(op["self_ms"] >= 0 for op in out["top_ops"])
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # labels removed


def test_step_labels_do_not_change_the_images():
    """synthesize_batch under torch.profiler (labels on) gives the images it gives without (labels off)."""
    from torch.profiler import ProfilerActivity, profile

    from engine.models import ModelConfig, build_model
    from engine.recover.settings import StepAugment
    from engine.recover.synthesize import STEP_RANGE, Objective, synthesize_batch
    from kernels import fused_bn_matching

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="convnet", width=8, depth=2), 10, 1, 8).eval().requires_grad_(False)
    aug = StepAugment(image_size=8, crop_scale=(0.5, 1.0), flip=True, jitter=1)
    init, labels = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.arange(4)
    bounds = (torch.full((1, 1, 1, 1), -2.5), torch.full((1, 1, 1, 1), 2.5))
    objective = Objective(r_bn=0.01, first_bn_multiplier=10.0, iterations=3, lr=0.1)

    def images():
        with fused_bn_matching(model, backend="torch") as modules:
            return synthesize_batch(model, modules, init, labels, objective, aug, bounds,
                                    torch.Generator().manual_seed(0)).images

    plain = images()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        profiled = images()
    assert torch.equal(plain, profiled)
    assert sum(e.name == STEP_RANGE for e in prof.events()) == 3


class _Span:
    def __init__(self, start, end):
        self.start, self.end = start, end

    def elapsed_us(self):
        return self.end - self.start


class _Event:
    def __init__(self, name, start, end, thread=1, device="cpu", kernels=(), annotation=False):
        from torch.autograd import DeviceType

        self.name, self.thread, self.time_range = name, thread, _Span(start, end)
        self.device_type = DeviceType.CPU if device == "cpu" else DeviceType.CUDA
        self.kernels = [type("Kernel", (), {"name": k, "duration": d})() for k, d in kernels]
        self.is_user_annotation = annotation
        self.self_cpu_time_total = end - start


def _profile(cuda: bool):
    """One fake step: ranges on thread 1; backward ops launched from autograd's thread 2 on CUDA."""
    ranges = [("recover/step", 0, 100), ("recover/augment", 1, 11), ("recover/teacher_forward", 11, 41),
              ("recover/bn_statistics", 20, 30), ("recover/bn_loss", 42, 45), ("recover/backward", 45, 85),
              ("recover/optimizer", 85, 95)]
    # on CUDA each range has a GPU-side copy, linked to the CPU range like a kernel (not device work)
    events = [_Event(n, a, b, annotation=True, kernels=[(n, b - a + 5.0)] if cuda else []) for n, a, b in ranges]
    events += [_Event(n, a + 1000, b + 1000, device="cuda", annotation=True) for n, a, b in ranges]
    if cuda:
        events += [_Event("Optimizer.step#Adam.step", 85.5, 94, annotation=True,
                          kernels=[("Optimizer.step#Adam.step", 7.0)]),
                   _Event("Optimizer.step#Adam.step", 1085.5, 1094, device="cuda", annotation=True)]
        events += [_Event("aten::flip", 2, 3, kernels=[("flip_k", 4.0)]),
                   _Event("aten::conv", 12, 13, kernels=[("conv_k", 10.0)]),
                   _Event("bn_kernel", 20, 30, kernels=[("bn_k", 6.0)]),  # launched by the range itself
                   _Event("aten::conv_bwd", 50, 51, thread=2, kernels=[("conv_bwd_k", 20.0)]),
                   _Event("aten::ce", 41.5, 41.6, kernels=[("ce_k", 1.0)]),
                   _Event("aten::adam", 86, 87, kernels=[("adam_k", 3.0), ("clamp_k", 1.0)]),
                   _Event("aten::setup", 200, 201, kernels=[("outside_k", 50.0)]),  # not in a step
                   _Event("conv_k", 1012, 1022, device="cuda")]
    return events


def test_phase_times_cpu_uses_each_range_own_wall_time():
    from engine.bench.measure import phase_times

    out = phase_times(_profile(cuda=False), on_device=False)
    assert out["basis"] == "cpu time" and out["step_us"] == pytest.approx(100)
    assert out["fractions"] == pytest.approx({"augmentation": 0.10, "teacher_forward": 0.20, "bn_statistics": 0.13,
                                              "backward": 0.40, "optimizer": 0.10, "other": 0.07})


def test_phase_times_cuda_counts_kernel_time_by_launch_time_across_threads():
    from engine.bench.measure import phase_times

    out = phase_times(_profile(cuda=True), on_device=True)
    assert out["basis"] == "cuda kernel time" and out["step_us"] == pytest.approx(45.0)
    assert out["wall_step_us"] == pytest.approx(100)
    assert out["fractions"] == pytest.approx({"augmentation": 4 / 45, "teacher_forward": 10 / 45,
                                              "bn_statistics": 6 / 45, "backward": 20 / 45, "optimizer": 4 / 45,
                                              "other": 1 / 45})
    assert out["top_ops"][0] == {"op": "conv_bwd_k", "self_ms": 0.02, "calls": 1}
    # no kernel time recorded (no CUPTI): the CPU times, never an all-zero breakdown
    assert phase_times(_profile(cuda=False), on_device=True)["basis"] == "cpu time"
