"""Relabel/evaluate: KL values, CutMix mixing, online vs stored equivalence, students beat chance."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.data import DataConfig, build_data
from engine.errors import ConfigError
from engine.evaluate.augment import apply_params, sample_params, step_rng
from engine.evaluate.losses import mixed_cross_entropy, soft_label_kl
from engine.evaluate.relabel import precompute_soft_labels
from engine.evaluate.settings import EvaluateConfig
from engine.evaluate.stage import random_real_subset
from engine.evaluate.student import StudentRecipe, evaluate_accuracy, train_student
from engine.models import build_model
from teachers import SMALL_MODEL, train_digits_teacher


def test_kl_known_values():
    s = torch.tensor([[1.0, 2.0, 3.0]])
    assert float(soft_label_kl(s, s.clone(), 4.0)) == pytest.approx(0.0, abs=1e-7)
    t = torch.tensor([[3.0, 0.0, -1.0]])
    p = F.softmax(t / 2, 1)
    q = F.softmax(s / 2, 1)
    expected = float((p * (p.log() - q.log())).sum())
    assert float(soft_label_kl(s, t, 2.0)) == pytest.approx(expected, rel=1e-6)
    # stored top-k: classes outside it carry zero probability and contribute nothing
    t_topk = torch.tensor([[3.0, 0.0, -math.inf]])
    p2 = F.softmax(t_topk / 2, 1)
    expected2 = float((p2[:, :2] * (p2[:, :2].log() - q[:, :2].log())).sum())
    assert float(soft_label_kl(s, t_topk, 2.0)) == pytest.approx(expected2, rel=1e-6)


def test_cutmix_pastes_partner_pixels_and_mixes_labels():
    rng = step_rng(3, 0, 0)
    params = sample_params(rng, 6, 16, (1.0, 1.0), False, cutmix_prob=1.0, cutmix_alpha=1.0)
    assert params.cutmix_partner is not None
    x = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 1, 16, 16).contiguous()
    out = apply_params(x, params)
    top, bottom, left, right = params.cutmix_box
    area = (bottom - top) * (right - left) / 256
    assert params.cutmix_lam == pytest.approx(1 - area)
    for i, j in enumerate(params.cutmix_partner):
        own = (out[i] == i).float().mean().item()
        assert own == pytest.approx(params.cutmix_lam if i != j else 1.0)
    logits = torch.randn(6, 4)
    y, y2 = torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([1, 1, 0, 2, 3, 3])
    lam = 0.3
    expected = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y2)
    assert torch.allclose(mixed_cross_entropy(logits, y, y2, lam), expected)
    assert torch.allclose(mixed_cross_entropy(logits, y, y2, 1.0), F.cross_entropy(logits, y))


def _recipe(**kw):
    base = dict(epochs=3, batch_size=16, lr=1e-3, weight_decay=0.01, temperature=4.0, loss="kl",
                crop_scale=(0.5, 1.0), flip=False, cutmix_prob=1.0, cutmix_alpha=1.0, eval_every=3)
    base.update(kw)
    return StudentRecipe(**base)


@pytest.fixture(scope="module")
def digits_and_teacher(tmp_path_factory):
    from engine.artifacts.teacher import load_teacher

    bundle = build_data(DataConfig(name="digits"))
    path = train_digits_teacher(tmp_path_factory.mktemp("t") / "teacher.pt")
    teacher, _ = load_teacher(path, SMALL_MODEL, bundle)
    return bundle, teacher.eval()


def test_online_and_stored_relabel_give_the_same_student(digits_and_teacher, tmp_path):
    bundle, teacher = digits_and_teacher
    train_set = random_real_subset(bundle, 5, seed=0).dataset
    recipe = _recipe()
    device = torch.device("cpu")
    torch.manual_seed(0)
    online = build_model(SMALL_MODEL, 10, 1, 8)
    res_online = train_student(online, train_set, bundle.test, bundle.normalize, recipe, device, 0,
                               teacher=teacher, progress=False)
    # all 10 logits kept in fp32: the replayed labels are exactly the online ones
    storage = precompute_soft_labels(teacher, train_set, bundle.normalize, recipe, device, 0, tmp_path / "lab",
                                     topk=10, dtype="float32", progress=False)
    torch.manual_seed(0)
    stored = build_model(SMALL_MODEL, 10, 1, 8)
    res_stored = train_student(stored, train_set, bundle.test, bundle.normalize, recipe, device, 0,
                               stored_labels=tmp_path / "lab", progress=False)
    for (k, a), (_, b) in zip(online.state_dict().items(), stored.state_dict().items()):
        assert torch.equal(a, b), k
    assert res_online.top1 == res_stored.top1
    assert storage["bytes_per_image_epoch"] > 0
    # the compact fp16 top-k files are smaller per image-epoch than full fp32 logits
    small = precompute_soft_labels(teacher, train_set, bundle.normalize, recipe, device, 0, tmp_path / "lab16",
                                   topk=3, dtype="float16", progress=False)
    assert small["bytes_per_image_epoch"] < storage["bytes_per_image_epoch"]


def test_students_beat_chance_on_real_data(digits_and_teacher):
    bundle, teacher = digits_and_teacher
    recipe = _recipe(epochs=4, batch_size=64, loss="hard", cutmix_prob=0.0, crop_scale=(1.0, 1.0))
    student = build_model(SMALL_MODEL, 10, 1, 8)
    result = train_student(student, bundle.train, bundle.test, bundle.normalize, recipe, torch.device("cpu"), 0,
                           progress=False)
    assert result.top1 > 0.5
    assert evaluate_accuracy(student, bundle.test, bundle.normalize, torch.device("cpu"))[0] == result.top1
    soft = build_model(SMALL_MODEL, 10, 1, 8)
    res_soft = train_student(soft, random_real_subset(bundle, 10, 0).dataset, bundle.test, bundle.normalize,
                             _recipe(epochs=30, eval_every=30, lr=1e-2, cutmix_prob=0.0, crop_scale=(1.0, 1.0)),
                             torch.device("cpu"), 0, teacher=teacher,
                             progress=False)
    assert res_soft.top1 > 0.5


def test_random_real_subset_is_stratified_and_seeded():
    bundle = build_data(DataConfig(name="digits"))
    a, b, c = (random_real_subset(bundle, 3, s) for s in (0, 0, 1))
    assert np.bincount(a.dataset.labels).tolist() == [3] * 10
    assert torch.equal(a.dataset.images, b.dataset.images) and not torch.equal(a.dataset.images, c.dataset.images)
    assert a.digest == b.digest != c.digest  # the digest names the subset in the row's fingerprint
    # served through the PNG codec: 8-bit copies of real training images
    assert a.dataset.images.dtype == torch.uint8
    assert any(torch.equal(a.dataset.images[0], img) for img in bundle.train.images)


@pytest.mark.parametrize("kw,message", [({"loss": "mse"}, "kl|hard"), ({"relabel": "cached"}, "online|stored"),
                                        ({"temperature": 0}, "temperature"), ({"epochs": 0}, "epochs")])
def test_bad_evaluate_config(kw, message):
    with pytest.raises(ConfigError, match=message):
        EvaluateConfig(**kw)
