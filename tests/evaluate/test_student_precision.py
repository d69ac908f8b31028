"""Student steps at speed: bf16 autocast follows fp32 closely; NHWC, foreach and the compiled forward
change nothing but rounding.

Tolerances (digits, ConvNet width 16, 5 images per class, batch 16, AdamW lr 1e-3, 8 steps, CPU bf16
autocast; measured 0.005-1.4% loss and at most 0.22 weight deviation): each step's loss within 3% of
fp32's, and every weight tensor's distance from the fp32 run at most half of how far fp32 moved it
from the common start (AdamW's normalized steps amplify the bf16 rounding of small gradients).
"""
import numpy as np
import pytest
import torch

from engine.data import DataConfig, build_data
from engine.errors import ConfigError
from engine.evaluate.settings import EvaluateConfig
from engine.evaluate.stage import random_real_subset
from engine.evaluate.student import StudentRecipe, build_optimizer, train_student
from engine.models import build_model
from teachers import SMALL_MODEL, train_digits_teacher
from recording_logger import Recorder, assert_bf16_losses_follow_fp32

pytestmark = pytest.mark.usefixtures("one_thread")

LOSS_RTOL = 0.03
WEIGHT_SHARE = 0.5


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory):
    from engine.artifacts.teacher import load_teacher

    bundle = build_data(DataConfig(name="digits"))
    teacher, _ = load_teacher(train_digits_teacher(tmp_path_factory.mktemp("t") / "teacher.pt"), SMALL_MODEL, bundle)
    return bundle, teacher.eval(), random_real_subset(bundle, 5, seed=0).dataset


def _train(digits_teacher, **options):
    bundle, teacher, train_set = digits_teacher
    recipe = StudentRecipe(epochs=2, batch_size=16, lr=1e-3, weight_decay=0.01, temperature=4.0, loss="kl",
                           crop_scale=(0.5, 1.0), flip=False, cutmix_prob=1.0, cutmix_alpha=1.0, eval_every=2,
                           **options)
    torch.manual_seed(0)
    student = build_model(SMALL_MODEL, 10, 1, 8)
    start = {k: v.clone() for k, v in student.state_dict().items()}
    recorder = Recorder()
    result = train_student(student, train_set, bundle.test, bundle.normalize, recipe, torch.device("cpu"), 0,
                           teacher=teacher, progress=False, logger=recorder)
    return student, start, recorder, result


def test_bf16_student_follows_fp32_and_keeps_fp32_state(digits_teacher):
    fp32, start, rec32, _ = _train(digits_teacher, precision="fp32")
    bf16, _, rec16, _ = _train(digits_teacher, precision="bf16")
    assert_bf16_losses_follow_fp32(rec32, rec16, 8, LOSS_RTOL)
    for key, w32 in fp32.state_dict().items():
        w16 = bf16.state_dict()[key]
        assert w16.dtype == w32.dtype, key  # weights and BN running statistics stay fp32
        if w32.is_floating_point():
            moved = (w32 - start[key]).norm()
            assert (w16 - w32).norm() <= WEIGHT_SHARE * moved + 1e-7, key


def test_bf16_optimizer_state_is_fp32(digits_teacher):
    bundle, teacher, train_set = digits_teacher
    student = build_model(SMALL_MODEL, 10, 1, 8)
    recipe = StudentRecipe(epochs=1, batch_size=16, lr=1e-3, weight_decay=0.01, temperature=4.0, loss="kl",
                           crop_scale=(0.5, 1.0), flip=False, cutmix_prob=0.0, cutmix_alpha=1.0, eval_every=1,
                           precision="bf16")
    optimizer = build_optimizer(student, recipe, torch.device("cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = student(bundle.normalize(train_set.images[:16].float() / 255))
    assert logits.dtype == torch.bfloat16
    logits.float().logsumexp(1).mean().backward()
    optimizer.step()
    states = [t for s in optimizer.state.values() for t in s.values() if t.is_floating_point() and t.ndim]
    assert states and all(t.dtype == torch.float32 for t in states)


@pytest.mark.parametrize("options", [{"channels_last": True}, {"compile": True}])
def test_layout_and_compiled_forward_match_the_default(digits_teacher, options, monkeypatch):
    if options.get("compile"):
        # Dynamo's graph capture with the eager backend: checks the wiring without a C++ compile (minutes on
        # 2 shared cores); inductor's own numerics are torch's to test.
        real_compile = torch.compile
        monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend="eager", **kw))
    base, _, rec_base, res_base = _train(digits_teacher, channels_last=False)
    other, _, rec_other, res_other = _train(digits_teacher, **options)
    np.testing.assert_allclose([v for _, v in rec_other.rows["train/loss"]],
                               [v for _, v in rec_base.rows["train/loss"]], rtol=1e-5, atol=1e-6)
    for key, w in base.state_dict().items():
        got = other.state_dict()[key]
        assert got.is_contiguous(), f"{key}: the student is handed back in the default layout"
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_foreach_optimizer_matches_the_plain_loop(digits_teacher, name):
    bundle, _, train_set = digits_teacher
    recipe = StudentRecipe(epochs=1, batch_size=16, lr=1e-2, weight_decay=0.01, temperature=4.0, loss="hard",
                           crop_scale=(1.0, 1.0), flip=False, cutmix_prob=0.0, cutmix_alpha=1.0, eval_every=1,
                           optimizer=name, decay_norm_and_bias=False)
    torch.manual_seed(0)
    a = build_model(SMALL_MODEL, 10, 1, 8)
    b = build_model(SMALL_MODEL, 10, 1, 8)
    b.load_state_dict(a.state_dict())
    plain, foreach = build_optimizer(a, recipe), build_optimizer(b, recipe, torch.device("cpu"))
    assert foreach.defaults["foreach"] is True and not plain.defaults.get("foreach")
    x = bundle.normalize(train_set.images.float() / 255)
    y = torch.as_tensor(train_set.labels)
    for step in range(4):
        rows = slice(16 * step, 16 * step + 16)
        for model, optimizer in ((a, plain), (b, foreach)):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
            optimizer.step()
    for (key, wa), wb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(wb, wa, rtol=1e-5, atol=1e-6, msg=key)


def test_precision_setting_is_checked():
    assert EvaluateConfig().precision == "auto"
    with pytest.raises(ConfigError, match="evaluate.precision='fp16' is not one of auto|fp32|bf16"):
        EvaluateConfig(precision="fp16")


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_and_nhwc_on_a_cpu_with_native_bf16_only(monkeypatch, native):
    """auto: bf16 on CUDA always, on the CPU only where oneDNN has native bf16 (emulated bf16 is slower
    than fp32); the layout follows the precision on the CPU (bf16 kernels want NHWC), and an explicit
    channels_last wins."""
    from engine.training import precision as rules

    monkeypatch.setattr(rules, "cpu_has_native_bf16", lambda: native)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # only the device type is read
    assert rules.resolve_precision("auto", cuda) == "bf16"
    assert rules.resolve_precision("auto", cpu) == ("bf16" if native else "fp32")
    assert rules.resolve_precision("fp32", cuda) == "fp32" and rules.resolve_precision("bf16", cpu) == "bf16"
    assert rules.use_channels_last(None, cpu, "auto") is native
    assert rules.use_channels_last(None, cpu, "fp32") is False and rules.use_channels_last(None, cuda, "fp32")
    assert rules.use_channels_last(False, cpu, "bf16") is False


def test_stored_labels_replay_online_ones_under_bf16_and_nhwc(digits_teacher, tmp_path):
    """Stored relabeling runs the teacher as the online step does (autocast and layout), so a student
    trained on stored labels (all classes kept, fp32) follows the online one step for step."""
    from engine.evaluate.relabel import precompute_soft_labels

    bundle, teacher, train_set = digits_teacher
    recipe = StudentRecipe(epochs=2, batch_size=16, lr=1e-3, weight_decay=0.01, temperature=4.0, loss="kl",
                           crop_scale=(0.5, 1.0), flip=False, cutmix_prob=1.0, cutmix_alpha=1.0, eval_every=2,
                           precision="bf16", channels_last=True)
    precompute_soft_labels(teacher, train_set, bundle.normalize, recipe, torch.device("cpu"), 0, tmp_path / "labels",
                           topk=10, dtype="float32", progress=False)
    losses = []
    for stored in (None, tmp_path / "labels"):
        torch.manual_seed(0)
        recorder = Recorder()
        train_student(build_model(SMALL_MODEL, 10, 1, 8), train_set, bundle.test, bundle.normalize, recipe,
                      torch.device("cpu"), 0, teacher=teacher if stored is None else None, stored_labels=stored,
                      progress=False, logger=recorder)
        losses.append([v for _, v in recorder.rows["train/loss"]])
    assert len(losses[0]) == len(losses[1]) > 0
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-4)
