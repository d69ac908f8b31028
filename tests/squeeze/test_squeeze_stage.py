"""`stage=squeeze` end to end on digits: outputs, accuracy, resume, probe-only, checkpoint checks, config errors."""
import json
from pathlib import Path

import pytest
import torch

from engine.artifacts.teacher import load_teacher, read_teacher
from engine.data import DataConfig, build_data
from engine.errors import ConfigError
from engine.models import ModelConfig
from teachers import assert_same_teacher

TINY = ("data=digits", "device=cpu", "stage=squeeze", "progress=false", "model.width=32", "ssl.batch_size=128",
        "squeeze.supervised.batch_size=128", "squeeze.probe.epochs=30")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run with both teachers, shared by the tests that only read its outputs."""
    from hydra import compose, initialize_config_dir

    from engine.cli import execute

    run_dir = tmp_path_factory.mktemp("squeeze") / "run"
    configs = Path(__file__).resolve().parents[2] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base=None):
        cfg = compose(config_name="config", overrides=[*TINY, "ssl.epochs=4", "squeeze.supervised.epochs=4"])
    return run_dir, execute(cfg, run_dir)


def test_both_teachers_written_and_beat_chance(trained):
    run_dir, result = trained
    ssl, sup = result["teachers"]["ssl"], result["teachers"]["supervised"]
    assert ssl["path"] == str(run_dir / "squeeze" / "ssl" / "teacher.pt")
    assert sup["path"] == str(run_dir / "squeeze" / "supervised" / "teacher.pt")
    assert ssl["probe_top1"] > 0.5 and sup["top1"] > 0.5  # chance is 0.1
    assert ssl["seconds"] > 0 and ssl["images_per_s"] > 0 and sup["seconds"] > 0
    assert read_teacher(ssl["path"])["kind"] == "ssl" and read_teacher(sup["path"])["kind"] == "supervised"
    for kind in ("ssl", "supervised"):
        folder = run_dir / "squeeze" / kind
        metrics = json.loads((folder / "metrics.json").read_text())
        assert len(metrics["pretrain"]) == 4 and metrics["final"]["finished"]
        assert (folder / "metrics.csv").read_text().startswith("phase,epoch,loss,lr")
        bn = json.loads((folder / "bn_stats.json").read_text())["layers"]
        assert len(bn) == 3 and all(row["var_mean"] > 0 for row in bn)
        assert not (folder / "state.pt").exists()
    assert len(json.loads((run_dir / "squeeze" / "ssl" / "metrics.json").read_text())["probe"]) == 30
    assert (run_dir / "squeeze" / "bn_variance.png").stat().st_size > 1000


def test_resume_skips_finished_teachers(trained, run_scdd):
    run_dir, first = trained
    again = run_scdd(*TINY, "ssl.epochs=4", "squeeze.supervised.epochs=4", "resume=true", run_dir=run_dir)
    for kind in ("ssl", "supervised"):
        assert again["teachers"][kind]["skipped"]
        assert again["teachers"][kind]["path"] == first["teachers"][kind]["path"]


def test_probe_only_keeps_bn_statistics(trained, run_scdd, tmp_path):
    run_dir, _ = trained
    source = run_dir / "squeeze" / "ssl" / "teacher.pt"
    before = read_teacher(source)["state_dict"]
    result = run_scdd(*TINY, "squeeze.probe_only=true", f"teacher={source}", run_dir=tmp_path / "probe")
    entry = result["teachers"]["ssl"]
    assert entry["probe_top1"] > 0.5
    after = read_teacher(entry["path"])["state_dict"]
    for key in before:
        if key.startswith("backbone."):
            assert torch.equal(before[key], after[key]), key


def test_checkpoint_refuses_other_model_or_data(trained):
    run_dir, _ = trained
    path = run_dir / "squeeze" / "supervised" / "teacher.pt"
    digits = build_data(DataConfig(name="digits"))
    model, _ = load_teacher(path, ModelConfig(name="convnet", width=32, depth=3), digits)
    with pytest.raises(ConfigError, match="model="):
        load_teacher(path, ModelConfig(name="convnet", width=64, depth=3), digits)
    with pytest.raises(ConfigError, match="image_size"):
        load_teacher(path, ModelConfig(name="convnet", width=32, depth=3),
                     build_data(DataConfig(name="digits", image_size=16)))


def test_probe_only_with_mismatched_model_fails(trained, run_scdd, tmp_path):
    run_dir, _ = trained
    source = run_dir / "squeeze" / "ssl" / "teacher.pt"
    args = [a for a in TINY if not a.startswith("model.width")]
    with pytest.raises(ConfigError, match="model="):
        run_scdd(*args, "model.width=16", "squeeze.probe_only=true", f"teacher={source}", run_dir=tmp_path / "x")


@pytest.mark.parametrize("method", ["mocov2", "supervised"])
def test_interrupted_run_resumes_to_identical_weights(run_scdd, tmp_path, method):
    kind = "supervised" if method == "supervised" else "ssl"
    args = [*TINY, f"squeeze.teachers=[{kind}]", "squeeze.epochs=3", "squeeze.probe.epochs=5"]
    if method == "mocov2":
        args.append("ssl.queue_size=300")  # smaller than an epoch: the queue wraps around
    whole = run_scdd(*args, run_dir=tmp_path / "whole")
    cut = run_scdd(*args, "squeeze.stop_after_epochs=1", run_dir=tmp_path / "cut")
    assert cut["interrupted"] == kind
    assert (tmp_path / "cut" / "squeeze" / kind / "state.pt").is_file()
    assert not (tmp_path / "cut" / "squeeze" / kind / "teacher.pt").exists()
    resumed = run_scdd(*args, "resume=true", run_dir=tmp_path / "cut")
    a, b = assert_same_teacher(whole["teachers"][kind]["path"], resumed["teachers"][kind]["path"])
    metric = "probe_top1" if kind == "ssl" else "top1"
    assert a["metrics"][metric] == b["metrics"][metric]
    losses = [row["loss"] for row in json.loads((tmp_path / "cut" / "squeeze" / kind / "metrics.json").read_text())["pretrain"]]
    assert losses == [row["loss"] for row in json.loads((tmp_path / "whole" / "squeeze" / kind / "metrics.json").read_text())["pretrain"]]


def test_simclr_runs(run_scdd, tmp_path):
    result = run_scdd(*TINY, "ssl=simclr", "squeeze.teachers=[ssl]", "squeeze.epochs=1", "squeeze.probe.epochs=5")
    assert result["teachers"]["ssl"]["method"] == "simclr" and result["teachers"]["ssl"]["probe_top1"] > 0.2


@pytest.mark.parametrize("override,message", [
    ("ssl.name=nope", "unknown ssl method 'nope'"),
    ("squeeze.epochs=-1", "squeeze.epochs=-1"),
    ("ssl.epochs=-2", "ssl.epochs=-2"),
    ("squeeze.supervised.epochs=0", "squeeze.supervised.epochs=0"),
    ("squeeze.teachers=[ssl,teacherx]", "squeeze.teachers"),
    ("ssl=supervised", "not self-supervised"),
    ("ssl.temperature=0", "ssl.temperature"),
    ("squeeze.probe.schedule=linear", "squeeze.probe.schedule"),
    ("+squeeze.epochz=3", "unknown key"),
])
def test_bad_config_fails_before_training(run_scdd, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        run_scdd(*TINY, override, run_dir=tmp_path / "bad")
    assert not (tmp_path / "bad" / "squeeze").exists()
