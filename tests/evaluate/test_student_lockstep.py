"""Students of several models on one set (evaluate.students) train in lockstep: each batch is augmented and
labelled by the teacher once, and every student ends bit-identical to its training alone (weights, history),
also when the students resume from different epochs."""
from __future__ import annotations

import pytest
import torch

from engine.data import DataConfig, build_data
from engine.evaluate.stage import random_real_subset
from engine.evaluate.student import StudentJob, StudentRecipe, train_student, train_students
from engine.models import ModelConfig, build_model
from teachers import SMALL_MODEL, train_digits_teacher

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
MODELS = (SMALL_MODEL, ModelConfig(name="convnet", width=8, depth=1))
RECIPES = {
    "online-kl-cutmix": dict(loss="kl"),
    "hard-pad-mixup": dict(loss="hard", crop="pad", mix="mixup"),
}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from engine.artifacts.teacher import load_teacher

    bundle = build_data(DataConfig(name="digits"))
    teacher, _ = load_teacher(train_digits_teacher(tmp_path_factory.mktemp("t") / "teacher.pt"), SMALL_MODEL, bundle)
    return bundle, random_real_subset(bundle, 5, seed=0).dataset, teacher.eval()


def _recipe(**options) -> StudentRecipe:
    # 50 images, batch 16: 3 full batches and one of 2 per epoch
    return StudentRecipe(**{**dict(epochs=4, batch_size=16, lr=1e-2, weight_decay=0.01, temperature=4.0, loss="kl",
                                   crop_scale=(0.5, 1.0), flip=True, cutmix_prob=0.5, cutmix_alpha=1.0,
                                   eval_every=2), **options})


def _model(cfg: ModelConfig) -> torch.nn.Module:
    torch.manual_seed(3)
    return build_model(cfg, 10, 1, 8)


def _teacher_calls(teacher) -> tuple[list, object]:
    calls = []
    return calls, teacher.register_forward_hook(lambda *_: calls.append(1))


@pytest.mark.parametrize("options", RECIPES.values(), ids=RECIPES.keys())
def test_students_in_lockstep_end_where_each_ends_alone(digits, options):
    bundle, train_set, teacher = digits
    recipe = _recipe(**options)
    alone = []
    for cfg in MODELS:
        student = _model(cfg)
        result = train_student(student, train_set, bundle.test, bundle.normalize, recipe, CPU, 0, teacher=teacher,
                               progress=False)
        alone.append((student.state_dict(), result))
    together = [_model(cfg) for cfg in MODELS]
    calls, hook = _teacher_calls(teacher)
    results = train_students([StudentJob(s) for s in together], train_set, bundle.test, bundle.normalize, recipe,
                             CPU, 0, teacher=teacher, progress=False)
    hook.remove()
    steps = recipe.epochs * 4
    if recipe.loss == "kl":  # one teacher forward per step for both students (plus none for the tests)
        assert len(calls) == steps
    for student, result, (weights, single) in zip(together, results, alone):
        for key, value in weights.items():
            assert torch.equal(student.state_dict()[key], value), key
        assert result.history == single.history and result.top1 == single.top1


def test_students_resuming_from_other_epochs_train_in_groups(digits, tmp_path):
    bundle, train_set, teacher = digits
    recipe = _recipe()
    first = _model(MODELS[0])
    # a full run leaves its last checkpoint (epoch 3 of 4) behind: the job resumes from there
    train_student(first, train_set, bundle.test, bundle.normalize, recipe, CPU, 0, teacher=teacher, progress=False,
                  checkpoint=tmp_path / "first.pt", fingerprint={"row": "a"})
    finished = first.state_dict()
    second_alone = _model(MODELS[1])
    train_student(second_alone, train_set, bundle.test, bundle.normalize, recipe, CPU, 0, teacher=teacher,
                  progress=False)
    jobs = [StudentJob(_model(MODELS[0]), tmp_path / "first.pt", {"row": "a"}),
            StudentJob(_model(MODELS[1]), tmp_path / "second.pt", {"row": "b"})]
    results = train_students(jobs, train_set, bundle.test, bundle.normalize, recipe, CPU, 0, teacher=teacher,
                             progress=False)
    assert [len(r.history) for r in results] == [4, 4]
    for key, value in finished.items():
        assert torch.equal(jobs[0].student.state_dict()[key], value), key
    for key, value in second_alone.state_dict().items():
        assert torch.equal(jobs[1].student.state_dict()[key], value), key
