"""Squeeze options of the official recipes: MoCo's head width from the backbone, the queue against the
training split, and the linear probe on augmented views of the training images."""
import dataclasses
import json

import pytest
import torch

from engine.errors import ConfigError
from engine.models import bn_layers
from engine.squeeze.augment import probe_image_spec
from engine.squeeze.probe import linear_probe
from engine.squeeze.ssl import MoCo, MoCoSettings, check_queue, fit_to_data
from teachers import MODEL_OVERRIDES, digits_backbone

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ("data=digits", "device=cpu", "stage=squeeze", "progress=false", *MODEL_OVERRIDES, "ssl.batch_size=128",
        "squeeze.teachers=[ssl]", "squeeze.epochs=1")


def test_moco_head_hidden_width_is_the_backbones_when_null():
    bundle, model = digits_backbone()
    moco = MoCo(model, fit_to_data(MoCoSettings(proj_hidden_dim=None), len(bundle.train)), torch.Generator())
    assert moco.head[0].out_features == model.feature_dim == moco.head[2].in_features
    assert MoCo(model, MoCoSettings(), torch.Generator()).head[0].out_features == 512


def test_queue_default_stays_below_the_training_split():
    assert fit_to_data(MoCoSettings(), 4000).queue_size == 2048  # MNIST-5k's 4,000 training images
    assert fit_to_data(MoCoSettings(), 50000).queue_size == 4096
    assert fit_to_data(MoCoSettings(queue_size=300), 4000).queue_size == 300
    check_queue(MoCoSettings(queue_size=3999), 4000)
    with pytest.raises(ConfigError, match="ssl.queue_size=4000 must be below the 4000 training images") as info:
        check_queue(MoCoSettings(queue_size=4000), 4000)
    assert "\n" not in str(info.value)


def test_queue_larger_than_the_split_fails_before_training(run_scdd, tmp_path):
    with pytest.raises(ConfigError, match=r"ssl.queue_size=2000 must be below the 1497 training images"):
        run_scdd(*TINY, "ssl.queue_size=2000", run_dir=tmp_path / "bad")
    assert not (tmp_path / "bad" / "squeeze").exists()


def test_augmented_probe_trains_and_leaves_backbone_and_bn_buffers_unchanged():
    bundle, model = digits_backbone()
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    assert any("running_mean" in k for k in before)
    fc_before = model.fc.weight.detach().clone()
    # 8 px digits: milder crops than the presets' 0.08-1 leave a random backbone's features something to fit
    spec = dataclasses.replace(probe_image_spec(bundle.image_size, flip=False), crop_scale=(0.5, 1.0))
    rows, final = linear_probe(model, bundle.train, bundle.test, bundle.normalize, epochs=5, batch_size=128,
                               lr=3.0, momentum=0.9, weight_decay=0.0, schedule="step", milestones=(0.6, 0.8),
                               standardize=False, device=torch.device("cpu"),
                               generator=torch.Generator().manual_seed(0), progress=False, views="augmented",
                               augment=spec)
    after = model.backbone.state_dict()
    assert all(torch.equal(value, after[key]) for key, value in before.items())
    assert all(not bn.training for bn in bn_layers(model))
    assert not torch.equal(model.fc.weight, fc_before)
    # a random backbone: well above chance (0.1), not a good probe
    assert rows[-1]["loss"] < rows[0]["loss"] and final["probe_top1"] > 0.25 and final["probe_views"] == "augmented"


def test_augmented_probe_sees_new_views_every_epoch():
    """Two probes that differ only in the views' crop range end with different classifiers."""
    bundle, _ = digits_backbone()
    weights = []
    for scale in ((0.08, 1.0), (1.0, 1.0)):
        _, model = digits_backbone()
        spec = dataclasses.replace(probe_image_spec(bundle.image_size, flip=False), crop_scale=scale)
        linear_probe(model, bundle.train, bundle.test, bundle.normalize, epochs=1, batch_size=256, lr=1.0,
                     momentum=0.9, weight_decay=0.0, schedule="step", milestones=(), standardize=False,
                     device=torch.device("cpu"), generator=torch.Generator().manual_seed(0), progress=False,
                     views="augmented", augment=spec)
        weights.append(model.fc.weight.detach().clone())
    assert not torch.allclose(weights[0], weights[1])


def test_probe_views_config_errors_are_one_line(run_scdd, tmp_path):
    for override, message in (("squeeze.probe.views=pixels", "squeeze.probe.views='pixels'"),
                              ("squeeze.probe.views=augmented", "needs squeeze.probe.standardize=false")):
        with pytest.raises(ConfigError, match=message) as info:
            run_scdd(*TINY, override, run_dir=tmp_path / "bad")
        assert "\n" not in str(info.value)


def test_squeeze_stage_probes_on_augmented_views(run_scdd, tmp_path):
    result = run_scdd(*TINY, "squeeze.probe.views=augmented", "squeeze.probe.standardize=false",
                      "squeeze.probe.epochs=2", "squeeze.probe.lr=3.0", run_dir=tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "squeeze" / "ssl" / "metrics.json").read_text())
    assert metrics["final"]["probe_views"] == "augmented" and len(metrics["probe"]) == 2
    assert metrics["final"]["settings"]["queue_size"] == 1024  # null: fitted below digits' 1,497 images
    assert result["teachers"]["ssl"]["probe_top1"] > 0.1
