"""A small real teacher for tests of later stages: a ConvNet trained on digits in a few seconds."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from engine.artifacts.teacher import read_teacher, save_teacher
from engine.data import DataConfig, build_data
from engine.models import ModelConfig, build_model

SMALL_MODEL = ModelConfig(name="convnet", width=16, depth=2)
MODEL_OVERRIDES = ("model.width=16", "model.depth=2")


def digits_backbone():
    """(digits bundle, the small ConvNet) with non-default BN running statistics, as a pretrained backbone has:
    three train-mode forwards of 64 real digits, no weight update."""
    bundle = build_data(DataConfig(name="digits"))
    torch.manual_seed(0)
    model = build_model(SMALL_MODEL, bundle.num_classes, bundle.channels, bundle.image_size)
    model.train()
    with torch.no_grad():
        for i in range(3):
            model(bundle.normalize(torch.stack([bundle.train[j][0] for j in range(64 * i, 64 * i + 64)])))
    return bundle, model


def train_digits_teacher(path: Path, kind: str = "supervised", epochs: int = 4, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    bundle = build_data(DataConfig(name="digits"))
    model = build_model(SMALL_MODEL, bundle.num_classes, bundle.channels, bundle.image_size)
    x = bundle.normalize(bundle.train.images.float() / 255)
    y = torch.tensor(bundle.train.labels)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        xt = bundle.normalize(bundle.test.images.float() / 255)
        top1 = float((model(xt).argmax(1) == torch.tensor(bundle.test.labels)).float().mean())
    save_teacher(path, model, kind=kind, model_cfg=SMALL_MODEL, bundle=bundle, metrics={"top1": top1})
    return path


def assert_same_teacher(path_a: str | Path, path_b: str | Path) -> tuple[dict, dict]:
    """Two teacher checkpoints hold bit-identical weights; returns both payloads."""
    a, b = read_teacher(path_a), read_teacher(path_b)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    return a, b
