"""Oracle: relabel/KD steps of the engine's student training against a plain re-statement of the script.

The oracle restates SC-DD's ImageNet student loop (SCDD/imagenet_code/post_train/train_kd.py and its
utils.py in the VILA-Lab/SRe2L repo): per-image random-resized crop + flip, normalize, CutMix of the
batch (images[:, :, box] = images[rand_index, :, box]), the teacher labelling the *mixed* batch,
loss = KLDivLoss(batchmean)(log_softmax(student / T), softmax(teacher / T)) with no T^2 (ImageNet
script), AdamW (betas 0.9, 0.999, eps 1e-8), and the per-epoch cosine (--cos) lr.

Crop boxes, flips, CutMix partners and box, and the epoch order come from the engine's own samplers
(same seed): the oracle checks what is done with them. Deliberate differences, restated as the engine:
  * crop: the script crops a PIL image and resizes it; the engine samples the box bilinearly in the
    whole image (torchvision roi_align, aligned=True, one sample per output pixel), so the crop's
    outermost half pixel blends with the pixels just outside the box. The oracle restates that with
    grid_sample (border padding) at the same sample points.
  * CutMix every batch with probability ``cutmix_prob`` (1 here: the script mixes every batch).
  * lr per step, cosine over all steps; with one step per epoch (as here) it is the script's per-epoch
    cosine. Weight decay is 0 here: which parameters decay is the optimizer's part, tested with it.
  * MixUp (evaluate.mix=mixup, the CIFAR script's mix_aug): every batch, images = lam x + (1 - lam) x[perm].
"""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.artifacts.teacher import load_teacher
from engine.data import DataConfig, build_data
from engine.evaluate.augment import step_rng
from engine.evaluate.stage import random_real_subset
from engine.evaluate.student import StudentRecipe, train_student
from engine.models import build_model
from engine.training.batches import epoch_order
from teachers import SMALL_MODEL, train_digits_teacher

pytestmark = pytest.mark.usefixtures("one_thread")

SEED = 3
T = 20.0
LR = 1e-2
EPOCHS = 2


def oracle_crop_flip(x: torch.Tensor, boxes: np.ndarray, flips: np.ndarray) -> torch.Tensor:
    """Each image's box (top, left, height, width) sampled bilinearly at size x size output pixels:
    output (i, j) reads source (top + (i + 0.5) h / size - 0.5, left + (j + 0.5) w / size - 0.5),
    clamped to the image; then the flipped ones mirrored."""
    n, _, height, width = x.shape
    grids = []
    for top, left, h, w in boxes.astype(np.float64):
        ys = top + (torch.arange(height, dtype=torch.float64) + 0.5) * h / height - 0.5
        xs = left + (torch.arange(width, dtype=torch.float64) + 0.5) * w / width - 0.5
        gy, gx = torch.meshgrid((ys + 0.5) / height * 2 - 1, (xs + 0.5) / width * 2 - 1, indexing="ij")
        grids.append(torch.stack([gx, gy], -1))
    out = F.grid_sample(x.double(), torch.stack(grids), mode="bilinear", padding_mode="border",
                        align_corners=False).float()
    flip = torch.from_numpy(flips).view(-1, 1, 1, 1)
    return torch.where(flip, out.flip(-1), out)


def oracle_train(student, teacher, train_set, normalize, recipe: StudentRecipe, betas=(0.9, 0.999),
                 t_squared=False, teacher_on_clean=False):
    """The script's loop for ``recipe.epochs`` epochs of one batch each; returns the step losses."""
    optimizer = torch.optim.AdamW(student.parameters(), lr=recipe.lr, betas=betas, eps=1e-8,
                                  weight_decay=recipe.weight_decay)
    loss_function_kl = nn.KLDivLoss(reduction="batchmean")
    size = train_set.images.shape[-1]
    losses = []
    for epoch in range(recipe.epochs):
        for group in optimizer.param_groups:  # LambdaLR(0.5 (1 + cos(pi epoch / epochs))), stepped per epoch
            group["lr"] = recipe.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / recipe.epochs))
        order = epoch_order(SEED, epoch, len(train_set))
        params = recipe.sample(step_rng(SEED, epoch, 0), len(order), size)
        data = normalize(oracle_crop_flip(train_set.images[order].float() / 255, params.boxes, params.flips))
        clean = data.clone()
        if recipe.mix == "mixup":  # utils.mixup
            lam, rand_index = params.mixup_lam, torch.from_numpy(params.mixup_partner)
            data = lam * data + (1 - lam) * data[rand_index]
        else:  # utils.cutmix
            top, bottom, left, right = params.cutmix_box
            data[:, :, top:bottom, left:right] = data[params.cutmix_partner, :, top:bottom, left:right]
        student.train()
        output = student(data)
        soft_label = teacher(clean if teacher_on_clean else data).detach()
        loss = loss_function_kl(F.log_softmax(output / recipe.temperature, dim=1),
                                F.softmax(soft_label / recipe.temperature, dim=1))
        if t_squared:
            loss = loss * recipe.temperature ** 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module", params=["cutmix", "mixup"])
def setup(tmp_path_factory, request):
    bundle = build_data(DataConfig(name="digits"))
    teacher, _ = load_teacher(train_digits_teacher(tmp_path_factory.mktemp("t") / "teacher.pt"), SMALL_MODEL,
                              bundle)
    teacher.eval()
    train_set = random_real_subset(bundle, 3, seed=0).dataset  # 30 real digits, uint8
    recipe = StudentRecipe(epochs=EPOCHS, batch_size=len(train_set), lr=LR, weight_decay=0.0, temperature=T,
                           loss="kl", crop_scale=(0.5, 1.0), flip=True, cutmix_prob=1.0, cutmix_alpha=1.0,
                           eval_every=EPOCHS, mix=request.param)
    torch.manual_seed(1)
    initial = build_model(SMALL_MODEL, 10, 1, 8)
    engine_student = copy.deepcopy(initial)
    result = train_student(engine_student, train_set, bundle.test, bundle.normalize, recipe, torch.device("cpu"),
                           SEED, teacher=teacher, progress=False)
    return bundle, teacher, train_set, recipe, initial, engine_student, result


def test_kd_steps_match_the_script(setup):
    bundle, teacher, train_set, recipe, initial, engine_student, result = setup
    student = copy.deepcopy(initial)
    losses = oracle_train(student, teacher, train_set, bundle.normalize, recipe)
    assert [row["loss"] for row in result.history] == pytest.approx(losses, rel=1e-5)
    moved = max(float((a - b).abs().max()) for a, b in zip(initial.state_dict().values(),
                                                            student.state_dict().values()))
    assert moved > 5e-3
    for (name, a), b in zip(engine_student.state_dict().items(), student.state_dict().values()):
        # BN running statistics included: the student trains in train mode on the mixed batch
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4, msg=name)


@pytest.mark.parametrize("change", [{"t_squared": True}, {"teacher_on_clean": True}])
def test_the_oracle_tells_loss_variants_apart(setup, change):
    """T^2 (the Tiny-ImageNet script) and a teacher on the unmixed batch give other losses."""
    bundle, teacher, train_set, recipe, initial, _, result = setup
    losses = oracle_train(copy.deepcopy(initial), teacher, train_set, bundle.normalize, recipe, **change)
    assert abs(losses[0] - result.history[0]["loss"]) > 1e-3 * abs(result.history[0]["loss"])


def test_the_oracle_tells_optimizer_settings_apart(setup):
    bundle, teacher, train_set, recipe, initial, engine_student, _ = setup
    student = copy.deepcopy(initial)
    oracle_train(student, teacher, train_set, bundle.normalize, recipe, betas=(0.5, 0.9))
    assert max(float((a - b).abs().max()) for a, b in zip(engine_student.state_dict().values(),
                                                          student.state_dict().values())) > 1e-3
