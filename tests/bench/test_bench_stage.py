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


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: a second OpenMP thread only adds barrier waits on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    assert saved["peer_comparison"]["speedup"] > 0
    fractions = saved["breakdown"]["fractions"]
    assert set(fractions) == {"augmentation", "teacher_forward", "bn_statistics", "backward", "optimizer", "other"}
    assert all(v >= 0 for v in fractions.values())
    assert sum(fractions.values()) == pytest.approx(1.0, abs=1e-6)
    assert fractions["teacher_forward"] > 0 and fractions["backward"] > 0 and fractions["bn_statistics"] > 0
    trace = json.loads((tmp_path / "recover_trace.json").read_text())
    assert any(e.get("name") == "bench/bn_statistics" for e in trace["traceEvents"])
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
                                 {"repeats": 0}, {"gpus": "eight"}, {"no_such_key": 1}])
def test_bad_bench_values_raise_config_error(bad):
    with pytest.raises(ConfigError):
        from_mapping(BenchConfig, bad, "bench")


def test_bad_bench_value_fails_through_the_cli(run_scdd, tmp_path):
    with pytest.raises(ConfigError, match="bench.gpus"):
        run_scdd(*TINY, "bench.gpus=0", run_dir=tmp_path)
