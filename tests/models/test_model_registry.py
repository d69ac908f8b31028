import pytest
import torch

from engine.errors import ConfigError
from engine.models import MODELS, ModelConfig, bn_layers, build_model


@pytest.mark.parametrize("name,size,channels", [("convnet", 28, 1), ("convnet", 8, 1),
                                                 ("resnet18_cifar", 32, 3), ("resnet18", 64, 3),
                                                 ("resnet50", 32, 1)])
def test_forward_backward(name, size, channels):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name), num_classes=10, in_channels=channels, image_size=size)
    x = torch.randn(2, channels, size, size, requires_grad=True)
    logits = model(x)
    assert logits.shape == (2, 10)
    logits.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in model.parameters())
    assert len(bn_layers(model)) > 0
    assert model.features(x).shape == (2, model.feature_dim)


def test_every_registry_entry_is_named_in_configs():
    from engine.models import MODEL_PRESETS

    assert set(MODEL_PRESETS) == set(MODELS)
    assert all(cfg.name == name for name, cfg in MODEL_PRESETS.items())


def test_bad_model_inputs():
    with pytest.raises(ConfigError, match="unknown model"):
        build_model(ModelConfig(name="vgg"), 10, 3, 32)
    with pytest.raises(ConfigError, match="at least 16px"):
        build_model(ModelConfig(name="convnet", depth=4), 10, 1, 8)
    with pytest.raises(ConfigError, match="at least 32px"):
        build_model(ModelConfig(name="resnet18"), 10, 3, 28)


def test_models_do_not_place_themselves():
    model = build_model(ModelConfig(name="convnet"), 10, 1, 28)
    assert all(p.device.type == "cpu" for p in model.parameters())
