"""Every paper preset composes and parses into the typed configs of every stage (every value of each:
tests/test_official_recipes.py)."""
import re
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
    ipc = int(re.search(r"ipc(\d+)", preset).group(1))
    assert cfg["ipc"] == [ipc]
    assert recover.iterations == 1000 and recover.first_bn_multiplier == 10.0
    # SC-DD's ImageNet script batches 50 classes; its CIFAR-100 and SRe2L's Tiny-ImageNet script 100
    assert recover.classes_per_batch == (50 if preset.startswith("imagenet1k") else 100)
    if preset.startswith("imagenet1k"):
        arch = "resnet50" if preset.endswith("_r50") else "resnet18"
        assert (data.name, data.image_size, model.name) == ("imagefolder", 224, arch)
        assert recover.r_bn == 0.01 and evaluate.temperature == 20 and recover.jitter == 32
    if preset.startswith("cifar100"):
        assert (data.name, model.name) == ("cifar100", "resnet18_cifar")
        assert recover.r_bn == 0.005 and evaluate.temperature == 30 and recover.jitter == 4
    assert squeeze.probe.lr == 30.0 and squeeze.probe.epochs == 100
    # SC-DD's table: 300 student epochs on ImageNet-1K, 500 on Tiny-ImageNet, 200 on CIFAR-100
    assert evaluate.epochs == {"imagenet1k": 300, "tinyimagenet": 500, "cifar100": 200}[preset.split("_")[0]]
