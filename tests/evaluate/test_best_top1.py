"""Final and best top-1: best is the best full test pass (every eval_every epochs and the last)."""
import json

import pytest
import torch

import engine.evaluate.student as student_module
from engine.artifacts import student as student_artifacts
from engine.data import DataConfig, build_data
from engine.evaluate.aggregate import main as aggregate_main
from engine.evaluate.report import build_report, render_table
from engine.evaluate.stage import random_real_subset
from engine.evaluate.student import StudentRecipe, train_student
from engine.models import build_model
from teachers import SMALL_MODEL

pytestmark = pytest.mark.usefixtures("one_thread")


def _recipe(**kw):
    base = dict(epochs=5, batch_size=32, lr=1e-2, weight_decay=0.0, temperature=4.0, loss="hard",
                crop_scale=(1.0, 1.0), flip=False, cutmix_prob=0.0, cutmix_alpha=1.0, eval_every=2)
    base.update(kw)
    return StudentRecipe(**base)


def test_best_is_the_best_full_test_pass_and_final_the_last(monkeypatch):
    bundle = build_data(DataConfig(name="digits"))
    passes = []
    real = student_module.evaluate_accuracy

    def scripted(model, dataset, *args, **kwargs):
        # each call must be a pass over the whole test split; the scripted accuracies make best != final
        assert dataset is bundle.test
        real(model, dataset, *args, **kwargs)
        passes.append(len(dataset))
        return [0.30, 0.70, 0.50][len(passes) - 1], None

    monkeypatch.setattr(student_module, "evaluate_accuracy", scripted)
    train = random_real_subset(bundle, 5, seed=0).dataset
    result = train_student(build_model(SMALL_MODEL, 10, 1, 8), train, bundle.test, bundle.normalize, _recipe(),
                           torch.device("cpu"), 0, progress=False)
    # eval_every=2 over 5 epochs: tests after epochs 2, 4 and the last (5), nowhere else
    assert [h["epoch"] for h in result.history if "top1" in h] == [2, 4, 5]
    assert passes == [len(bundle.test)] * 3
    assert result.top1 == 0.50 and result.best_top1 == 0.70


def test_best_on_a_real_run_is_the_max_of_its_passes():
    bundle = build_data(DataConfig(name="digits"))
    result = train_student(build_model(SMALL_MODEL, 10, 1, 8), bundle.train, bundle.test, bundle.normalize,
                           _recipe(epochs=3, eval_every=1, batch_size=128), torch.device("cpu"), 0, progress=False)
    accs = [h["top1"] for h in result.history]
    assert len(accs) == 3 and result.top1 == accs[-1] and result.best_top1 == max(accs) >= result.top1


def test_result_file_keeps_best_and_fills_it_for_older_files(tmp_path):
    history = [{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.0, "top1": 0.6}, {"epoch": 3, "loss": 0.9,
                                                                                   "top1": 0.5}]
    path = tmp_path / student_artifacts.RESULT_FILE
    student_artifacts.save_result(path, {"top1": 0.5, "best_top1": 0.6, "history": history}, {"seed": 0})
    assert student_artifacts.load_result(path, {"seed": 0})["best_top1"] == 0.6
    # a result written before best was recorded: its history holds the passes
    path.write_text(json.dumps({"top1": 0.5, "history": history, "fingerprint": {"seed": 0}}))
    assert student_artifacts.load_result(path, {"seed": 0})["best_top1"] == 0.6
    assert student_artifacts.best_top1([{"epoch": 1, "loss": 1.0}]) is None


def test_report_shows_final_and_best():
    results = {"ipc": {"1": {"scdd": {"top1": 0.42, "best_top1": 0.47, "top5": None, "seconds": 3.0,
                                      "history": []}}},
               "full_data": {"top1": 0.9, "best_top1": 0.93, "seconds": 5.0}}
    report = build_report(results, {"supervised_top1": 0.95}, {"evaluate": 8.0}, {})
    assert report["ipc"]["1"]["scdd"]["best_top1"] == 0.47 and report["full_data"]["best_top1"] == 0.93
    table = render_table(report)
    assert "| top-1 % (final) | best top-1 % |" in table
    assert "| SC-DD (SSL teacher) | 1 | 42.0 | 47.0 | - |" in table
    assert "| full training data | all | 90.0 | 93.0 | - |" in table
    assert "| teacher: supervised | all | 95.0 | - |" in table


def _report(path, scdd, best):
    path.mkdir(parents=True)
    report = {"ipc": {"1": {"scdd": {"top1": scdd, "best_top1": best}}},
              "full_data": {"top1": 0.9}, "teacher": {"supervised_top1": 0.9}}
    (path / "report.json").write_text(json.dumps(report))
    return path


def test_aggregate_gives_mean_and_sd_of_final_and_best(tmp_path, capsys):
    runs = [_report(tmp_path / f"s{i}", s, b) for i, (s, b) in enumerate([(0.20, 0.30), (0.30, 0.40),
                                                                          (0.40, 0.80)])]
    assert aggregate_main([str(r) for r in runs]) == 0
    final, best = capsys.readouterr().out.split("best top-1 % over")
    assert "final top-1 % over 3 runs" in final and "| SC-DD (SSL teacher) | 30.0 ± 10.0 | - |" in final
    assert "| SC-DD (SSL teacher) | 50.0 ± 26.5 | - |" in best
    # no best recorded for full data or teachers: they are not rows of the best table
    assert "full training data" not in best and "teacher:" not in best
