"""`scdd +study=NAME` end to end on digits with tiny settings: report.md table + PNG + study.json, resume trains
nothing again, what each study must show (probe_vs_finetune: only finetune moves the BN statistics)."""
import json

import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ("data=digits", "progress=false", "logger=none", "study.reduced.ssl_epochs=1",
        "study.reduced.recover_iterations=5", "study.reduced.student_epochs=2", "study.reduced.eval_every=2",
        "squeeze.probe.epochs=2")
TWO_TEACHERS = "study.teachers=[{width:8,depth:2},{width:16,depth:2}]"


def _mtimes(root):
    files = [p for p in root.rglob("*") if p.is_file() and p.name in ("teacher.pt", "index.json", "result.json")]
    return {str(p): p.stat().st_mtime_ns for p in files}


def test_teacher_size_end_to_end_then_resume_trains_nothing(run_scdd, tmp_path):
    run_dir = tmp_path / "run"
    run_scdd("+study=teacher_size", *TINY, TWO_TEACHERS, run_dir=run_dir)
    report = (run_dir / "report.md").read_text()
    assert "| teacher | teacher params |" in report
    assert "| convnet w8 d2 | 770 |" in report and "| convnet w16 d2 |" in report
    assert "one seed per variant" in report and "`student_vs_teacher_size.png`" in report
    with Image.open(run_dir / "student_vs_teacher_size.png") as image:
        assert image.format == "PNG" and image.size[0] > 200
    study = json.loads((run_dir / "study.json").read_text())
    assert set(study["variants"]) == {"convnet-w8-d2", "convnet-w16-d2"}
    for entry in study["variants"].values():
        assert 0.0 <= entry["mean"]["student_top1"] <= 1.0 and 0.0 <= entry["mean"]["probe_top1"] <= 1.0
    for variant in ("convnet-w8-d2", "convnet-w16-d2"):  # each variant is a normal run dir with its own report
        folder = run_dir / "study" / variant
        assert (folder / "squeeze" / "ssl" / "teacher.pt").is_file() and (folder / "report.md").is_file()
        assert not (folder / "recover" / "supervised-noise").exists()
        assert not (folder / "evaluate" / "full").exists()  # reduced: no full-data student
    before = _mtimes(run_dir / "study")
    assert len(before) == 2 * 4  # per variant: teacher, set index, two student rows
    run_scdd("+study=teacher_size", *TINY, TWO_TEACHERS, "resume=true", run_dir=run_dir)
    assert _mtimes(run_dir / "study") == before
    assert json.loads((run_dir / "study.json").read_text())["variants"] == study["variants"]


def test_probe_vs_finetune_shares_pretraining_and_only_finetune_moves_bn(run_scdd, tmp_path):
    run_dir = tmp_path / "run"
    run_scdd("+study=probe_vs_finetune", *TINY, "study.reduced.probe_epochs=2", "model.width=16", "model.depth=2",
             "evaluate.student=convnet", run_dir=run_dir)
    study = json.loads((run_dir / "study.json").read_text())["variants"]
    assert study["linear"]["mean"]["bn_mean_shift"] == 0.0 and study["linear"]["mean"]["bn_var_shift_relative"] == 0.0
    assert study["finetune"]["mean"]["bn_mean_shift"] > 0.0 and study["finetune"]["mean"]["bn_var_shift_relative"] > 0
    linear = run_dir / "study" / "linear" / "squeeze" / "ssl" / "teacher.pt"
    finetuned = torch.load(run_dir / "study" / "finetune" / "squeeze" / "ssl" / "teacher.pt", weights_only=False)
    assert finetuned["metrics"]["method"] == "import" and finetuned["metrics"]["file"] == str(linear)
    assert finetuned["metrics"]["probe_mode"] == "finetune"
    assert "| linear |" in (run_dir / "report.md").read_text()
    assert (run_dir / "bn_shift_per_layer.png").is_file()


def test_cross_arch_trains_each_student_on_the_same_set(run_scdd, tmp_path):
    run_dir = tmp_path / "run"
    run_scdd("+study=cross_arch", *TINY, "model.width=16", "model.depth=2", "study.students=[convnet,mobilenet_v2_cifar]",
             run_dir=run_dir)
    study = json.loads((run_dir / "study.json").read_text())["variants"]["scdd"]["mean"]
    assert set(study) == {f"{row}/{arch}" for row in ("scdd", "random_real") for arch in ("convnet", "mobilenet_v2_cifar")}
    assert all(0.0 <= v <= 1.0 for v in study.values())
    report = (run_dir / "report.md").read_text()
    assert "| row (IPC 10) | convnet top-1 % | mobilenet_v2_cifar top-1 % |" in report
    assert (run_dir / "cross_arch.png").is_file()


def test_a_study_stopped_mid_pretraining_goes_on_with_resume(run_scdd, tmp_path):
    from engine import preemption

    run_dir = tmp_path / "run"
    args = ("+study=teacher_size", *TINY, TWO_TEACHERS, "study.reduced.ssl_epochs=2")
    with pytest.raises(preemption.Preempted, match="stopped before its last epoch"):
        run_scdd(*args, "squeeze.stop_after_epochs=1", run_dir=run_dir)
    first = run_dir / "study" / "convnet-w8-d2" / "squeeze" / "ssl"
    assert (first / "state.pt").is_file() and not (first / "teacher.pt").exists()
    assert not (run_dir / "report.md").exists()
    run_scdd(*args, "resume=true", run_dir=run_dir)
    pretrain = json.loads((first / "metrics.json").read_text())["pretrain"]
    assert [row["epoch"] for row in pretrain] == [1, 2]  # epoch 1 from the stopped run, epoch 2 resumed
    assert not (first / "state.pt").exists() and (run_dir / "report.md").is_file()


def test_study_seeds_repeat_every_variant_and_report_mean_and_sd(run_scdd, tmp_path):
    """study.seeds=[0,1]: each variant runs once per seed in study/<variant>/s<seed>/ (with that seed), and the
    table shows mean ± sample sd over them (study.json keeps each seed's values)."""
    run_dir = tmp_path / "run"
    run_scdd("+study=teacher_size", *TINY, TWO_TEACHERS, "study.seeds=[0,1]", run_dir=run_dir)
    variants = json.loads((run_dir / "study.json").read_text())["variants"]
    for name, entry in variants.items():
        for seed in (0, 1):
            index = run_dir / "study" / name / f"s{seed}" / "recover" / "ssl-noise" / "index.json"
            assert json.loads(index.read_text())["fingerprint"]["seed"] == seed
        values = [run["student_top1"] for run in entry["seeds"]]
        assert len(values) == 2
        assert entry["mean"]["student_top1"] == pytest.approx(sum(values) / 2)
        assert entry["sd"]["student_top1"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
    table = (run_dir / "report.md").read_text().split("| teacher | teacher params |")[1]
    assert table.count("±") >= 2 * len(variants)
