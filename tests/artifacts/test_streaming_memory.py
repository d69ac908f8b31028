"""Distilled sets stream from disk: a student trains on a set larger than a memory budget while
the process's peak memory grows by less than that budget; small sets follow the cache rule."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from engine.artifacts import distilled as store
from realdata import foolbox_samples

SIZE, CLASSES, IPC = 160, 10, 70  # 700 RGB images: 51 MiB of 8-bit pixels, 205 MiB as float32
BUDGET_MB = 32  # growth measured 0-12 MB on a 88 MB set (2 warm-up passes)


def _write_set(folder: Path) -> None:
    """A distilled set written by the artifact layer's own writer, from crops of real photos."""
    photos = [np.asarray(Image.open(path).convert("RGB").resize((224, 224))) for path, _ in
              foolbox_samples("imagenet")]
    rng = np.random.default_rng(0)
    names = [f"class{c:02d}" for c in range(CLASSES)]
    fingerprint = {"test": "streaming"}
    records = []
    for k in range(IPC):
        crops = []
        for c in range(CLASSES):
            photo = photos[(c * IPC + k) % len(photos)]
            top, left = rng.integers(0, 224 - SIZE, size=2)
            crop = photo[top:top + SIZE, left:left + SIZE]
            crops.append(torch.from_numpy(crop.copy()).permute(2, 0, 1).float() / 255)
        store.write_batch(folder, k, images01=torch.stack(crops), labels=list(range(CLASSES)),
                          ipc_index=[k] * CLASSES, class_names=names, codec=store.Codec(),
                          set_digest=store.digest(fingerprint), log_rows=[], first_ratio=0.0)
        records.append(store.read_batch(folder, k, store.digest(fingerprint)))
    meta = {"class_names": names, "num_classes": CLASSES, "channels": 3, "image_size": SIZE,
            "mean": [0.5] * 3, "std": [0.25] * 3, "data": "test", "ipc": IPC, "seed": 0}
    store.finalize_set(folder, records, meta, fingerprint)


STUDENT = textwrap.dedent("""
    import json, resource, sys
    import torch
    from engine.artifacts.distilled import DistilledSet
    from engine.evaluate.student import StudentRecipe, train_student
    from engine.models import ModelConfig, build_model

    torch.set_num_threads(1)
    def peak_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    distilled = DistilledSet.open(sys.argv[1])
    train = distilled.dataset(None, cache_bytes=int(sys.argv[2]) * 2**20)
    test = torch.utils.data.Subset(train, range(50))
    normalize = lambda x: (x - 0.5) / 0.25
    recipe = StudentRecipe(epochs=1, batch_size=10, lr=1e-3, weight_decay=0.0, temperature=4.0, loss="hard",
                           crop_scale=(0.5, 1.0), flip=True, cutmix_prob=1.0, cutmix_alpha=1.0, eval_every=1)
    student = build_model(ModelConfig(name="convnet", width=8, depth=3), 10, 3, 160)
    # warm-up: the same training on 100 of the images, so allocator pools, libraries and the
    # per-batch working set are counted before; what the whole set adds on top is the measure
    # (twice: the allocator reaches its steady state on the second pass)
    for _ in range(2):
        train_student(build_model(ModelConfig(name="convnet", width=8, depth=3), 10, 3, 160),
                      torch.utils.data.Subset(train, range(100)), test, normalize, recipe, torch.device("cpu"), 0,
                      progress=False)
    before = peak_mb()
    result = train_student(student, train, test, normalize, recipe, torch.device("cpu"), 0, progress=False)
    print(json.dumps({"before_mb": before, "after_mb": peak_mb(), "images": len(train),
                      "streamed": not hasattr(train, "images"), "top1": result.top1}))
""")


def test_student_on_a_set_larger_than_the_budget_stays_under_it(tmp_path):
    folder = tmp_path / "set"
    _write_set(folder)
    pixels_mb = CLASSES * IPC * 3 * SIZE * SIZE / 2**20
    assert pixels_mb > BUDGET_MB  # the set does not fit the budget even as 8-bit pixels
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", STUDENT, str(folder), "0"], capture_output=True, text=True,
                         cwd=repo, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["images"] == CLASSES * IPC and figures["streamed"]
    grew = figures["after_mb"] - figures["before_mb"]
    assert grew < BUDGET_MB, f"peak memory grew by {grew:.0f} MB while streaming a {pixels_mb:.0f} MB set"


def test_size_rule_caches_small_sets_and_streams_large_ones(tmp_path):
    folder = tmp_path / "set"
    names = ["a", "b"]
    images = torch.rand(4, 3, 8, 8)
    store.write_batch(folder, 0, images01=images, labels=[0, 1, 0, 1], ipc_index=[0, 0, 1, 1], class_names=names,
                      codec=store.Codec(), set_digest="d", log_rows=[], first_ratio=0.0)
    meta = {"class_names": names, "num_classes": 2, "channels": 3, "image_size": 8, "mean": [0.5] * 3,
            "std": [0.25] * 3, "data": "test", "ipc": 2, "seed": 0}
    store.finalize_set(folder, [store.read_batch(folder, 0, "d")], meta, {"x": 1})
    distilled = store.DistilledSet.open(folder)
    assert store.should_cache(4, 3, 8, 4 * 3 * 8 * 8) and not store.should_cache(4, 3, 8, 4 * 3 * 8 * 8 - 1)
    cached = distilled.dataset(None, cache_bytes=2**20)
    streamed = distilled.dataset(None, cache_bytes=0)
    assert isinstance(getattr(cached, "images", None), torch.Tensor) and not hasattr(streamed, "images")
    for i in range(4):  # both serve the same 8-bit pixels: the PNG files
        assert torch.equal(cached[i][0], streamed[i][0]) and cached[i][1] == streamed[i][1]
    expected = (images.clamp(0, 1) * 255).round() / 255
    assert torch.equal(cached[0][0], expected[0])
    assert len(distilled.dataset(1, cache_bytes=0)) == 2  # ipc selection
