"""Every paper preset composes and parses into the typed configs of every stage."""
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from engine.config import from_mapping
from engine.data import DataConfig
from engine.evaluate.settings import EvaluateConfig
from engine.models import ModelConfig
from engine.recover.settings import RecoverConfig
from engine.squeeze.stage import parse_config

PRESETS = sorted(p.stem for p in (Path(__file__).parent.parent / "configs" / "experiment").glob("*.yaml"))


def test_presets_exist_for_each_paper_setting():
    assert {"cifar100_ipc50", "tinyimagenet_ipc50", "imagenet1k_ipc50", "imagenet1k_ipc10"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_into_typed_configs(compose, preset):
    cfg = OmegaConf.to_container(compose(f"+experiment={preset}", "data.root=/data"), resolve=True)
    data = from_mapping(DataConfig, cfg["data"], "data")
    model = from_mapping(ModelConfig, cfg["model"], "model")
    recover = from_mapping(RecoverConfig, cfg["recover"], "recover")
    evaluate = from_mapping(EvaluateConfig, cfg["evaluate"], "evaluate")
    squeeze, ssl = parse_config(cfg["squeeze"], cfg["ssl"])
    ipc = int(preset.rsplit("ipc", 1)[1])
    assert cfg["ipc"] == [ipc]
    assert recover.iterations == 1000 and recover.first_bn_multiplier == 10.0
    assert recover.classes_per_batch == 50
    if preset.startswith("imagenet1k"):
        assert (data.name, data.image_size, model.name) == ("imagefolder", 224, "resnet18")
        assert recover.r_bn == 0.01 and evaluate.temperature == 20 and recover.jitter == 32
    if preset.startswith("cifar100"):
        assert (data.name, model.name) == ("cifar100", "resnet18_cifar")
        assert recover.r_bn == 0.005 and evaluate.temperature == 30 and recover.jitter == 4
    assert squeeze.probe.lr == 30.0 and squeeze.probe.epochs == 100
    assert evaluate.epochs == 300
