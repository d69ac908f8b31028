"""`scdd +experiment=imagenet1k_ipc10` end to end on a tree laid out like ImageNet-1K (real ImageNet photos at
their own resolution, synset folders; tests/imagenet_tree.py), on the CPU with tiny overrides; then the SSL
teacher's set goes out through `python -m engine.interop export` and comes back through
`evaluate.external_sets`: its row reproduces the SC-DD row exactly (same pixels, teacher, recipe and seed).

ResNet-18 at 224 px on one thread: batches of 2, one epoch or two iterations per step; ~30 s in all."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from imagenet_tree import DEFAULT_CLASSES, SYNSETS, make_imagenet_tree

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ("+experiment=imagenet1k_ipc10", "device=cpu", "progress=false", "ipc=[1]", "data.image_size=224",
        # teachers imported, as users of the preset start: a MoCo v2 release file (the probe trains its head) and
        # the preset's own torchvision:resnet18, read from a TORCH_HOME cache written by the fixture
        "squeeze.workers=0", "squeeze.probe.epochs=1", "squeeze.probe.batch_size=8",
        "recover.iterations=2", "recover.classes_per_batch=3", "recover.real_init_pool=2",
        "evaluate.epochs=1", "evaluate.batch_size=2", "evaluate.workers=0", "evaluate.eval_every=1",
        "evaluate.full_data=false", "loader.num_workers=0")
OUR_ROWS = ["scdd", "sre2l", "scdd_real_init", "real_init_unrefined"]


@pytest.fixture(scope="module")
def imagenet_run(tmp_path_factory, one_thread):
    from hydra import compose, initialize_config_dir

    from engine.cli import execute

    root = tmp_path_factory.mktemp("imagenet")
    tree = make_imagenet_tree(root / "tree")
    moco = _released_teachers(root, len(DEFAULT_CLASSES))
    overrides = [*TINY, f"data.root={root / 'tree'}", f"ssl.init_from={moco}"]
    patch = pytest.MonkeyPatch()
    patch.setenv("TORCH_HOME", str(root / "torch"))  # torch.hub.get_dir() resolves torchvision:resnet18 there

    def run(*extra: str) -> dict:
        with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
            cfg = compose(config_name="config", overrides=[*overrides, *extra])
        return execute(cfg, root / "run")

    run()
    yield root, tree, run
    patch.undo()


def _released_teachers(root: Path, classes: int) -> Path:
    """A MoCo v2 release file (module.encoder_q.*, its MLP head) and torchvision:resnet18 in a TORCH_HOME cache,
    both from random torchvision ResNet-18s (the supervised one with a head for this tree's classes)."""
    import torch
    import torchvision

    torch.manual_seed(0)
    ssl_net, supervised = torchvision.models.resnet18(), torchvision.models.resnet18(num_classes=classes)
    moco = {f"module.encoder_q.{k}": v for k, v in ssl_net.state_dict().items() if not k.startswith("fc.")}
    moco.update({"module.encoder_q.fc.0.weight": torch.zeros(512, 512), "module.encoder_q.fc.2.weight":
                 torch.zeros(128, 512), "module.queue": torch.zeros(128, 16)})
    path = root / "moco_v2_200ep_pretrain.pth.tar"
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": moco}, path)
    cache = root / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(supervised.state_dict(), cache / "resnet18-f37072fd.pth")
    return path


def test_the_tree_is_laid_out_like_imagenet(imagenet_run):
    root, tree, _ = imagenet_run
    synsets = sorted(SYNSETS[c] for c in DEFAULT_CLASSES)
    assert sorted(p.name for p in (root / "tree" / "train").iterdir()) == synsets
    assert sorted(p.name for p in (root / "tree" / "val").iterdir()) == synsets
    sizes = set()
    for files in tree["val"].values():
        for path in files:
            with Image.open(path) as img:
                sizes.add(img.size)
    assert sizes == {(512, 512), (1024, 683)}  # val photos as they ship, never resized


def test_the_preset_runs_every_stage_at_224_px(imagenet_run):
    root, _, _ = imagenet_run
    run_dir = root / "run"
    report = json.loads((run_dir / "report.json").read_text())
    assert list(report["ipc"]["1"]) == [*OUR_ROWS, "random_real"]
    assert {"ssl_probe_top1", "supervised_top1"} <= set(report["teacher"])
    for kind in ("ssl", "supervised"):  # imported: no pretraining epochs ran
        metrics = json.loads((run_dir / "squeeze" / kind / "metrics.json").read_text())
        assert metrics["pretrain"] == [] and metrics["final"]["epochs"] == 0
    index = json.loads((run_dir / "recover" / "ssl-noise" / "index.json").read_text())
    assert index["image_size"] == 224 and index["class_names"] == sorted(SYNSETS[c] for c in DEFAULT_CLASSES)
    with Image.open(run_dir / "recover" / "ssl-noise" / index["files"][0]) as img:
        assert img.size == (224, 224) and img.mode == "RGB"


def test_our_set_exported_and_evaluated_as_an_external_set_reproduces_its_row(imagenet_run):
    root, _, run = imagenet_run
    run_dir, out = root / "run", root / "exported"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "engine.interop", "export", str(run_dir / "recover" / "ssl-noise"),
                           str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "exported 3 images of 3 classes" in done.stdout and "png, copied as stored" in done.stdout
    index = json.loads((run_dir / "recover" / "ssl-noise" / "index.json").read_text())
    for rel, label, k in zip(index["files"], index["labels"], index["ipc_index"]):
        exported = out / f"new{label:03d}" / f"class{label:03d}_id{k:03d}.png"
        assert exported.read_bytes() == (run_dir / "recover" / "ssl-noise" / rel).read_bytes()

    before = json.loads((run_dir / "report.json").read_text())["ipc"]["1"]
    results = run("stage=evaluate", "resume=true", f"evaluate.external_sets={{exported:{out}}}")
    rows = results["ipc"]["1"]
    assert list(rows) == [*OUR_ROWS, "exported", "random_real"]
    for key in OUR_ROWS:  # resumed: made by the pipeline run, not retrained
        assert rows[key]["seconds"] == before[key]["seconds"]
    assert rows["exported"]["images"] == 3
    assert rows["exported"]["history"] == rows["scdd"]["history"]  # same pixels -> the same student, bit for bit
    report = json.loads((run_dir / "report.json").read_text())
    assert report["ipc"]["1"]["exported"]["top1"] == report["ipc"]["1"]["scdd"]["top1"]
