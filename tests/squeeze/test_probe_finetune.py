"""squeeze.probe.mode: linear leaves the backbone and its BN statistics bit-identical; finetune moves both."""
import pytest
import torch

from engine.artifacts.teacher import load_teacher
from engine.data import DataConfig, build_data
from engine.errors import ConfigError
from engine.models import ModelConfig
from engine.squeeze.augment import probe_image_spec
from engine.squeeze.probe import evaluate_top1, linear_probe
from teachers import digits_backbone

pytestmark = pytest.mark.usefixtures("one_thread")


def _probe(bundle, model, mode):
    return linear_probe(model, bundle.train, bundle.test, bundle.normalize, epochs=10, batch_size=128, lr=1.0,
                        momentum=0.9, weight_decay=0.0, schedule="cosine", milestones=(), standardize=False,
                        device=torch.device("cpu"), generator=torch.Generator().manual_seed(0), progress=False,
                        views="augmented", augment=probe_image_spec(bundle.image_size, flip=False), mode=mode,
                        backbone_lr_scale=0.1)


@pytest.mark.parametrize("mode", ["linear", "finetune"])
def test_mode_decides_whether_backbone_and_bn_statistics_move(mode):
    bundle, model = digits_backbone()
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    flags = [q.requires_grad for q in model.parameters()]
    rows, final = _probe(bundle, model, mode)
    after = model.backbone.state_dict()
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    weights = [k for k, _ in model.backbone.named_parameters()]
    assert stats and weights
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    if mode == "linear":
        assert not changed
    else:
        assert set(stats) <= changed and set(weights) <= changed
    assert not model.training and [q.requires_grad for q in model.parameters()] == flags
    assert final["probe_mode"] == mode and len(rows) == 10
    assert 0.0 <= final["probe_top1"] <= 1.0 and final["probe_top1"] > 0.2  # 10 classes: chance is 0.1


def test_finetune_with_fixed_features_is_refused_in_the_library():
    bundle, model = digits_backbone()
    with pytest.raises(ValueError, match="finetune needs views=augmented"):
        linear_probe(model, bundle.train, bundle.test, bundle.normalize, epochs=1, batch_size=128, lr=0.5,
                     momentum=0.9, weight_decay=0.0, schedule="cosine", milestones=(), standardize=True,
                     device=torch.device("cpu"), generator=torch.Generator().manual_seed(0), progress=False,
                     mode="finetune")


@pytest.mark.parametrize("overrides,message", [
    (("squeeze.probe.mode=full",), "squeeze.probe.mode='full' is not one of linear|finetune"),
    (("squeeze.probe.mode=finetune",), "squeeze.probe.mode=finetune .* set squeeze.probe.views=augmented"),
    (("squeeze.probe.mode=finetune", "squeeze.probe.views=augmented", "squeeze.probe.standardize=false",
      "squeeze.probe.backbone_lr_scale=-1"), "squeeze.probe.backbone_lr_scale=-1"),
])
def test_bad_probe_mode_is_one_config_error_before_training(run_scdd, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        run_scdd("data=digits", "device=cpu", "stage=squeeze", "progress=false", *overrides,
                 run_dir=tmp_path / "bad")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "bad" / "squeeze").exists()


def test_finetuned_teacher_is_written_with_its_mode(run_scdd, tmp_path):
    """The teacher file is the fine-tuned model: its fc reproduces the probe top-1, and metrics and
    fingerprint record the mode."""
    result = run_scdd("data=digits", "device=cpu", "stage=squeeze", "progress=false", "model.width=16",
                      "model.depth=2", "ssl.batch_size=128", "squeeze.teachers=[ssl]", "squeeze.epochs=1",
                      "squeeze.probe.epochs=2", "squeeze.probe.mode=finetune", "squeeze.probe.views=augmented",
                      "squeeze.probe.standardize=false", "squeeze.probe.lr=0.5", run_dir=tmp_path / "ft")
    path = result["teachers"]["ssl"]["path"]
    payload = torch.load(path, map_location="cpu", weights_only=False)
    assert payload["metrics"]["probe_mode"] == "finetune"
    assert payload["fingerprint"]["probe"]["mode"] == "finetune"
    assert payload["fingerprint"]["probe"]["backbone_lr_scale"] == 0.01
    top1 = payload["metrics"]["probe_top1"]
    assert 0.0 <= top1 <= 1.0
    bundle = build_data(DataConfig(name="digits"))
    model, _ = load_teacher(path, ModelConfig(name="convnet", width=16, depth=2), bundle)
    assert evaluate_top1(model, bundle.test, bundle.normalize, torch.device("cpu")) == top1
