"""Every resumable artifact is reused only when its fingerprint matches; a changed setting with
resume=true is refused in one line that names the artifact and the key, never silently reused."""
from __future__ import annotations

import pytest
import torch

from engine.artifacts import soft_labels
from engine.artifacts import student as student_artifacts
from engine.artifacts.distilled import DistilledSet
from engine.artifacts.fingerprint import StaleArtifact, differences, digest
from engine.artifacts.teacher import read_teacher
from engine.data import DataConfig, build_data
from engine.evaluate.student import StudentRecipe, train_student
from engine.models import build_model
from teachers import MODEL_OVERRIDES, SMALL_MODEL, train_digits_teacher

RECOVER = ("data=digits", *MODEL_OVERRIDES, "stage=recover", "progress=false", "recover.teachers=[supervised]",
           "ipc=[2]", "recover.ipc_per_batch=1")
SQUEEZE = ("data=digits", "stage=squeeze", "progress=false", "model.width=16", "model.depth=2",
           "squeeze.teachers=[supervised]", "squeeze.supervised.epochs=1", "squeeze.supervised.batch_size=128")


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    return train_digits_teacher(tmp_path_factory.mktemp("fp_teacher") / "teacher.pt", epochs=2)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_differences_name_nested_keys():
    saved = {"recover": {"iterations": 4, "lr": 0.25}, "seed": 0}
    wanted = {"recover": {"iterations": 6, "lr": 0.25}, "seed": 0, "ipc": 2}
    assert differences(saved, wanted) == [("ipc", "<absent>", 2), ("recover.iterations", 4, 6)]
    assert digest(saved) == digest({"seed": 0, "recover": {"lr": 0.25, "iterations": 4}})  # key order free
    assert digest(saved) != digest(wanted)


def test_squeeze_teacher_with_changed_settings_is_refused(run_scdd, tmp_path):
    run_dir = tmp_path / "run"
    run_scdd(*SQUEEZE, run_dir=run_dir)
    teacher = run_dir / "squeeze" / "supervised" / "teacher.pt"
    assert read_teacher(teacher)["fingerprint"]["settings"]["epochs"] == 1
    stamp = teacher.stat().st_mtime_ns
    # same settings: reused as it is
    out = run_scdd(*SQUEEZE, "resume=true", run_dir=run_dir)
    assert out["teachers"]["supervised"]["skipped"] and teacher.stat().st_mtime_ns == stamp
    with pytest.raises(StaleArtifact) as exc:
        run_scdd(*SQUEEZE, "resume=true", "squeeze.supervised.lr=0.05", run_dir=run_dir)
    line = _one_line(exc)
    assert "supervised teacher" in line and str(teacher) in line and "settings.lr: 0.1 -> 0.05" in line
    assert teacher.stat().st_mtime_ns == stamp  # the refused artifact is untouched


def test_interrupted_pretraining_state_with_changed_settings_is_refused(run_scdd, tmp_path):
    run_dir = tmp_path / "run"
    cut = (*SQUEEZE[:-2], "squeeze.supervised.epochs=2", "squeeze.supervised.batch_size=128")
    out = run_scdd(*cut, "squeeze.stop_after_epochs=1", run_dir=run_dir)
    assert out["interrupted"] == "supervised"
    with pytest.raises(StaleArtifact) as exc:
        run_scdd(*cut, "resume=true", "squeeze.supervised.momentum=0.5", run_dir=run_dir)
    assert "pretraining checkpoint" in _one_line(exc) and "settings.momentum: 0.9 -> 0.5" in _one_line(exc)
    finished = run_scdd(*cut, "resume=true", run_dir=run_dir)  # the same settings continue it
    assert not finished["teachers"]["supervised"]["skipped"]


def test_recover_set_with_changed_settings_or_teacher_is_refused(run_scdd, teacher_ckpt, tmp_path):
    run_dir = tmp_path / "run"
    run_scdd(*RECOVER, f"teacher={teacher_ckpt}", "recover.iterations=3", run_dir=run_dir)
    folder = run_dir / "recover" / "supervised-noise"
    before = DistilledSet.open(folder).tensors()["images"]
    with pytest.raises(StaleArtifact) as exc:
        run_scdd(*RECOVER, f"teacher={teacher_ckpt}", "recover.iterations=5", "resume=true", run_dir=run_dir)
    assert "distilled set" in _one_line(exc) and "recover.iterations: 3 -> 5" in _one_line(exc)
    with pytest.raises(StaleArtifact, match=r"recover\.r_bn: 10\.0 -> 0\.5"):
        run_scdd(*RECOVER, f"teacher={teacher_ckpt}", "recover.iterations=3", "recover.r_bn=0.5", "resume=true",
                 run_dir=run_dir)
    # a retrained teacher changes the set's inputs: refused too, naming the teacher
    other = train_digits_teacher(tmp_path / "other.pt", epochs=2, seed=1)
    with pytest.raises(StaleArtifact, match=r"\(teacher: "):
        run_scdd(*RECOVER, f"teacher={other}", "recover.iterations=3", "resume=true", run_dir=run_dir)
    assert torch.equal(DistilledSet.open(folder).tensors()["images"], before)
    # matching settings reuse the set; a smaller ipc is served by the larger set
    out = run_scdd(*RECOVER[:-2], "ipc=[1]", "recover.ipc_per_batch=1", f"teacher={teacher_ckpt}",
                   "recover.iterations=3", "resume=true", run_dir=run_dir)
    assert out["sets"]["supervised-noise"]["seconds"] < 5
    assert torch.equal(DistilledSet.open(folder).tensors()["images"], before)
    # resume=false replaces it, and says so
    run_scdd(*RECOVER, f"teacher={teacher_ckpt}", "recover.iterations=5", run_dir=run_dir)
    assert DistilledSet.open(folder).index["fingerprint"]["recover"]["iterations"] == 5


def test_evaluate_result_with_changed_recipe_is_refused(run_scdd, teacher_ckpt, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_scdd(*RECOVER, f"teacher={teacher_ckpt}", "recover.iterations=2", run_dir=run_dir)
    evaluate = ("data=digits", *MODEL_OVERRIDES, "stage=evaluate", "progress=false", f"teacher={teacher_ckpt}",
                "ipc=[1]", "evaluate.full_data=false", "evaluate.batch_size=10", "evaluate.eval_every=1")
    first = run_scdd(*evaluate, "evaluate.epochs=2", run_dir=run_dir)
    again = run_scdd(*evaluate, "evaluate.epochs=2", "resume=true", run_dir=run_dir)
    assert again["ipc"]["1"]["sre2l"]["top1"] == first["ipc"]["1"]["sre2l"]["top1"]
    with pytest.raises(StaleArtifact) as exc:
        run_scdd(*evaluate, "evaluate.epochs=3", "resume=true", run_dir=run_dir)
    assert "student result" in _one_line(exc) and "recipe.epochs: 2 -> 3" in _one_line(exc)
    with pytest.raises(StaleArtifact, match=r"recipe\.temperature: 4\.0 -> 2\.0"):
        run_scdd(*evaluate, "evaluate.epochs=2", "evaluate.temperature=2", "resume=true", run_dir=run_dir)
    # a set rebuilt with other settings makes the stored result stale as well
    run_scdd(*RECOVER, f"teacher={teacher_ckpt}", "recover.iterations=3", run_dir=run_dir)
    with pytest.raises(StaleArtifact, match=r"train_set: "):
        run_scdd(*evaluate, "evaluate.epochs=2", "resume=true", run_dir=run_dir)
    # resume=false retrains and announces the replacement
    capsys.readouterr()
    run_scdd(*evaluate, "evaluate.epochs=3", run_dir=run_dir)
    assert "resume=false: replacing the existing student row" in capsys.readouterr().out


def test_student_checkpoint_from_other_settings_is_refused(teacher_ckpt, tmp_path):
    bundle = build_data(DataConfig(name="digits"))
    recipe = StudentRecipe(epochs=2, batch_size=64, lr=1e-2, weight_decay=0.0, temperature=4.0, loss="hard",
                           crop_scale=(1.0, 1.0), flip=False, cutmix_prob=0.0, cutmix_alpha=1.0, eval_every=2)
    state = tmp_path / student_artifacts.STATE_FILE
    student = build_model(SMALL_MODEL, 10, 1, 8)
    optimizer = torch.optim.AdamW(student.parameters())
    student_artifacts.save_state(state, {"student": student.state_dict(), "optimizer": optimizer.state_dict(),
                                         "epoch": 1, "history": [{"epoch": 1}]}, {"recipe": {"lr": 0.1}})
    with pytest.raises(StaleArtifact, match=r"student checkpoint .*recipe\.lr: 0\.1 -> 0\.01"):
        train_student(build_model(SMALL_MODEL, 10, 1, 8), bundle.train, bundle.test, bundle.normalize, recipe,
                      torch.device("cpu"), 0, checkpoint=state, progress=False, fingerprint={"recipe": {"lr": 0.01}})
    # the matching fingerprint resumes from epoch 1: one more epoch, history continued
    result = train_student(build_model(SMALL_MODEL, 10, 1, 8), bundle.train, bundle.test, bundle.normalize,
                           recipe, torch.device("cpu"), 0, checkpoint=state, progress=False,
                           fingerprint={"recipe": {"lr": 0.1}})
    assert [row["epoch"] for row in result.history] == [1, 2]


def test_stored_soft_labels_from_other_settings_are_refused_or_replaced(tmp_path, capsys):
    folder = tmp_path / "labels"
    soft_labels.open_store(folder, {"topk": 10, "teacher": "abc"}, resume=True)
    soft_labels.save_epoch(folder, 0, {"values": torch.zeros(1)})
    soft_labels.open_store(folder, {"topk": 10, "teacher": "abc"}, resume=True)  # same: kept
    assert soft_labels.has_epoch(folder, 0)
    with pytest.raises(StaleArtifact, match=r"stored soft labels .*topk: 10 -> 5"):
        soft_labels.open_store(folder, {"topk": 5, "teacher": "abc"}, resume=True)
    assert soft_labels.has_epoch(folder, 0)
    soft_labels.open_store(folder, {"topk": 5, "teacher": "abc"}, resume=False)
    assert not soft_labels.has_epoch(folder, 0)
    assert "replacing the existing stored soft labels" in capsys.readouterr().out
