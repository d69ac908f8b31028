"""SSL pretraining under DeepSpeed ZeRO-1 with 2 processes (launchers/deepspeed.sh), its teacher into recover, bad
configs (DeepSpeed JSONs, ZeRO stages, DeepSpeed's own bf16/fp16 modes)."""
import json

import pytest
import torch

from engine.artifacts.distilled import DistilledSet
from engine.artifacts.teacher import read_teacher
from engine.errors import ConfigError
from teachers import MODEL_OVERRIDES

SQUEEZE = ("data=digits", *MODEL_OVERRIDES, "stage=squeeze", "progress=false", "squeeze.teachers=[ssl]",
           "squeeze.epochs=1", "ssl.batch_size=64", "ssl.queue_size=256", "squeeze.probe.epochs=2",
           "squeeze.workers=0")


def test_zero1_two_processes_write_a_plain_teacher_that_recover_loads(launcher, run_scdd, tmp_path):
    """launchers/README.md: `NPROC=2 DS_CONFIG=zero1 launchers/deepspeed.sh stage=squeeze data=digits`."""
    ext = tmp_path / "torch_extensions"  # replaces the shared cache: must stay empty
    run_dir = tmp_path / "run"
    result = launcher("deepspeed.sh", *SQUEEZE, run_dir=run_dir,
                      env={"NPROC": "2", "DS_CONFIG": "zero1", "TORCH_EXTENSIONS_DIR": str(ext)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "untested optimizer" in result.stdout + result.stderr  # DeepSpeed's ZeRO wrapped torch SGD
    folder = run_dir / "squeeze" / "ssl"
    payload = read_teacher(folder / "teacher.pt")
    metrics = payload["metrics"]
    assert payload["kind"] == "ssl" and metrics["finished"]
    assert (metrics["trainer"], metrics["world_size"], metrics["zero_stage"]) == ("deepspeed", 2, 1)
    assert 0.3 < payload["metrics"]["probe_top1"] <= 1.0
    rows = json.loads((folder / "metrics.json").read_text())["pretrain"]
    # 1497 training images / global batch 64 = 23 steps; the row covers both ranks' images
    assert len(rows) == 1 and rows[0]["loss"] > 0
    assert sorted(p.name for p in folder.iterdir()) == ["bn_stats.json", "metrics.csv", "metrics.json",
                                                       "teacher.pt"]  # per-rank states removed
    assert all(torch.isfinite(v).all() for v in payload["state_dict"].values() if v.is_floating_point())
    assert not ext.exists()  # no DeepSpeed C++ op was compiled (gloo collectives, torch SGD)

    recovered = run_scdd("data=digits", *MODEL_OVERRIDES, "stage=recover", "progress=false",
                         "recover.iterations=3", "recover.classes_per_batch=10", "ipc=[1]",
                         f"teacher={folder / 'teacher.pt'}", run_dir=tmp_path / "recover")
    distilled = DistilledSet.open(recovered["sets"]["ssl-noise"]["path"])
    assert distilled.index["teacher_kind"] == "ssl" and distilled.tensors()["images"].shape == (10, 1, 8, 8)


@pytest.mark.parametrize("content, message", [
    ('{"zero_optimization": {"stage": 1,}', "is not valid JSON"),
    ('{"zero_optimization": {"stage": 5}}', "zero_optimization.stage=5 is not supported"),
    ('{"optimizer": {"type": "Adam"}}', "remove them"),
    ('{"bf16": {"enabled": true}}', "enables DeepSpeed's bf16 mode, which casts the whole module"),
    ('{"fp16": {"enabled": true}}', "enables DeepSpeed's fp16 mode"),
])
def test_bad_deepspeed_json_is_one_config_error(run_scdd, tmp_path, content, message):
    path = tmp_path / "ds.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        run_scdd(*SQUEEZE, "trainer=deepspeed", f"deepspeed.path={path}")
    assert not (tmp_path / "run" / "squeeze").exists()


def test_unknown_zero_stage_and_missing_json_are_refused(run_scdd):
    with pytest.raises(ConfigError, match="deepspeed.zero_stage=3 is not supported"):
        run_scdd(*SQUEEZE, "trainer=deepspeed", "deepspeed.zero_stage=3")
    with pytest.raises(ConfigError, match="deepspeed.path=.*does not exist"):
        run_scdd(*SQUEEZE, "trainer=deepspeed", "deepspeed.path=/nonexistent/ds.json")


def test_bf16_is_autocast_around_an_fp32_module(run_scdd):
    from engine.training.precision import cpu_has_native_bf16
    from engine.training.trainers import DeepSpeedSettings, deepspeed_config

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # auto (ssl.precision's default) autocasts on a CPU with native bf16 only
    for settings, device, on in ((DeepSpeedSettings(), cpu, cpu_has_native_bf16()), (DeepSpeedSettings(), cuda, True),
                                 (DeepSpeedSettings(bf16=True), cpu, True), (DeepSpeedSettings(bf16=False), cuda, False)):
        config = deepspeed_config(settings, 8, 2, device)
        assert config["torch_autocast"] == {"enabled": on, "dtype": "bfloat16"}
        assert not config["bf16"]["enabled"] and not config["fp16"]["enabled"]  # DeepSpeed never casts the module
    with pytest.raises(ConfigError, match="deepspeed.extra enables DeepSpeed's bf16 mode"):
        run_scdd(*SQUEEZE, "trainer=deepspeed", "+deepspeed.extra.bf16={enabled: true}")
