"""The student options the official recipes need: param groups, SGD, MixUp labelled by the teacher on the
mixed batch, CIFAR's pad-and-crop, the cosine's floor, the T^2 switch, and their one-line config errors."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from engine.data import DataConfig, build_data
from engine.errors import ConfigError
from engine.evaluate.augment import apply_params, sample_params, step_rng
from engine.evaluate.settings import EvaluateConfig
from engine.evaluate.student import StudentRecipe, build_optimizer, student_lr, train_student
from engine.models import build_model
from engine.training.batches import epoch_order, to_unit_float
from engine.training.schedule import cosine_lr
from realdata import foolbox_samples
from teachers import SMALL_MODEL

pytestmark = pytest.mark.usefixtures("one_thread")


def _recipe(**kw):
    base = dict(epochs=1, batch_size=32, lr=1e-3, weight_decay=0.01, temperature=4.0, loss="kl",
                crop_scale=(0.5, 1.0), flip=False, cutmix_prob=1.0, cutmix_alpha=1.0, eval_every=1)
    base.update(kw)
    return StudentRecipe(**base)


def cifar_images(count: int) -> torch.Tensor:
    """Real CIFAR-10 photos (foolbox's samples) as float [count, 3, 32, 32] in [0, 1]."""
    from PIL import Image

    arrays = [np.asarray(Image.open(path).convert("RGB")) for path, _ in foolbox_samples("cifar10")[:count]]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


@pytest.fixture(scope="module")
def digits():
    return build_data(DataConfig(name="digits"))


def _model(bundle, seed=0):
    torch.manual_seed(seed)
    return build_model(SMALL_MODEL, bundle.num_classes, bundle.channels, bundle.image_size)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_no_weight_decay_on_batchnorm_and_bias(digits, optimizer):
    model = _model(digits)
    opt = build_optimizer(model, _recipe(optimizer=optimizer, lr=0.1, weight_decay=0.5, decay_norm_and_bias=False))
    assert isinstance(opt, torch.optim.SGD if optimizer == "sgd" else torch.optim.AdamW)
    norm_or_bias = {name for name, p in model.named_parameters() if p.ndim == 1}
    assert any(".bias" in n for n in norm_or_bias) and any("weight" in n for n in norm_or_bias)  # BN scales too
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # a zero gradient: only weight decay moves a parameter
    for name, p in model.named_parameters():
        if name in norm_or_bias:
            assert torch.equal(p, before[name]), name
        else:
            assert torch.allclose(p, before[name] * (1 - 0.1 * 0.5)), name
    decay_all = build_optimizer(model, _recipe(optimizer=optimizer, weight_decay=0.5))
    assert [g["weight_decay"] for g in decay_all.param_groups] == [0.5]


def test_mixup_blends_partner_images():
    params = sample_params(step_rng(1, 0, 0), 6, 32, (0.5, 1.0), False, 1.0, 1.0, crop="pad", pad=0, mix="mixup",
                           mixup_alpha=0.8)
    assert params.cutmix_partner is None and 0 < params.mixup_lam < 1
    assert not np.array_equal(params.mixup_partner, np.arange(6))
    x = cifar_images(6)
    out = apply_params(x, params)
    partner = torch.from_numpy(params.mixup_partner)
    assert torch.allclose(out, params.mixup_lam * x + (1 - params.mixup_lam) * x[partner], atol=1e-6)
    assert params.partner is params.mixup_partner and params.lam == params.mixup_lam


def test_mixup_teacher_labels_the_mixed_batch_the_student_sees(digits):
    recipe = _recipe(mix="mixup", crop="pad", crop_padding=4, flip=True, lr_per="epoch")
    student, teacher = _model(digits, 0), _model(digits, 1).eval()
    seen = {"student": [], "teacher": []}
    student.register_forward_pre_hook(lambda m, a: seen["student"].append(a[0].clone()) if m.training else None)
    teacher.register_forward_pre_hook(lambda m, a: seen["teacher"].append(a[0].clone()))
    train_set = torch.utils.data.Subset(digits.train, range(64))
    train_set.images, train_set.labels = digits.train.images[:64], digits.train.labels[:64]
    train_student(student, train_set, digits.test, digits.normalize, recipe, torch.device("cpu"), seed=5,
                  teacher=teacher, progress=False)
    assert len(seen["student"]) == 2
    for a, b in zip(seen["student"], seen["teacher"]):
        assert torch.equal(a, b)
    # the first batch, rebuilt: its pad-cropped, flipped views blended with their MixUp partners
    order = epoch_order(5, 0, 64)[:32]
    images = digits.normalize(to_unit_float(digits.train.images[torch.from_numpy(order)]))
    params = recipe.sample(step_rng(5, 0, 0), 32, digits.image_size)
    fill = digits.normalize(torch.zeros(1, digits.channels, 1, 1))
    expected = apply_params(images, params, fill)
    assert params.mixup_partner is not None and torch.allclose(seen["student"][0], expected, atol=1e-6)
    unmixed = apply_params(images, params.__class__(boxes=params.boxes, flips=params.flips, pad=params.pad), fill)
    assert not torch.allclose(expected, unmixed)


def test_pad_crop_keeps_size_and_shifts_with_a_black_border():
    x = cifar_images(5)
    params = sample_params(step_rng(0, 0, 0), 5, 32, (0.5, 1.0), False, 0.0, 1.0, crop="pad", pad=4, mix="none")
    fill = torch.tensor([-1.0, -2.0, -3.0]).view(1, 3, 1, 1)  # a black pixel, normalized
    out = apply_params(x, params, fill)
    assert out.shape == x.shape and params.mixup_partner is None and params.cutmix_partner is None
    assert ((params.boxes[:, :2] >= 0) & (params.boxes[:, :2] <= 8)).all() and (params.boxes[:, 2:] == 32).all()
    assert len({tuple(b) for b in params.boxes[:, :2].tolist()}) > 1
    for i, (top, left, _, _) in enumerate(params.boxes.tolist()):
        canvas = fill.expand(1, 3, 40, 40).clone()[0]
        canvas[:, 4:36, 4:36] = x[i]
        assert torch.equal(out[i], canvas[:, top:top + 32, left:left + 32]), i


def test_cosine_floor_is_the_cifar_scripts_schedule_and_zero_floor_is_todays():
    cifar = _recipe(epochs=200, lr=1e-3, lr_floor=0.75, lr_per="epoch")
    for epoch in (0, 1, 57, 199):  # post_cifar100.py: LambdaLR 0.5 (1 + cos(pi e / 300 / 2)), stepped per epoch
        expected = 1e-3 * 0.5 * (1 + math.cos(math.pi * epoch / 300 / 2))
        assert student_lr(cifar, epoch, 3, 10) == pytest.approx(expected, rel=1e-9)
    assert student_lr(cifar, 199, 0, 10) == pytest.approx(0.75e-3, rel=0.01)
    plain = _recipe(epochs=7, lr=0.3)
    for epoch, step in ((0, 0), (3, 2), (6, 4)):
        assert student_lr(plain, epoch, step, 5) == cosine_lr(epoch * 5 + step, 35, 0.3)
    warm = _recipe(epochs=10, lr=0.2, warmup_epochs=5, lr_per="epoch")
    assert [student_lr(warm, e, 0, 9) for e in (0, 4, 5)] == pytest.approx([0.04, 0.2, 0.2])


def test_temperature_squared_scales_the_soft_label_loss(digits):
    class Constant(nn.Module):
        def forward(self, x):
            return torch.linspace(-1, 1, 10).expand(len(x), 10)

    train_set = torch.utils.data.Subset(digits.train, range(32))
    train_set.images, train_set.labels = digits.train.images[:32], digits.train.labels[:32]
    losses = []
    for squared in (False, True):
        result = train_student(_model(digits), train_set, digits.test, digits.normalize,
                               _recipe(temperature=3.0, temperature_squared=squared, mix="none"),
                               torch.device("cpu"), seed=0, teacher=Constant(), progress=False)
        losses.append(result.history[0]["loss"])
    assert losses[1] == pytest.approx(9.0 * losses[0], rel=1e-5)


@pytest.mark.parametrize("override,message", [
    ({"optimizer": "lamb"}, "evaluate.optimizer='lamb'"),
    ({"mix": "mosaic"}, "evaluate.mix='mosaic'"),
    ({"crop": "center"}, "evaluate.crop='center'"),
    ({"lr_floor": 1.0}, "evaluate.lr_floor=1.0"),
    ({"lr_per": "batch"}, "evaluate.lr_per='batch'"),
    ({"mixup_alpha": 0.0}, "evaluate.mixup_alpha=0.0"),
    ({"warmup_epochs": 200}, "evaluate.warmup_epochs=200"),
])
def test_bad_student_options_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        EvaluateConfig(**override)
    assert "\n" not in str(info.value)


def test_every_student_option_reaches_the_recipe(digits):
    from engine.evaluate.stage import make_recipe

    options = dict(optimizer="sgd", momentum=0.8, decay_norm_and_bias=False, warmup_epochs=5, lr_floor=0.75,
                   lr_per="epoch", temperature_squared=True, mix="mixup", mixup_alpha=0.5, crop="pad",
                   crop_padding=2)
    recipe = make_recipe(EvaluateConfig(epochs=20, **options), digits)
    assert {key: getattr(recipe, key) for key in options} == options
    assert make_recipe(EvaluateConfig(epochs=20, warmup_epochs=5), digits, epochs=3).warmup_epochs == 2
