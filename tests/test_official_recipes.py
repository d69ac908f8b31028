"""The paper presets hold SC-DD's official per-dataset recipes: one table, every value of every preset.

Rows are dotted config keys, columns the presets (configs/experiment/). Values come from SC-DD's public
scripts (SCDD/ folder of github.com/VILA-Lab/SRe2L), its hyper-parameter table where no script exists
(Tiny-ImageNet), and ../shared/docs/method.md; each preset's comments say where they disagree. The
test composes each preset through Hydra, as `scdd +experiment=NAME` does, and compares every row; a
key a preset sets that the table does not list fails too, so the table stays complete.
"""
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from engine.config import from_mapping
from engine.evaluate.settings import EvaluateConfig
from engine.recover.settings import RecoverConfig
from engine.squeeze.stage import parse_config

EXPERIMENTS = Path(__file__).resolve().parent.parent / "configs" / "experiment"

COLUMNS = ("imagenet1k_ipc10", "imagenet1k_ipc50", "imagenet1k_ipc100", "imagenet1k_ipc200",
           "imagenet1k_ipc10_r50", "imagenet1k_ipc50_r50", "tinyimagenet_ipc10", "tinyimagenet_ipc50",
           "cifar100_ipc50")


def every(value):
    return (value,) * len(COLUMNS)


def per_dataset(imagenet, tiny, cifar, imagenet_r50=None):
    """ImageNet-1K ResNet-18 (4 presets), its ResNet-50 variants (2; default: the same), Tiny (2), CIFAR (1)."""
    r50 = imagenet if imagenet_r50 is None else imagenet_r50
    return (imagenet,) * 4 + (r50,) * 2 + (tiny,) * 2 + (cifar,)


IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

TABLE: dict[str, tuple] = {
    # run
    "ipc": ([10], [50], [100], [200], [10], [50], [10], [50], [50]),
    # data and model
    "data.name": per_dataset("imagefolder", "imagefolder", "cifar100"),
    "data.image_size": per_dataset(224, 64, 32),
    "data.channels": per_dataset(3, 3, None),
    "data.mean": per_dataset(IMAGENET_MEAN, IMAGENET_MEAN, None),
    "data.std": per_dataset(IMAGENET_STD, IMAGENET_STD, None),
    "model.name": per_dataset("resnet18", "resnet18_cifar", "resnet18_cifar", imagenet_r50="resnet50"),
    # squeeze: teachers, the linear probe (MoCo's lincls on augmented views)
    "squeeze.teachers": every(["ssl", "supervised"]),
    "squeeze.workers": every(8),
    "squeeze.probe.views": every("augmented"),
    "squeeze.probe.epochs": every(100),
    "squeeze.probe.batch_size": every(256),
    "squeeze.probe.lr": every(30.0),
    "squeeze.probe.momentum": every(0.9),
    "squeeze.probe.weight_decay": every(0.0),
    "squeeze.probe.standardize": every(False),
    "squeeze.probe.schedule": every("step"),
    "squeeze.probe.milestones": every([0.6, 0.8]),
    # squeeze: the supervised (relabel) teacher
    "squeeze.supervised.init_from": per_dataset("torchvision:resnet18", None, None,
                                                imagenet_r50="torchvision:resnet50"),
    "squeeze.supervised.epochs": per_dataset(90, 50, 200),
    "squeeze.supervised.batch_size": per_dataset(256, 256, 128),
    "squeeze.supervised.lr": per_dataset(0.1, 0.2, 0.1),
    "squeeze.supervised.momentum": every(0.9),
    "squeeze.supervised.weight_decay": per_dataset(1e-4, 1e-4, 5e-4),
    "squeeze.supervised.warmup_epochs": per_dataset(0, 5, 0),
    "squeeze.supervised.augment": every("weak"),
    # squeeze: MoCo v2
    "ssl.name": every("mocov2"),
    "ssl.epochs": every(200),
    "ssl.batch_size": every(256),
    "ssl.lr": per_dataset(0.03, 0.06, 0.06),
    "ssl.momentum": every(0.9),
    "ssl.weight_decay": every(1e-4),
    "ssl.warmup_epochs": every(0),
    "ssl.augment": every("strong"),
    "ssl.temperature": every(0.2),
    "ssl.proj_hidden_dim": every(None),
    "ssl.proj_dim": every(128),
    "ssl.queue_size": per_dataset(65536, 65536, 4096),
    "ssl.key_momentum": every(0.999),
    "ssl.shuffle_groups": every(8),
    # recover
    "recover.iterations": every(1000),
    "recover.lr": per_dataset(0.25, 0.6, 0.4, imagenet_r50=0.1),
    "recover.r_bn": per_dataset(0.01, 0.01, 0.005),
    "recover.first_bn_multiplier": every(10.0),
    "recover.classes_per_batch": per_dataset(50, 100, 100),
    "recover.ipc_per_batch": every(1),
    "recover.init": every("noise"),
    "recover.crop": per_dataset(True, True, False),
    "recover.crop_scale": per_dataset([0.08, 1.0], [0.08, 1.0], None),
    "recover.flip": per_dataset(True, True, False),
    "recover.jitter": per_dataset(32, 4, 4),
    "recover.jitter_mode": per_dataset("forward", "symmetric", "forward"),
    # relabel + evaluate
    "evaluate.epochs": per_dataset(300, 500, 200),
    "evaluate.batch_size": per_dataset(64, 256, 64),
    "evaluate.optimizer": per_dataset("adamw", "sgd", "adamw"),
    "evaluate.lr": per_dataset(0.001, 0.2, 0.001),
    "evaluate.momentum": every(0.9),
    "evaluate.weight_decay": per_dataset(0.01, 1e-4, 0.01),
    "evaluate.decay_norm_and_bias": per_dataset(False, True, True),
    "evaluate.warmup_epochs": per_dataset(0, 5, 0),
    "evaluate.lr_floor": per_dataset(0.0, 0.0, 0.75),
    "evaluate.lr_per": every("epoch"),
    "evaluate.loss": every("kl"),
    "evaluate.relabel": every("online"),
    "evaluate.temperature": per_dataset(20, 20, 30),
    "evaluate.temperature_squared": per_dataset(False, True, False),
    "evaluate.mix": per_dataset("cutmix", "none", "mixup"),
    "evaluate.cutmix_prob": every(1.0),
    "evaluate.cutmix_alpha": every(1.0),
    "evaluate.mixup_alpha": every(0.8),
    "evaluate.crop": per_dataset("rrc", "rrc", "pad"),
    "evaluate.crop_padding": every(4),
    "evaluate.crop_scale": per_dataset([0.08, 1.0], [0.08, 1.0], None),
    "evaluate.flip": every(True),
    "evaluate.eval_every": every(10),
    "evaluate.label_teacher": every("supervised"),
    "evaluate.student": per_dataset(None, None, None, imagenet_r50="resnet18"),
    "evaluate.full_data": every(False),
    "evaluate.workers": every(8),
}

NOT_TABLED = {"defaults"}
"""Keys of a preset file that are not values (the defaults list picks data= and model=: data.name, model.name)."""


def lookup(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def flat_keys(node: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        keys |= flat_keys(value, dotted + ".") if isinstance(value, dict) else {dotted}
    return keys


def test_table_has_one_column_per_preset_and_one_value_per_column():
    assert sorted(COLUMNS) == sorted(p.stem for p in EXPERIMENTS.glob("*.yaml"))
    assert {key for key, row in TABLE.items() if len(row) != len(COLUMNS)} == set()


@pytest.mark.parametrize("preset", COLUMNS)
def test_preset_composes_to_exactly_the_tabled_values(compose, preset):
    cfg = OmegaConf.to_container(compose(f"+experiment={preset}", "data.root=/data"), resolve=True)
    column = COLUMNS.index(preset)
    wrong = {key: (lookup(cfg, key), row[column]) for key, row in TABLE.items()
             if lookup(cfg, key) != row[column] or type(lookup(cfg, key)) is not type(row[column])}
    assert wrong == {}, f"{preset}: key -> (composed, table)"
    written = flat_keys({k: v for k, v in yaml.safe_load((EXPERIMENTS / f"{preset}.yaml").read_text()).items()
                         if k not in NOT_TABLED})
    assert written - set(TABLE) == set(), f"{preset} sets keys the table does not list"
    # and each stage accepts its section
    squeeze, ssl = parse_config(cfg["squeeze"], cfg["ssl"])
    recover = from_mapping(RecoverConfig, cfg["recover"], "recover")
    evaluate = from_mapping(EvaluateConfig, cfg["evaluate"], "evaluate")
    assert (squeeze.probe.views, ssl.proj_hidden_dim) == ("augmented", None)
    assert (recover.crop, evaluate.mix) == (TABLE["recover.crop"][column], TABLE["evaluate.mix"][column])
