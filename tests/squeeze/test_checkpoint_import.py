"""Teachers from public checkpoints (ssl.init_from, squeeze.supervised.init_from, squeeze.probe.init_from).

Each released layout is rebuilt from one randomly initialised torchvision ResNet-18 whose BN statistics saw
real CIFAR-10 images; the imported model must give that network's features (and logits, where the file
carries a classifier) on real images. Errors are one line naming the file and the problem.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from engine.artifacts.fingerprint import StaleArtifact
from engine.artifacts.imports import install, read_backbone, read_head, resolve
from engine.artifacts.teacher import load_teacher, save_teacher
from engine.data import DataConfig, build_data
from engine.errors import ConfigError
from engine.models import ModelConfig, build_model
from engine.training.batches import to_unit_float
from realdata import foolbox_samples, make_imagefolder_tree

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = 8
"""The classes of the CIFAR-10 samples foolbox ships (the image tree of the CLI test)."""
SETTING = "ssl.init_from"


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """The 20 real CIFAR-10 samples, [20, 3, 32, 32] in [0, 1]."""
    arrays = [np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255 for path, _ in
              foolbox_samples("cifar10")]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def source(images) -> torch.nn.Module:
    """The network every file is made from: random weights, BN running statistics from real images."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=CLASSES)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(images)
    return net.eval()


def _features(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision ResNet features: everything up to (not including) fc."""
    fc, net.fc = net.fc, torch.nn.Identity()
    try:
        with torch.no_grad():
            return net(x)
    finally:
        net.fc = fc


def _model(name: str = "resnet18", classes: int = CLASSES):
    return build_model(ModelConfig(name=name), classes, 3, 32)


def _prefixed(sd: dict, prefix: str, fc: bool = False) -> dict:
    return {prefix + k: v for k, v in sd.items() if fc or not k.startswith("fc.")}


def _noise_like(sd: dict, seed: int) -> dict:
    """Other weights of the same shapes (a momentum encoder, DINO's student): must not be picked."""
    return {k: (v * -2 + seed if v.is_floating_point() else v) for k, v in sd.items()}


def _moco_v1(sd):
    return {"epoch": 200, "arch": "resnet18", "state_dict": {
        **_prefixed(sd, "module.encoder_q."), "module.encoder_q.fc.weight": torch.randn(128, 512),
        "module.encoder_q.fc.bias": torch.zeros(128), **_prefixed(_noise_like(sd, 1), "module.encoder_k."),
        "module.queue": torch.randn(128, 65536 // 64), "module.queue_ptr": torch.zeros(1, dtype=torch.long)},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.03}]}}


def _moco_v2(sd):
    mlp = {"module.encoder_q.fc.0.weight": torch.randn(512, 512), "module.encoder_q.fc.0.bias": torch.zeros(512),
           "module.encoder_q.fc.2.weight": torch.randn(128, 512), "module.encoder_q.fc.2.bias": torch.zeros(128)}
    return {"epoch": 800, "arch": "resnet18", "state_dict": {
        **_prefixed(sd, "module.encoder_q."), **mlp, **_prefixed(_noise_like(sd, 2), "module.encoder_k."),
        "module.queue": torch.randn(128, 16), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}}


def _moco_v3(sd):
    return {"epoch": 100, "arch": "resnet18", "state_dict": {
        **_prefixed(sd, "module.base_encoder."), "module.base_encoder.fc.0.weight": torch.randn(64, 512),
        "module.base_encoder.fc.1.running_mean": torch.zeros(64),
        **_prefixed(_noise_like(sd, 3), "module.momentum_encoder."),
        "module.predictor.0.weight": torch.randn(64, 64)}}


def _dino_backbone(sd):  # dino_resnet50_pretrain.pth: torchvision keys, fc removed
    return _prefixed(sd, "")


def _dino_full(sd):  # the full training checkpoint: teacher and student, plus an argparse Namespace
    return {"teacher": {**_prefixed(sd, "backbone."), "head.mlp.0.weight": torch.randn(64, 512)},
            "student": {**_prefixed(_noise_like(sd, 4), "module.backbone."), "module.head.mlp.0.weight":
                        torch.randn(64, 512)},
            "epoch": 800, "args": argparse.Namespace(arch="resnet18", out_dim=60000)}


def _swav(sd):
    return {**_prefixed(sd, "module."), "module.projection_head.0.weight": torch.randn(2048, 512),
            "module.prototypes.weight": torch.randn(3000, 128)}


def _byol_online_network(sd):
    return {"online_network_state_dict": {**_prefixed(sd, "online_network.encoder."),
                                          "online_network.projector.0.weight": torch.randn(64, 512)},
            "target_network_state_dict": _prefixed(_noise_like(sd, 5), "target_network.encoder.")}


def _byol_lucidrains(sd):  # byol-pytorch: the wrapped torchvision net, its fc never trained
    return {**_prefixed(sd, "online_encoder.net.", fc=True), "online_encoder.projector.net.0.weight":
            torch.randn(64, 512), "online_predictor.net.0.weight": torch.randn(64, 64)}


def _solo_learn(sd):  # solo-learn / mmselfsup: backbone.* next to projector, momentum copies, classifier
    return {"state_dict": {**_prefixed(sd, "backbone."), "projector.0.weight": torch.randn(64, 512),
                           **_prefixed(_noise_like(sd, 6), "momentum_backbone.")}}


BACKBONES = {
    "moco_v1": (_moco_v1, "MoCo v1/v2 (state_dict: module.encoder_q.*)"),
    "moco_v2": (_moco_v2, "MoCo v1/v2 (state_dict: module.encoder_q.*)"),
    "moco_v3": (_moco_v3, "MoCo v3 (state_dict: module.base_encoder.*)"),
    "dino_backbone": (_dino_backbone, "ResNet backbone (DINO / SwAV / BYOL release)"),
    "dino_full": (_dino_full, "DINO / BYOL-style (teacher: backbone.*)"),
    "swav": (_swav, "SwAV (module.*)"),
    "byol_online_network": (_byol_online_network, "BYOL-style (online_network_state_dict: online_network.encoder.*)"),
    "byol_lucidrains": (_byol_lucidrains, "BYOL-style (online_encoder.net.*)"),
    "solo_learn": (_solo_learn, "DINO / BYOL-style (state_dict: backbone.*)"),
}


@pytest.mark.parametrize("layout", sorted(BACKBONES))
def test_ssl_layouts_give_the_source_features(layout, source, images, tmp_path):
    build, name = BACKBONES[layout]
    path = tmp_path / f"{layout}.pth"
    torch.save(build(source.state_dict()), path)
    model = _model()
    imported = read_backbone(str(path), model, SETTING, "resnet18")
    assert imported.layout == name
    assert imported.fc is None and len(imported.sha256) == 64
    fc_before = model.fc.weight.clone()
    install(model, imported)
    model.eval()
    with torch.no_grad():
        got = model.features(images)
    torch.testing.assert_close(got, _features(source, images), rtol=1e-5, atol=1e-5)
    assert torch.equal(model.fc.weight, fc_before)  # an SSL import leaves the classifier to the probe


def _torchvision_file(sd):
    return dict(sd)


def _lincls(sd):  # MoCo's main_lincls checkpoint: the whole DataParallel model with its trained fc
    return {"epoch": 100, "arch": "resnet18", "best_acc1": 0.7, "state_dict": _prefixed(sd, "module.", fc=True)}


@pytest.mark.parametrize("build,name", [(lambda net: _torchvision_file(net.state_dict()), "torchvision"),
                                        (lambda net: _lincls(net.state_dict()), "torchvision (state_dict: module.*)"),
                                        (lambda net: net, "torchvision")])  # a whole pickled model
def test_supervised_files_give_the_source_logits(build, name, source, images, tmp_path):
    path = tmp_path / "sup.pth"
    torch.save(build(source), path)
    model = _model()
    imported = read_backbone(str(path), model, "squeeze.supervised.init_from", "resnet18", classifier=True)
    assert imported.layout == name
    install(model, imported)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), source(images), rtol=1e-5, atol=1e-5)


def test_own_teacher_file_imports(source, images, tmp_path):
    model = _model()
    install(model, read_backbone(_save(tmp_path / "tv.pth", dict(source.state_dict())), model,
                                 "squeeze.supervised.init_from", "resnet18", classifier=True))
    make_imagefolder_tree(tmp_path / "tree", "cifar10")
    bundle = build_data(DataConfig(name="imagefolder", root=str(tmp_path / "tree"), image_size=32, channels=3))
    teacher = save_teacher(tmp_path / "teacher.pt", model, kind="supervised", model_cfg=ModelConfig("resnet18"),
                           bundle=bundle, metrics={})
    again = _model(classes=10)  # data with 10 classes; the file's fc has 8
    with pytest.raises(ConfigError, match="has a classifier for 8 classes but the data has 10;"):
        read_backbone(str(teacher), again, "squeeze.supervised.init_from", "resnet18", classifier=True)
    imported = read_backbone(str(teacher), _model(), SETTING, "resnet18")
    assert imported.layout == "SC-DD teacher"
    target = _model()
    install(target, imported)
    with torch.no_grad():
        torch.testing.assert_close(target.eval().features(images), _features(source, images), rtol=1e-5, atol=1e-5)
    head = read_head(str(teacher), target, "squeeze.probe.init_from", "resnet18")
    assert head.layout == "SC-DD teacher (fc.*)" and torch.equal(head.fc[0], source.fc.weight)


def _save(path: Path, obj) -> str:
    torch.save(obj, path)
    return str(path)


@pytest.mark.parametrize("build,name", [
    (lambda fc: {"epoch": 100, "state_dict": {"module.conv1.weight": torch.zeros(64, 3, 7, 7),
                                              **{f"module.fc.{k}": v for k, v in fc.items()}}},
     "state_dict: module.fc.*"),
    (lambda fc: {f"fc.{k}": v for k, v in fc.items()}, "fc.*"),
    (lambda fc: {"state_dict": {f"module.linear.{k}": v for k, v in fc.items()}}, "state_dict: module.linear.*"),
    (lambda fc: {f"module.linear.linear.{k}": v for k, v in fc.items()}, "module.linear.linear.*"),
])
def test_released_heads_give_the_source_logits(build, name, source, images, tmp_path):
    backbone = _save(tmp_path / "moco.pth", _moco_v2(source.state_dict()))
    head = _save(tmp_path / "head.pth", build({"weight": source.fc.weight.detach(), "bias": source.fc.bias.detach()}))
    model = _model()
    got = read_head(head, model, "squeeze.probe.init_from", "resnet18")
    assert got.layout == name and got.backbone is None
    install(model, read_backbone(backbone, model, SETTING, "resnet18"), got)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), source(images), rtol=1e-5, atol=1e-5)


def test_torchvision_name_reads_the_hub_cache(source, images, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(ConfigError) as info:
        resolve("torchvision:resnet18", "squeeze.supervised.init_from")
    message = str(info.value)
    assert "\n" not in message and str(expected) in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message and "TORCH_HOME" in message
    expected.parent.mkdir(parents=True)
    torch.save(source.state_dict(), expected)
    model = _model()
    imported = read_backbone("torchvision:resnet18", model, "squeeze.supervised.init_from", "resnet18",
                             classifier=True)
    assert imported.path == expected and imported.layout == "torchvision"
    install(model, imported)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), source(images), rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="torchvision:resnet50 holds resnet50 weights but model=resnet18"):
        read_backbone("torchvision:resnet50", model, "squeeze.supervised.init_from", "resnet18")


def _one_line(call) -> str:
    with pytest.raises(ConfigError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_file_says_where(tmp_path):
    message = _one_line(lambda: read_backbone(str(tmp_path / "moco_v2_800ep_pretrain.pth.tar"), _model(),
                                              SETTING, "resnet18"))
    assert f"ssl.init_from={tmp_path / 'moco_v2_800ep_pretrain.pth.tar'}: no such file" in message


def test_wrong_architecture_names_the_mismatch(tmp_path):
    torch.manual_seed(0)
    r50 = _save(tmp_path / "moco_v2_800ep_pretrain.pth.tar",
                _moco_v2(torchvision.models.resnet50(weights=None).state_dict()))
    message = _one_line(lambda: read_backbone(r50, _model(), SETTING, "resnet18"))
    assert message.startswith(f"ssl.init_from={r50} does not fit model=resnet18 (read as MoCo v1/v2")
    assert "a resnet50" in message
    assert "layer1.0.conv1.weight is [64, 64, 1, 1] in the file but [64, 64, 3, 3] in the model" in message
    assert "layouts understood: MoCo v1/v2" in message
    # README quotes this line and the missing-file one as `scdd` prints them
    missing = _one_line(lambda: read_backbone("/path/moco_v2_800ep_pretrain.pth.tar", _model(), SETTING,
                                              "resnet18"))
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text().splitlines()
    for line in (missing, message.replace(str(tmp_path), "/path")):
        assert f"scdd: error: {line}" in readme


def test_cifar_stem_and_junk_are_refused(source, tmp_path):
    tv = _save(tmp_path / "tv.pth", dict(source.state_dict()))
    cifar = build_model(ModelConfig(name="resnet18_cifar"), CLASSES, 3, 32)
    message = _one_line(lambda: read_backbone(tv, cifar, SETTING, "resnet18_cifar"))
    assert "conv1.weight is [64, 3, 7, 7] in the file but [64, 3, 3, 3] in the model" in message
    junk = _save(tmp_path / "junk.pth", {"state_dict": {"encoder.0.weight": torch.zeros(3)}})
    assert "no layout names its backbone weights" in _one_line(lambda: read_backbone(junk, _model(), SETTING,
                                                                                     "resnet18"))
    (tmp_path / "text.pth").write_text("not a checkpoint")
    assert "could not be read by torch.load" in _one_line(
        lambda: read_backbone(str(tmp_path / "text.pth"), _model(), SETTING, "resnet18"))


def test_class_count_mismatch_says_how_to_go_on(source, tmp_path):
    imagenet_like = dict(source.state_dict())
    imagenet_like["fc.weight"], imagenet_like["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    path = _save(tmp_path / "tv1000.pth", imagenet_like)
    message = _one_line(lambda: read_backbone(path, _model(), "squeeze.supervised.init_from", "resnet18",
                                              classifier=True))
    assert message == (f"squeeze.supervised.init_from={path} has a classifier for 1000 classes but the data has "
                       f"8; use the file as ssl.init_from={path} (backbone only; the probe trains a 8-class "
                       f"head), or run on data with 1000 classes")
    head = _one_line(lambda: read_head(path, _model(), "squeeze.probe.init_from", "resnet18"))
    assert "has a classifier for 1000 classes but the data has 8; drop squeeze.probe.init_from" in head
    backbone_only = _save(tmp_path / "moco.pth", _moco_v2(source.state_dict()))
    assert "has no classifier" in _one_line(lambda: read_backbone(backbone_only, _model(),
                                                                  "squeeze.supervised.init_from", "resnet18",
                                                                  classifier=True))


# --- through the CLI: a real image tree, an SSL backbone + released head and a torchvision teacher ---

def _cli_files(tmp_path: Path, source) -> tuple[Path, Path, Path]:
    tree = tmp_path / "tree"
    make_imagefolder_tree(tree, "cifar10")
    moco = tmp_path / "moco_v2_800ep_pretrain.pth.tar"
    torch.save(_moco_v2(source.state_dict()), moco)
    head = tmp_path / "moco_v2_lincls.pth.tar"
    torch.save(_lincls(source.state_dict()), head)
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(source.state_dict(), cache / "resnet18-f37072fd.pth")
    return tree, moco, head


def test_cli_imports_teachers_and_skips_pretraining(run_scdd, source, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    tree, moco, head = _cli_files(tmp_path, source)
    run_dir = tmp_path / "run"
    overrides = ("stage=squeeze", "data=imagefolder", f"data.root={tree}", "data.image_size=32", "model=resnet18",
                 "device=cpu", "progress=false", "squeeze.workers=0", f"ssl.init_from={moco}",
                 f"squeeze.probe.init_from={head}", "squeeze.supervised.init_from=torchvision:resnet18")
    result = run_scdd(*overrides, run_dir=run_dir)
    bundle = build_data(DataConfig(name="imagefolder", root=str(tree), image_size=32, channels=3))
    x = bundle.normalize(to_unit_float(torch.stack([bundle.test[i][0] for i in range(len(bundle.test))])))
    with torch.no_grad():
        want_logits = source(x)
    for kind, layout in (("ssl", "MoCo v1/v2 (state_dict: module.encoder_q.*)"), ("supervised", "torchvision")):
        entry = result["teachers"][kind]
        assert entry["method"] == "import" and entry["layout"] == layout and not entry["skipped"]
        folder = run_dir / "squeeze" / kind
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["pretrain"] == [] and metrics["probe"] == [] and metrics["final"]["epochs"] == 0
        assert metrics["final"]["finished"] and (folder / "bn_stats.json").is_file()
        model, payload = load_teacher(folder / "teacher.pt", ModelConfig(name="resnet18"), bundle)
        assert payload["kind"] == kind and len(payload["fingerprint"]["import"]["sha256"]) == 64
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), want_logits, rtol=1e-5, atol=1e-5)
    top1 = float((want_logits.argmax(1) == torch.tensor(bundle.test.labels)).float().mean())
    assert result["teachers"]["ssl"]["probe_top1"] == pytest.approx(top1)
    assert result["teachers"]["supervised"]["top1"] == pytest.approx(top1)

    again = run_scdd(*overrides, "resume=true", run_dir=run_dir)
    assert again["teachers"]["ssl"]["skipped"] and again["teachers"]["supervised"]["skipped"]
    torch.save(_moco_v2(_noise_like(source.state_dict(), 7)), moco)  # the release file changed
    with pytest.raises(StaleArtifact, match=r"ssl teacher .* was made with other settings \(import.sha256"):
        run_scdd(*overrides, "resume=true", run_dir=run_dir)


def test_cli_checks_the_files_before_any_training(run_scdd, source, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    tree, moco, _ = _cli_files(tmp_path, source)
    base = ("data=imagefolder", f"data.root={tree}", "data.image_size=32", "model=resnet18", "device=cpu",
            "progress=false", "stage=pipeline")
    for i, (extra, message) in enumerate((
            ([f"ssl.init_from={tmp_path / 'nope.pth'}"], "no such file"),
            ([f"ssl.init_from={moco}", "squeeze.supervised.init_from=torchvision:resnet18"],
             "is not in the local torch hub cache"),
            ([f"ssl.init_from={moco}", f"squeeze.probe.init_from={tmp_path / 'head.pth'}"], "no such file"),
            ([f"squeeze.probe.init_from={moco}"], "give that backbone as ssl.init_from=PATH"),
            (["squeeze.supervised.init_from=' '"], "squeeze.supervised.init_from is empty"))):
        run_dir = tmp_path / f"run{i}"
        with pytest.raises(ConfigError, match=message):
            run_scdd(*base, *extra, run_dir=run_dir)
        assert not (run_dir / "squeeze").exists()
