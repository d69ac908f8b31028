"""evaluate.cuda_graphs on CUDA: a student trained with its full batches replaying one captured graph of the
whole step ends where the eager training ends (same weights and losses, cuDNN deterministic), for online and
stored soft labels, hard labels with MixUp and SGD, fp32 and bf16, and an epoch's last smaller batch eager.
The CPU tier checks the step's graph readiness (tests/evaluate/test_student_graph_step.py)."""
from __future__ import annotations

import pytest
import torch

from engine.evaluate.relabel import precompute_soft_labels
from engine.evaluate.student import StudentRecipe, train_student
from engine.models import ModelConfig, build_model
from teachers import SMALL_MODEL

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
MODELS = {"convnet": SMALL_MODEL, "resnet18": ModelConfig(name="resnet18")}
BATCH, EPOCHS = 32, 2
IPC = 20  # digits32 (tests/gpu/conftest.py): 20 per class, 200 images: 6 full batches and one of 8 per epoch




def _train(digits32, model, recipe, graphs, monkeypatch, stored=None):
    bundle, train = digits32
    replays = []
    replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda self: (replays.append(1), replay(self))[1])
    torch.manual_seed(1)
    teacher = build_model(model, bundle.num_classes, 3, 32).eval()
    torch.manual_seed(2)
    student = build_model(model, bundle.num_classes, 3, 32)
    if stored is not None and not stored.exists():
        precompute_soft_labels(teacher, train, bundle.normalize, recipe, CUDA, 0, stored, topk=10, progress=False)
    result = train_student(student, train, bundle.test, bundle.normalize, recipe, CUDA, seed=0,
                           teacher=None if stored is not None else teacher, stored_labels=stored,
                           progress=False, cuda_graphs=graphs)
    monkeypatch.undo()
    return student.state_dict(), [row["loss"] for row in result.history], len(replays)


def _recipe(**options) -> StudentRecipe:
    return StudentRecipe(**{**dict(epochs=EPOCHS, batch_size=BATCH, lr=1e-3, weight_decay=0.01, temperature=4.0,
                                   loss="kl", crop_scale=(0.5, 1.0), flip=True, cutmix_prob=0.5, cutmix_alpha=1.0,
                                   eval_every=EPOCHS), **options})


def _same_training(eager, graphed, tolerance):
    (weights_a, losses_a, replays_a), (weights_b, losses_b, replays_b) = eager, graphed
    full = EPOCHS * (IPC * 10 // BATCH)
    assert replays_a == 0 and replays_b == full - 3  # 3 eager warm-up steps, then every full batch replays
    assert losses_b == pytest.approx(losses_a, rel=tolerance, abs=tolerance)
    for key, value in weights_a.items():
        if value.is_floating_point():
            assert torch.allclose(weights_b[key], value, rtol=tolerance, atol=tolerance), key


@pytest.mark.usefixtures("deterministic_cudnn")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("model", MODELS.values(), ids=MODELS.keys())
def test_graphed_student_ends_where_the_eager_one_ends(digits32, model, precision, monkeypatch):
    recipe = _recipe(precision=precision)
    _same_training(_train(digits32, model, recipe, False, monkeypatch),
                   _train(digits32, model, recipe, True, monkeypatch), 1e-5 if precision == "fp32" else 1e-3)


@pytest.mark.usefixtures("deterministic_cudnn")
def test_graphed_hard_label_mixup_with_sgd(digits32, monkeypatch):
    recipe = _recipe(loss="hard", crop="pad", mix="mixup", optimizer="sgd", lr=0.05)
    _same_training(_train(digits32, SMALL_MODEL, recipe, False, monkeypatch),
                   _train(digits32, SMALL_MODEL, recipe, True, monkeypatch), 1e-5)


@pytest.mark.usefixtures("deterministic_cudnn")
def test_graphed_student_on_stored_labels(digits32, monkeypatch, tmp_path):
    recipe = _recipe()
    stored = tmp_path / "labels"
    _same_training(_train(digits32, SMALL_MODEL, recipe, False, monkeypatch, stored),
                   _train(digits32, SMALL_MODEL, recipe, True, monkeypatch, stored), 1e-5)


@pytest.mark.usefixtures("deterministic_cudnn")
def test_graphed_lockstep_students_end_where_eager_ones_end(digits32, monkeypatch):
    """evaluate.students on one process: two models in one captured step (one teacher forward)."""
    from engine.evaluate.student import StudentJob, train_students

    bundle, train = digits32
    recipe = _recipe()
    outcomes = []
    for graphs in (False, True):
        replays = []
        replay = torch.cuda.CUDAGraph.replay
        monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda self: (replays.append(1), replay(self))[1])
        torch.manual_seed(1)
        teacher = build_model(SMALL_MODEL, bundle.num_classes, 3, 32).eval()
        students = []
        for model in MODELS.values():
            torch.manual_seed(2)
            students.append(build_model(model, bundle.num_classes, 3, 32))
        results = train_students([StudentJob(s) for s in students], train, bundle.test, bundle.normalize, recipe,
                                 CUDA, 0, teacher=teacher, progress=False, cuda_graphs=graphs)
        monkeypatch.undo()
        outcomes.append(([s.state_dict() for s in students], [r["loss"] for x in results for r in x.history],
                         len(replays)))
    (weights_a, losses_a, replays_a), (weights_b, losses_b, replays_b) = outcomes
    assert replays_a == 0 and replays_b == EPOCHS * (IPC * 10 // BATCH) - 3
    assert losses_b == pytest.approx(losses_a, rel=1e-5, abs=1e-5)
    for a, b in zip(weights_a, weights_b):
        for key, value in a.items():
            if value.is_floating_point():
                assert torch.allclose(b[key], value, rtol=1e-5, atol=1e-5), key


@pytest.mark.usefixtures("deterministic_cudnn")
@pytest.mark.parametrize("graphs", [False, True])
def test_a_set_held_on_the_gpu_trains_like_one_on_the_host(digits32, monkeypatch, graphs):
    """train_students holds a small in-memory set on the GPU (batches gathered there from indices); the
    student ends exactly where it ends when every batch is gathered on the host and copied."""
    import engine.evaluate.student as student_module
    from engine.training.batches import DeviceImages, on_device

    _, train = digits32
    assert isinstance(on_device(train, CUDA), DeviceImages)
    recipe = _recipe()
    held = _train(digits32, MODELS["convnet"], recipe, graphs, monkeypatch)
    monkeypatch.setattr(student_module, "on_device", lambda dataset, device: dataset)
    copied = _train(digits32, MODELS["convnet"], recipe, graphs, monkeypatch)
    assert held[1] == copied[1] and held[2] == copied[2]
    for key, value in held[0].items():
        assert torch.equal(copied[0][key], value), key
