"""The linear probe leaves the backbone and its BN statistics untouched and folds its scaling into fc."""
import torch

from engine.models import bn_layers
from engine.squeeze.bn_stats import bn_variance_summary
from engine.squeeze.probe import evaluate_top1, extract_features, linear_probe
from teachers import digits_backbone


def test_probe_keeps_bn_statistics_and_backbone_bit_identical():
    bundle, model = digits_backbone()
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    assert any("running_var" in k for k in before)
    model.train()  # the probe must switch to eval itself
    rows, final = linear_probe(model, bundle.train, bundle.test, bundle.normalize, epochs=5, batch_size=128,
                               lr=1.0, momentum=0.9, weight_decay=0.0, schedule="step", milestones=(0.6, 0.8),
                               standardize=True, device=torch.device("cpu"),
                               generator=torch.Generator().manual_seed(0), progress=False)
    after = model.backbone.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    for bn in bn_layers(model):
        assert not bn.training
    assert len(rows) == 5 and final["probe_top1"] > 0.5


def test_folded_classifier_equals_standardized_probe():
    bundle, model = digits_backbone()
    _, final = linear_probe(model, bundle.train, bundle.test, bundle.normalize, epochs=3, batch_size=256,
                            lr=0.5, momentum=0.9, weight_decay=0.0, schedule="cosine", milestones=(),
                            standardize=True, device=torch.device("cpu"),
                            generator=torch.Generator().manual_seed(0), progress=False)
    feats, labels = extract_features(model, bundle.test, bundle.normalize, torch.device("cpu"))
    logits, _ = extract_features(model, bundle.test, bundle.normalize, torch.device("cpu"), head=True)
    assert torch.allclose(model.fc(feats), logits, atol=1e-5)
    assert final["probe_top1"] == evaluate_top1(model, bundle.test, bundle.normalize, torch.device("cpu"))


def test_bn_summary_rows():
    _, model = digits_backbone()
    rows = bn_variance_summary(model, bins=10)
    assert [r["layer"] for r in rows] == [n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for row in rows:
        assert row["var_min"] <= row["var_mean"] <= row["var_max"]
        assert 0 <= row["var_entropy"] <= row["var_entropy_max"] + 1e-9
