"""Image-folder trees at their own resolution: eval crop, random-resized-crop views, their consumers.

Real images: foolbox's ImageNet PNGs (512x512) and non-square crops of them (512x384, 300x420).
"""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from engine.data import DataConfig, build_data
from engine.data.views import CropSpec, MemorySource, crop_box, view_rng
from realdata import make_imagefolder_tree

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """foolbox's ImageNet PNGs plus, in every class, non-square crops of them (wide and tall)."""
    root = tmp_path_factory.mktemp("tree")
    per_class = make_imagefolder_tree(root, "imagenet")
    for cls, files in per_class.items():
        with Image.open(files[0]) as img:
            img = img.convert("RGB")
            img.crop((0, 64, 512, 448)).save(root / "train" / cls / "wide.png")  # 512 x 384
            img.crop((100, 20, 400, 440)).save(root / "train" / cls / "tall.png")  # 300 x 420
    return root


@pytest.fixture(scope="module")
def bundle(tree):
    return build_data(DataConfig(name="imagefolder", root=str(tree), image_size=SIZE,
                                 mean=[0.5] * 3, std=[0.25] * 3))


def _file_tensor(path):
    with Image.open(path) as img:
        return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


def _non_square(dataset):
    return [i for i, f in enumerate(dataset.files) if f.stem in ("wide", "tall")]


def test_eval_items_are_resize_over_0875_then_center_crop_of_the_file(bundle):
    reference = v2.Compose([v2.Resize(round(SIZE / 0.875), antialias=True), v2.CenterCrop(SIZE)])
    checked = 0
    for dataset in (bundle.train, bundle.test):
        for i in range(len(dataset)):
            image = dataset[i][0]
            expected = reference(_file_tensor(dataset.files[i])).float() / 255
            assert image.shape == (3, SIZE, SIZE)
            # PIL's and torch's antialiased bilinear differ by rounding only
            assert (image - expected).abs().mean() < 2 / 255, dataset.files[i]
            checked += 1
    assert checked == len(bundle.train) + len(bundle.test)
    # the 0.875 crop is not the old whole-square resize: it drops the border
    whole = v2.Compose([v2.Resize(SIZE, antialias=True), v2.CenterCrop(SIZE)])(_file_tensor(bundle.test.files[0]))
    assert (bundle.test[0][0] - whole.float() / 255).abs().mean() > 4 / 255


def test_a_crop_view_is_resized_crop_of_the_original_file_for_its_box(bundle):
    views = bundle.train.crop_views(CropSpec(size=SIZE, scale=(0.08, 1.0), views=2, seed=5))
    for i in _non_square(bundle.train)[:4] + [0]:
        original = _file_tensor(bundle.train.files[i])
        for epoch in (0, 3):
            images, label = views.at_epoch(epoch)[i]
            assert images.shape == (2, 3, SIZE, SIZE) and images.dtype == torch.uint8
            assert label == bundle.train.labels[i]
            for image, ((top, left, h, w), flipped) in zip(images, views.at_epoch(epoch).boxes(i)):
                assert not flipped and top + h <= original.shape[1] and left + w <= original.shape[2]
                # exact against torchvision's PIL path; torch's antialias path within rounding
                with Image.open(bundle.train.files[i]) as img:
                    pil = TF.resized_crop(img.convert("RGB"), top, left, h, w, [SIZE, SIZE])
                assert torch.equal(image, torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1))
                expected = TF.resized_crop(original, top, left, h, w, [SIZE, SIZE], antialias=True)
                assert (image.float() - expected.float()).abs().mean() < 2.0


def test_views_reach_outside_the_old_center_square(bundle):
    """A 512x384 file: the old decode kept x in [64, 448); full-resolution crops cover the rest."""
    i = next(k for k in _non_square(bundle.train) if bundle.train.files[k].stem == "wide")
    views = bundle.train.crop_views(CropSpec(size=SIZE, views=4, seed=0))
    lefts, rights = [], []
    for epoch in range(10):
        for (top, left, h, w), _ in views.boxes(i, epoch):
            lefts.append(left)
            rights.append(left + w)
    assert min(lefts) < 64 and max(rights) > 448


def test_crop_boxes_follow_random_resized_crop_ranges_and_distribution():
    height, width, scale, ratio = 384, 512, (0.2, 1.0), (3 / 4, 4 / 3)
    rng = np.random.default_rng(0)
    ours = np.array([crop_box(rng, height, width, scale, ratio) for _ in range(4000)], dtype=float)
    torch.manual_seed(0)
    theirs = np.array([v2.RandomResizedCrop.get_params(torch.empty(3, height, width), list(scale), list(ratio))
                       for _ in range(4000)], dtype=float)  # (top, left, h, w)
    for boxes in (ours, theirs):
        top, left, h, w = boxes.T
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    area = ours[:, 2] * ours[:, 3] / (height * width)
    aspect = ours[:, 3] / ours[:, 2]
    fit = ours[:, 2] * ours[:, 3] < height * width  # the central fallback covers the whole image
    assert area[fit].min() >= scale[0] - 0.01 and area.max() <= 1.0
    assert aspect[fit].min() >= ratio[0] - 0.02 and aspect[fit].max() <= ratio[1] + 0.02
    # same distribution as torchvision's: quantiles of area, log aspect and crop centre
    for stat in (lambda b: b[:, 2] * b[:, 3], lambda b: np.log(b[:, 3] / b[:, 2]),
                 lambda b: b[:, 1] + b[:, 3] / 2, lambda b: b[:, 0] + b[:, 2] / 2):
        q_ours, q_theirs = np.quantile(stat(ours), [0.1, 0.5, 0.9]), np.quantile(stat(theirs), [0.1, 0.5, 0.9])
        spread = np.quantile(stat(theirs), 0.9) - np.quantile(stat(theirs), 0.1)
        assert np.abs(q_ours - q_theirs).max() < 0.06 * spread


def test_views_repeat_for_a_seed_and_epoch_and_differ_otherwise(bundle):
    spec = CropSpec(size=SIZE, views=2, flip=0.5, seed=11)
    a, b = bundle.train.crop_views(spec), bundle.train.crop_views(spec)
    assert torch.equal(a.at_epoch(2)[3][0], b.at_epoch(2)[3][0])
    assert not torch.equal(a.at_epoch(2)[3][0], a.at_epoch(3)[3][0])
    other = bundle.train.crop_views(CropSpec(size=SIZE, views=2, flip=0.5, seed=12))
    assert not torch.equal(a.at_epoch(2)[3][0], other.at_epoch(2)[3][0])
    # the two views of one image differ; flips follow their probability
    flips = [f for e in range(20) for _, f in a.boxes(3, e)]
    assert 0.25 < np.mean(flips) < 0.75
    # the rng is keyed by (seed, epoch, index) alone: the same in a DataLoader worker
    assert crop_box(view_rng(11, 2, 3), 512, 512, (0.08, 1), (3 / 4, 4 / 3)) == a.at_epoch(2).boxes(3)[0][0]


def test_memory_source_crops_the_same_region_from_a_smaller_copy(bundle):
    files = bundle.train.source([_non_square(bundle.train)[0], 0])
    cached = MemorySource(files, max_short=2 * SIZE)
    assert min(cached.arrays[0].shape[:2]) == 2 * SIZE and cached.sizes[0] == files.get(0)[1]
    from engine.data.views import CropViews

    spec = CropSpec(size=SIZE, scale=(0.3, 1.0), views=3, seed=2)
    streamed, memory = CropViews(files, [0, 1], spec), CropViews(cached, [0, 1], spec)
    for i in range(2):
        assert memory.boxes(i) == streamed.boxes(i)
        diff = (memory[i][0].float() - streamed[i][0].float()).abs().mean()
        assert diff < 6.0  # resampled from fewer pixels, same region


def test_real_subset_rows_crop_full_files_and_cache_under_the_size_rule(bundle):
    from engine.artifacts.distilled import Codec, real_subset_dataset
    from engine.evaluate.settings import EvaluateConfig
    from engine.evaluate.stage import full_training_set, random_real_subset, real_crops

    cfg = EvaluateConfig(epochs=1, relabel="online")
    spec = real_crops(cfg, bundle, seed=4)
    assert spec is not None and spec.size == SIZE and spec.flip == 0.0
    assert real_crops(EvaluateConfig(epochs=1, relabel="stored"), bundle, 4) is None  # replays boxes
    subset = random_real_subset(bundle, 1, 4, cfg)
    item, _ = subset.dataset[0]
    assert item.shape == (3, SIZE, SIZE) and subset.dataset.crops_in_data
    indices = [0, 2]
    big = real_subset_dataset(bundle.train, indices, [0, 1], Codec(), 3, SIZE, 2**30, spec)
    small = real_subset_dataset(bundle.train, indices, [0, 1], Codec(), 3, SIZE, 1000, spec)
    assert type(big.source).__name__ == "MemorySource" and type(small.source).__name__ == "FileSource"
    assert big.boxes(1) == small.boxes(1)
    # each crop goes through the distilled sets' codec: JPEG changes it a little, PNG not at all
    jpeg = real_subset_dataset(bundle.train, indices, [0, 1], Codec("jpeg", 90), 3, SIZE, 0, spec)
    diff = (jpeg[1][0].float() - small[1][0].float()).abs()
    assert 0 < diff.mean() < 8
    full = full_training_set(cfg, bundle, seed=4)
    assert full.dataset.crops_in_data and len(full.dataset) == len(bundle.train)
    assert full.digest != full_training_set(EvaluateConfig(epochs=1, relabel="stored"), bundle, 4).digest


def test_student_trains_on_dataset_crops_without_cropping_again(bundle):
    from engine.evaluate.student import StudentRecipe, train_student
    from engine.models import ModelConfig, build_model

    spec = CropSpec(size=SIZE, scale=(0.08, 1.0), seed=0)
    train = bundle.train.crop_views(spec)
    recipe = StudentRecipe(epochs=1, batch_size=8, lr=1e-3, weight_decay=0.0, temperature=1.0, loss="hard",
                           crop_scale=(0.08, 1.0), flip=False, cutmix_prob=0.0, cutmix_alpha=1.0, eval_every=1)
    seen = []

    class Spy(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            if self.training:
                seen.append(x.detach().clone())
            return self.inner(x)

    torch.manual_seed(0)
    model = Spy(build_model(ModelConfig(name="convnet", width=8, depth=2), bundle.num_classes, 3, SIZE))
    train_student(model, train, bundle.test, bundle.normalize, recipe, torch.device("cpu"), seed=0, progress=False)
    from engine.training.batches import epoch_order

    first = epoch_order(0, 0, len(train))[:8]
    crops = torch.stack([train.at_epoch(0)[int(i)][0] for i in first]).float() / 255
    # the student saw exactly epoch 0's dataset crops (normalized), no second crop
    assert torch.allclose(seen[0], bundle.normalize(crops), atol=1e-5)


def test_pretraining_views_are_full_resolution_crops_and_replay_on_resume(bundle, tmp_path):
    from engine.squeeze.augment import AugmentSpec
    from engine.squeeze.pretrain import Interrupted, Schedule, crop_source, train

    class Spy(torch.nn.Module):
        num_views = 2

        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 1)
            self.seen = []

        def trainable(self):
            return list(self.parameters())

        def loss(self, views, labels, draws):
            self.seen.append([v.detach().clone() for v in views])
            return sum(self.lin(v.mean(dim=(2, 3))).pow(2).mean() for v in views)

    # geometry only: the photometric steps are off, so a view is the normalized crop itself
    spec = AugmentSpec(image_size=SIZE, crop_scale=(0.08, 1.0), flip=True, jitter_strength=0.0,
                       jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)
    schedule = Schedule(epochs=2, batch_size=8, lr=0.01, momentum=0.9, weight_decay=0.0)

    def run(state, resume=False, stop=None):
        torch.manual_seed(0)
        method = Spy()
        try:
            train(method, bundle.train, schedule=schedule, spec=spec, normalize=bundle.normalize,
                  device=torch.device("cpu"), generator=torch.Generator().manual_seed(9), state_path=state,
                  fingerprint={"t": 1}, resume=resume, stop_after_epochs=stop, progress=False)
        except Interrupted:
            pass
        return method.seen

    seen = run(tmp_path / "a.pt")
    crops = crop_source(bundle.train, spec, 2, seed=9)
    order = torch.randperm(len(bundle.train), generator=torch.Generator().manual_seed(9))[:8]
    expected = torch.stack([crops.at_epoch(0)[int(i)][0] for i in order]).float() / 255  # [B, 2, C, S, S]
    for k in range(2):
        assert torch.allclose(seen[0][k], bundle.normalize(expected[:, k]), atol=1e-5)
    assert not torch.allclose(seen[0][0], seen[0][1])
    steps = len(bundle.train) // 8
    first = run(tmp_path / "b.pt", stop=1)
    assert len(first) == steps
    resumed = run(tmp_path / "b.pt", resume=True)  # epoch 2 only, its crops replayed
    assert len(resumed) == steps
    for a, b in zip(seen[steps:], resumed):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
