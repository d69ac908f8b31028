"""torch, FFCV and DALI loaders on image files at their own resolution (engine.data.views semantics).

Real non-square images (512x384 crops of foolbox's ImageNet PNGs) whose left 48 columns, outside
the old Resize + CenterCrop square (x in [64, 448)), are painted magenta: a training crop of the
full image can show them, the eval crop never does.
"""
import numpy as np
import pytest
import torch
from PIL import Image

from torchvision.transforms.v2 import functional as TF

from engine.data import DataConfig, build_data
from engine.loaders import LoaderSpec, build_loader
from realdata import foolbox_samples

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32
MARK = 48


def _is_mark(images01: torch.Tensor) -> torch.Tensor:
    """[N,3,H,W] in [0, 1] -> [N] count of magenta pixels."""
    r, g, b = images01[:, 0], images01[:, 1], images01[:, 2]
    return ((r > 0.85) & (g < 0.2) & (b > 0.85)).flatten(1).sum(1)


def _file(path):
    with Image.open(path) as img:
        return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


@pytest.fixture(scope="module")
def marked_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("marked")
    samples = foolbox_samples("imagenet")[:8]
    for k, (path, label) in enumerate(samples):
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB").crop((0, 64, 512, 448)), dtype=np.uint8).copy()
        assert _is_mark(torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255).item() < 20
        array[:, :MARK] = (255, 0, 255)
        cls = f"c{k % 2}"
        for split in ("train", "val"):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(root / split / cls / f"img{k}.png")
    return root


@pytest.fixture(scope="module")
def marked(marked_tree):
    return build_data(DataConfig(name="imagefolder", root=str(marked_tree), image_size=SIZE,
                                 mean=[0.5] * 3, std=[0.25] * 3))


def _train_batches(kind, bundle, epochs, **fields):
    spec = LoaderSpec(batch_size=8, transform="train", crop_scale=(0.08, 1.0), flip=0.0, normalize=False,
                      shuffle=True, seed=3, num_workers=1, **fields)
    loader = build_loader(kind, bundle, "train", spec, rank=0, world_size=1)
    out = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        out.extend(x for x, _ in loader)
    return torch.cat(out)


def _eval(kind, bundle, **fields):
    spec = LoaderSpec(batch_size=8, normalize=False, num_workers=1, **fields)
    return torch.cat([x for x, _ in build_loader(kind, bundle, "test", spec, rank=0, world_size=1)])


def test_torch_loader_crops_the_full_file_reproducibly_and_evaluates_like_engine_data(marked):
    crops = _train_batches("torch", marked, 6)
    assert (_is_mark(crops) > 10).any()  # content outside the old center square
    assert torch.equal(crops, _train_batches("torch", marked, 6))  # (seed, epoch, index) seeding
    evals = _eval("torch", marked)
    reference = torch.stack([marked.test[i][0] for i in range(len(marked.test))])
    assert torch.allclose(evals, reference, atol=1e-6) and (_is_mark(evals) == 0).all()


def test_ffcv_betons_keep_full_resolution_and_crop_from_it(marked, tmp_path):
    import json

    from engine.loaders.convert_ffcv import convert

    convert(marked, tmp_path, fmt="raw", workers=1)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["eval_crop_ratio"] == 0.875 and meta["fixed_size"] is False
    from ffcv.reader import Reader

    stored = Reader(str(tmp_path / "train.beton")).metadata["f0"]
    assert (stored["width"] == 512).all() and (stored["height"] == 384).all()
    from engine.errors import ConfigError
    from engine.loaders.settings import LoaderConfig

    data_cfg = DataConfig(name="imagefolder", root="R", image_size=SIZE)
    LoaderConfig(name="ffcv", beton_dir=str(tmp_path)).check(data_cfg, marked)
    with pytest.raises(ConfigError, match="eval_crop_ratio=0.875 but data.eval_crop_ratio=1.0.*--eval-crop-ratio 1.0"):
        LoaderConfig(name="ffcv", beton_dir=str(tmp_path)).check(
            DataConfig(name="imagefolder", root="R", image_size=SIZE, eval_crop_ratio=1.0), marked)
    crops = _train_batches("ffcv", marked, 6, beton_dir=str(tmp_path))
    assert crops.shape[1:] == (3, SIZE, SIZE) and (_is_mark(crops) > 10).any()
    evals = _eval("ffcv", marked, beton_dir=str(tmp_path))
    assert (_is_mark(evals) == 0).all()
    # FFCV's center crop: side int(ratio * shorter) with ratio 32/37 (224/256 at 224), the region
    # Resize(37) + CenterCrop(32) shows, offsets floored (torchvision rounds them: <= 1/2 px apart)
    def center(original, side):
        top, left = (384 - side) // 2, (512 - side) // 2
        return TF.resized_crop(original, top, left, side, side, [SIZE, SIZE], antialias=True).float() / 255

    near, plain = [], []
    for image, path in zip(evals, marked.test.files):
        original = _file(path)
        near.append((image - center(original, int(SIZE / round(SIZE / 0.875) * 384))).abs().mean())
        plain.append((image - center(original, int(0.875 * 384))).abs().mean())  # ratio 0.875 at 32 px
    assert max(near) < 6 / 255  # cv2 area vs antialiased bilinear
    assert sum(near) < sum(plain)


def test_dali_crops_the_full_file_and_evaluates_like_engine_data(marked):
    crops = _train_batches("dali", marked, 6, device="cpu")
    assert crops.shape[1:] == (3, SIZE, SIZE) and (_is_mark(crops) > 10).any()
    evals = _eval("dali", marked, device="cpu")
    assert (_is_mark(evals) == 0).all()
    # Resize(37) + CenterCrop(32), with DALI's crop offset: a half pixel rounds up (torchvision: to even)
    for image, path in zip(evals, marked.test.files):
        resized = TF.resize(_file(path), round(SIZE / 0.875), antialias=True).float() / 255
        top, left = ((resized.shape[1] - SIZE) + 1) // 2, ((resized.shape[2] - SIZE) + 1) // 2
        assert (image - resized[:, top:top + SIZE, left:left + SIZE]).abs().mean() < 2 / 255
