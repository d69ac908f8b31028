"""The recover levers of issue 18: diverse real picks, RDED-style crop starts, CDA's crop curriculum,
fewer iterations for real starts."""
import pytest
import torch

from engine.artifacts.distilled import DistilledSet
from engine.artifacts.teacher import load_teacher
from engine.data import DataConfig, build_data
from engine.errors import ConfigError
from engine.recover.augment import augment_batch, augment_groups, sample_group_params
from engine.recover.init import herding, kcenter, rded_starts, select_real_images, stitch
from engine.recover.settings import RecoverConfig, StepAugment, curriculum_low
from teachers import MODEL_OVERRIDES, SMALL_MODEL

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ("data=digits", "device=cpu", *MODEL_OVERRIDES, "stage=recover", "progress=false", "logger=none")


def test_kcenter_and_herding_cover_the_clusters_confident_picks_miss():
    # three tight clusters, the first much larger: the top of any one ranking stays in one cluster
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    sizes = [20, 3, 3]
    points = torch.cat([c + 0.1 * torch.randn(n, 2, generator=g) for c, n in zip(centers, sizes)])
    cluster = torch.tensor([i for i, n in enumerate(sizes) for _ in range(n)])
    picked = kcenter(points, 3, first=0)
    assert picked[0] == 0 and set(cluster[picked].tolist()) == {0, 1, 2}
    assert len(set(kcenter(points, 26))) == 26  # no repeats up to the whole pool
    # herding matches the mean: with cluster weights 20:3:3, its first picks leave cluster 0 at some point
    herd = herding(points, 6)
    assert len(set(herd)) == 6 and {1, 2} & set(cluster[herd].tolist())
    mean = points.mean(0)
    assert (points[herd].mean(0) - mean).norm() < (points[:6].mean(0) - mean).norm()


def test_diverse_selection_on_a_real_teacher_differs_from_confident(digits_teacher):
    bundle = build_data(DataConfig(name="digits"))
    teacher = load_teacher(digits_teacher, SMALL_MODEL, bundle)[0].eval()
    picks = {s: select_real_images(teacher, bundle, 4, s, 32, 0, torch.device("cpu"))
             for s in ("confident", "kcenter", "herding")}
    labels = bundle.labels("train")
    for s, chosen in picks.items():
        assert all(len(set(c)) == 4 and all(labels[i] == k for i in c) for k, c in enumerate(chosen)), s
    # k-center starts at the most confident image of each class
    assert [c[0] for c in picks["kcenter"]] == [c[0] for c in picks["confident"]]
    assert picks["kcenter"] != picks["confident"] and picks["herding"] != picks["confident"]


def test_rded_keeps_the_crops_the_teacher_is_most_sure_of(digits_teacher):
    bundle = build_data(DataConfig(name="digits"))
    teacher = load_teacher(digits_teacher, SMALL_MODEL, bundle)[0].eval()
    starts = rded_starts(teacher, bundle, 2, pool=8, crops=4, patches=1, scale=(0.5, 1.0), seed=0,
                         device=torch.device("cpu"))
    assert len(starts) == 10 and starts[0].shape == (2, 1, 8, 8)
    assert 0 <= float(starts[3].min()) and float(starts[3].max()) <= 1
    with torch.no_grad():
        for c in (0, 7):
            kept = teacher(bundle.normalize(starts[c])).softmax(1)[:, c]
            # the same seeded crops, all of them: the kept ones are the best of every candidate's best
            every = rded_starts(teacher, bundle, 8, pool=8, crops=4, patches=1, scale=(0.5, 1.0), seed=0,
                                device=torch.device("cpu"))[c]
            all_probs = teacher(bundle.normalize(every)).softmax(1)[:, c]
            assert torch.allclose(kept, all_probs.sort(descending=True).values[:2], atol=1e-5)
    stitched = rded_starts(teacher, bundle, 1, pool=8, crops=2, patches=2, scale=(0.5, 1.0), seed=0,
                           device=torch.device("cpu"))
    assert stitched[0].shape == (1, 1, 8, 8)


def test_stitch_tiles_in_row_order():
    patches = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 1, 4, 4)
    image = stitch(patches, 2, 8)
    assert image.shape == (1, 8, 8)
    assert image[0, 0, 0] == 0 and image[0, 0, 7] == 1 and image[0, 7, 0] == 2 and image[0, 7, 7] == 3


def test_curriculum_lower_bound_falls_from_one_then_holds():
    assert curriculum_low(0, 100, 0.08, 0.5) == 1.0
    assert curriculum_low(25, 100, 0.08, 0.5) == pytest.approx(1 - 0.92 * 0.5)
    assert curriculum_low(50, 100, 0.08, 0.5) == 0.08 and curriculum_low(99, 100, 0.08, 0.5) == 0.08
    lows = [curriculum_low(s, 100, 0.08, 0.5) for s in range(100)]
    assert all(a >= b for a, b in zip(lows, lows[1:]))
    aug = StepAugment(image_size=8, crop_scale=(0.08, 1.0), flip=False, jitter=1, crop_curriculum=0.5)
    assert aug.at(0, 100).crop_scale == (1.0, 1.0) and aug.at(80, 100).crop_scale == (0.08, 1.0)
    off = StepAugment(image_size=8, crop_scale=(0.08, 1.0), flip=False, jitter=1)
    assert off.at(0, 100) is off  # no curriculum: the very same augmentation, every step


def test_curriculum_changes_early_crops_only():
    x = torch.randn(2, 1, 16, 16)
    aug = StepAugment(image_size=16, crop_scale=(0.08, 1.0), flip=False, jitter=0, crop_curriculum=0.5)
    first = augment_batch(x, aug.at(0, 10), torch.Generator().manual_seed(3))
    fixed = augment_batch(x, StepAugment(16, (0.08, 1.0), False, 0), torch.Generator().manual_seed(3))
    # scale 1: the crop is the whole image up to its aspect ratio, the fixed range cuts much closer
    assert not torch.equal(first, fixed)
    late = augment_batch(x, aug.at(9, 10), torch.Generator().manual_seed(3))
    assert torch.equal(late, fixed)
    # the grouped (static-shape) path draws the same narrowed crops
    params = sample_group_params([torch.Generator().manual_seed(3)], aug.at(0, 10), 16)
    assert torch.allclose(augment_groups(x, params), first, atol=1e-5)


@pytest.mark.parametrize("override, words", [
    ("recover.real_init_select=best", "real_init_select"),
    ("recover.crop_curriculum=1.5", "crop_curriculum"),
    ("recover.rded_patches=0", "rded_patches"),
    ("recover.real_init_iterations=0", "real_init_iterations"),
])
def test_bad_lever_values_are_one_line_errors(override, words):
    key, value = override.split("=")
    field = key.split(".")[1]
    kwargs = {field: value if field == "real_init_select" else float(value) if "." in value else int(value)}
    with pytest.raises(ConfigError) as err:
        RecoverConfig(**kwargs)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_rded_stage_run_uses_fewer_real_iterations(run_scdd, digits_teacher, tmp_path):
    run_scdd(*FAST, f"teacher={digits_teacher}", "ipc=[1]", "recover.init=real", "recover.iterations=6",
             "recover.real_init_iterations=3", "recover.rded_crops=3", "recover.real_init_pool=8",
             "recover.crop_curriculum=0.5", run_dir=tmp_path / "a")
    out = tmp_path / "a" / "recover" / "supervised-real"
    log = (out / "loss_log.csv").read_text().splitlines()
    assert max(int(r.split(",")[1]) for r in log[1:]) == 2  # 3 refinement steps, not recover.iterations
    init = DistilledSet.open(out / "init").tensors()["images"]
    assert init.shape == (10, 1, 8, 8)
    recipe = DistilledSet.open(out).index["fingerprint"]["recover"]
    assert recipe["rded_crops"] == 3 and recipe["real_init_iterations"] == 3
