"""The student step is ready for CUDA graph capture (evaluate.cuda_graphs), checked without a GPU.

A captured graph replays the operations of the one step it recorded, so every step must run the same
operations on tensors of the same shapes whatever its batch drew: CutMix or not, which partners, which box,
which lam. Here each recipe's steps are traced on the CPU (every aten operation with its output shapes and
dtypes) and compared; the draws differ between the steps, the traces must not. An unmixed batch goes through
the mixing operations as an identity, exactly. The GPU tier (tests/gpu/test_student_graphs_cuda.py) captures
and replays the step and compares whole trainings with the eager ones.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.errors import ConfigError
from engine.evaluate.augment import apply_moved, apply_params, mix_kind, param_tensors, sample_params, step_rng
from engine.evaluate.losses import mixed_cross_entropy
from engine.evaluate.settings import EvaluateConfig
from engine.evaluate.student import StudentRecipe, check_cuda_graphs, train_student
from engine.training.graphs import plain_lr
from engine.models import build_model
from op_trace import OpTrace
from sync_steps import BATCH, cifar_bundle, student_step
from teachers import SMALL_MODEL

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return cifar_bundle(tmp_path_factory.mktemp("cifar"))


RECIPES = {
    "rrc-cutmix-kl": dict(loss="kl", crop="rrc", mix="cutmix", cutmix_prob=0.5),
    "rrc-cutmix-hard": dict(loss="hard", crop="rrc", mix="cutmix", cutmix_prob=0.5),
    "pad-mixup-hard": dict(loss="hard", crop="pad", mix="mixup"),
    "pad-none-kl": dict(loss="kl", crop="pad", mix="none"),
}


@pytest.mark.parametrize("options", RECIPES.values(), ids=RECIPES.keys())
def test_every_draw_runs_the_same_operations(cifar, options):
    step = student_step(cifar, CPU, SMALL_MODEL, **options)
    recipe = StudentRecipe(epochs=1, batch_size=BATCH, lr=1e-3, weight_decay=0.01, temperature=4.0,
                           crop_scale=(0.5, 1.0), flip=True, cutmix_alpha=1.0, eval_every=1,
                           **{"cutmix_prob": 1.0, **options})
    steps = 8
    draws = [recipe.sample(step_rng(0, 0, i), BATCH, cifar.image_size) for i in range(steps)]
    if options["mix"] == "cutmix":  # the steps compared include mixed and unmixed batches
        assert {mix_kind(d) for d in draws[1:]} == {"cutmix", "none"}
    assert len({d.boxes.tobytes() for d in draws}) == steps
    step()  # the first step creates the optimizer's state: its own operations
    traces = []
    for _ in range(steps - 1):
        with OpTrace() as trace:
            loss = step()
        assert torch.isfinite(loss)
        traces.append(trace.ops)
    assert len(traces[0]) > 50
    for i, ops in enumerate(traces[1:], start=2):
        assert ops == traces[0], f"step {i} ran other operations than step 1"


@pytest.mark.parametrize("mix", ["cutmix", "mixup"])
def test_an_unmixed_batch_passes_the_mixing_operations_unchanged(cifar, mix):
    x = cifar.normalize(cifar.train.images[:BATCH].float() / 255)
    for step in range(3):
        params = sample_params(step_rng(4, 0, step), BATCH, 32, (0.08, 1.0), True, 0.0, 1.0, mix="cutmix")
        assert mix_kind(params) == "none"
        ints, floats = param_tensors(params)
        assert torch.equal(ints[:, 5], torch.arange(BATCH)) and floats.tolist() == [0, 0, 0, 0, 1, 0]
        assert torch.equal(apply_moved(x, (ints, floats), mix, 0), apply_params(x, params))
    logits, labels = torch.randn(BATCH, 10), torch.randint(0, 10, (BATCH,))
    assert torch.equal(mixed_cross_entropy(logits, labels, labels, floats[4], floats[5]),
                       F.cross_entropy(logits, labels))


def test_lam_and_its_rest_are_rounded_from_float64():
    params = sample_params(np.random.default_rng(0), BATCH, 32, (0.08, 1.0), True, 1.0, 1.0, mix="mixup")
    floats = param_tensors(params)[1]
    assert floats[4].item() == np.float32(params.lam) and floats[5].item() == np.float32(1.0 - params.lam)
    cut = sample_params(np.random.default_rng(1), BATCH, 32, (0.08, 1.0), True, 1.0, 1.0)
    assert mix_kind(cut) == "cutmix" and param_tensors(cut)[1][:4].tolist() == list(cut.cutmix_box)


def test_cuda_graphs_are_refused_where_they_cannot_run(cifar):
    recipe = StudentRecipe(epochs=1, batch_size=BATCH, lr=1e-3, weight_decay=0.0, temperature=4.0, loss="hard",
                           crop_scale=(0.5, 1.0), flip=False, cutmix_prob=0.0, cutmix_alpha=1.0, eval_every=1)
    student = build_model(SMALL_MODEL, 10, 3, 32)
    with pytest.raises(ConfigError, match=r"evaluate.cuda_graphs=true needs a CUDA device \(this run is on cpu\); "
                                          r"set evaluate.cuda_graphs=false"):
        train_student(student, cifar.train, cifar.test, cifar.normalize, recipe, CPU, 0, cuda_graphs=True,
                      progress=False)
    with pytest.raises(ConfigError, match="this run has 2 ranks"):
        check_cuda_graphs(torch.device("cuda"), 2)
    with pytest.raises(ConfigError, match="evaluate.cuda_graphs=true and evaluate.compile=true are both set"):
        EvaluateConfig(cuda_graphs=True, compile=True)


def test_a_checkpoint_holds_the_lr_as_a_number():
    lr = torch.tensor(0.25)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    optimizer.param_groups[0]["lr"] = lr
    state = plain_lr(optimizer.state_dict())
    assert state["param_groups"][0]["lr"] == 0.25 and type(state["param_groups"][0]["lr"]) is float
