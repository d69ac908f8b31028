"""evaluate.students: one student per listed model on every row, each in its own folder, one report column each."""
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from engine.errors import ConfigError
from teachers import MODEL_OVERRIDES, SMALL_MODEL, train_digits_teacher

pytestmark = pytest.mark.usefixtures("one_thread")

ARGS = ("data=digits", "device=cpu", *MODEL_OVERRIDES, "progress=false", "ipc=[1]")
RECOVER = (*ARGS, "stage=recover", "recover.iterations=3", "recover.classes_per_batch=10", "recover.ipc_per_batch=1")
EVAL = (*ARGS, "stage=evaluate", "evaluate.epochs=2", "evaluate.eval_every=1", "evaluate.random_real_seeds=2",
        "evaluate.full_data=false")  # a full-data MobileNet epoch alone takes 10 s on one thread
SECOND = "mobilenet_v2_cifar"  # small-image stem: fits digits' 8 px
STUDENTS = f"evaluate.students=[convnet,{SECOND}]"


@pytest.fixture(scope="module")
def recovered(tmp_path_factory) -> tuple[Path, Path]:
    """(a digits teacher, a run dir holding its distilled set and nothing evaluated)."""
    from hydra import compose, initialize_config_dir

    from engine.cli import execute

    teacher = train_digits_teacher(tmp_path_factory.mktemp("teacher") / "teacher.pt")
    run_dir = tmp_path_factory.mktemp("recovered")
    with initialize_config_dir(config_dir=str(Path(__file__).parents[2] / "configs"), version_base=None):
        execute(compose(config_name="config", overrides=[*RECOVER, f"teacher={teacher}"]), run_dir)
    return teacher, run_dir


def _copy(recovered, tmp_path: Path) -> tuple[Path, Path]:
    teacher, source = recovered
    shutil.copytree(source, tmp_path / "run")
    return teacher, tmp_path / "run"


def _rows(run_dir: Path) -> set[str]:
    return {str(p.parent.relative_to(run_dir / "evaluate")) for p in (run_dir / "evaluate").rglob("result.json")}


def _train_nothing(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a finished student was trained again")

    monkeypatch.setattr("engine.evaluate.stage.train_students", refuse)


def test_each_model_trains_in_its_folder_reports_a_column_and_resumes(run_scdd, recovered, tmp_path, monkeypatch,
                                                                      capfd):
    teacher, run_dir = _copy(recovered, tmp_path)
    # two row processes: planning, the split by position and the gather count every (row, model) once
    result = run_scdd(*EVAL, f"teacher={teacher}", STUDENTS, "logger=tensorboard", "evaluate.row_processes=2",
                      run_dir=run_dir)
    finished = [line for line in capfd.readouterr().out.splitlines() if line.startswith("evaluate: ")]
    assert len(finished) == 6 and sum(f"@{SECOND} ipc=1 top-1" in line for line in finished) == 3, finished
    rows = ["ipc1/sre2l", "ipc1/random_real", "ipc1/random_real_s1"]
    assert _rows(run_dir) == {*rows, *(f"{row}@{SECOND}" for row in rows)}
    for row in rows:  # the headline keeps the row's folder; the second model trained in <row>@<model>
        first, second = (json.loads((run_dir / "evaluate" / f"{row}{at}" / "result.json").read_text())
                         for at in ("", f"@{SECOND}"))
        assert first["fingerprint"]["student"]["name"] == "convnet"
        assert second["fingerprint"]["student"]["name"] == SECOND
        assert {k: v for k, v in first["fingerprint"].items() if k != "student"} == \
            {k: v for k, v in second["fingerprint"].items() if k != "student"}  # same set, teacher, recipe, seed
    assert (run_dir / "tensorboard" / "evaluate" / "ipc1" / f"sre2l@{SECOND}").is_dir()

    sre2l, real = result["ipc"]["1"]["sre2l"], result["ipc"]["1"]["random_real"]
    for row in (sre2l, real):
        assert list(row["students"]) == ["convnet", SECOND]
        headline = row["students"]["convnet"]
        assert (row["top1"], row["best_top1"], row["top5"]) == (headline["top1"], headline["best_top1"],
                                                                headline["top5"])
    stored = json.loads((run_dir / "evaluate" / "ipc1" / f"sre2l@{SECOND}" / "result.json").read_text())
    assert sre2l["students"][SECOND]["top1"] == stored["top1"]
    seeds = [json.loads((run_dir / "evaluate" / "ipc1" / f"{row}@{SECOND}" / "result.json").read_text())["top1"]
             for row in ("random_real", "random_real_s1")]
    assert real["students"][SECOND]["top1"] == pytest.approx(sum(seeds) / 2)
    assert real["students"][SECOND]["top1_std"] == pytest.approx(abs(seeds[0] - seeds[1]) / 2)

    report = json.loads((run_dir / "report.json").read_text())
    assert report["ipc"]["1"]["sre2l"]["students"][SECOND]["top1"] == stored["top1"]
    table = (run_dir / "report.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| method"))
    assert f"| top-1 % convnet | top-1 % {SECOND} | best top-1 %" in header and "(final)" not in header
    sre2l_line = next(line for line in table.splitlines() if line.startswith("| SRe2L-style"))
    assert f"| {100 * stored['top1']:.1f} |" in sre2l_line
    assert "cross_arch.png" in table.splitlines()[-1]
    with Image.open(run_dir / "cross_arch.png") as img:
        img.verify()

    _train_nothing(monkeypatch)  # resume: every model's row is on disk
    again = run_scdd(*EVAL, f"teacher={teacher}", STUDENTS, "resume=true", run_dir=run_dir)
    assert again["ipc"]["1"]["sre2l"]["students"] == sre2l["students"]
    assert again["ipc"]["1"]["random_real"]["students"] == real["students"]


def test_without_students_the_rows_are_todays(run_scdd, recovered, tmp_path, monkeypatch):
    teacher, run_dir = _copy(recovered, tmp_path)
    result = run_scdd(*EVAL, f"teacher={teacher}", run_dir=run_dir)
    assert _rows(run_dir) == {"ipc1/sre2l", "ipc1/random_real", "ipc1/random_real_s1"}
    fingerprint = json.loads((run_dir / "evaluate" / "ipc1" / "sre2l" / "result.json").read_text())["fingerprint"]
    assert fingerprint["student"] == {"name": SMALL_MODEL.name, "width": SMALL_MODEL.width, "depth": SMALL_MODEL.depth}
    assert "students" not in result["ipc"]["1"]["sre2l"] and "students" not in result["ipc"]["1"]["random_real"]
    table = (run_dir / "report.md").read_text()
    assert "| top-1 % (final) |" in table and "cross_arch.png" not in table
    assert not (run_dir / "cross_arch.png").exists()

    _train_nothing(monkeypatch)
    run_scdd(*EVAL, f"teacher={teacher}", "evaluate.students=null", "resume=true", run_dir=run_dir)


def test_one_process_labels_each_row_once_for_every_model(run_scdd, recovered, tmp_path, monkeypatch):
    """relabel=stored: the row's models replay the headline's label files (same crops, teacher and recipe), and
    train in lockstep on one batch stream (tests/evaluate/test_student_lockstep.py: as each would alone)."""
    from engine.artifacts import soft_labels
    from engine.evaluate import stage

    teacher, run_dir = _copy(recovered, tmp_path)
    saved, trained = [], []
    save_epoch = soft_labels.save_epoch
    monkeypatch.setattr(soft_labels, "save_epoch", lambda folder, epoch, payload: (
        saved.append(folder.parent.name), save_epoch(folder, epoch, payload)))
    train_students = stage.train_students
    monkeypatch.setattr(stage, "train_students", lambda jobs, *args, **kwargs: (
        trained.append(len(jobs)), train_students(jobs, *args, **kwargs))[1])
    run_scdd(*EVAL, f"teacher={teacher}", STUDENTS, "evaluate.relabel=stored", run_dir=run_dir)
    rows = ["sre2l", "random_real", "random_real_s1"]
    assert sorted(saved) == sorted(rows * 2)  # 2 epochs of each row, none for the second model
    assert trained == [2, 2, 2]  # each row's two students together
    labels = {str(p.parent.relative_to(run_dir / "evaluate")) for p in (run_dir / "evaluate").rglob("labels")}
    assert labels == {f"ipc1/{row}" for row in rows}
    assert _rows(run_dir) == {f"ipc1/{row}{at}" for row in rows for at in ("", f"@{SECOND}")}


@pytest.mark.parametrize("override, said", [
    ("evaluate.students=[convnet,resnet_9000]", "evaluate.students: unknown model resnet_9000; choose from ["),
    ("evaluate.students=[convnet,resnet18]", "model=resnet18 needs images of at least 32px but data gives 8px"),
    ("evaluate.students=[]", "evaluate.students=[] lists no model"),
    ("evaluate.students=[convnet,convnet]", "lists convnet more than once"),
])
def test_bad_students_refused_in_one_line_before_any_work(run_scdd, tmp_path, override, said):
    with pytest.raises(ConfigError) as info:
        run_scdd(*EVAL, override, run_dir=tmp_path / "run")
    assert said in str(info.value) and "\n" not in str(info.value), str(info.value)
    assert not (tmp_path / "run" / "evaluate").exists()


def test_student_and_students_together_refused(run_scdd, tmp_path):
    with pytest.raises(ConfigError, match=r"evaluate.student=vit_tiny and evaluate.students=.* pick one"):
        run_scdd(*EVAL, "evaluate.student=vit_tiny", STUDENTS, run_dir=tmp_path / "run")


def test_job_array_tasks_share_every_model_row_and_merge_gathers_them(run_scdd, recovered, tmp_path, monkeypatch):
    teacher, run_dir = _copy(recovered, tmp_path)
    for task in range(3):  # positions: sre2l 0, sre2l@second 1, random_real 2, @second 3, random_real_s1 4, @second 5
        monkeypatch.setenv("SCDD_TASK_ID", str(task))
        monkeypatch.setenv("SCDD_TASK_COUNT", "3")
        run_scdd(*EVAL, f"teacher={teacher}", STUDENTS, run_dir=run_dir)
    monkeypatch.delenv("SCDD_TASK_ID")
    monkeypatch.delenv("SCDD_TASK_COUNT")
    order = ["sre2l", f"sre2l@{SECOND}", "random_real", f"random_real@{SECOND}", "random_real_s1",
             f"random_real_s1@{SECOND}"]
    for position, row in enumerate(order):
        made = json.loads((run_dir / "evaluate" / "ipc1" / row / "result.json").read_text())
        assert made["task"] == {"index": position % 3, "count": 3}, row
    missing = run_dir / "evaluate" / "ipc1" / f"sre2l@{SECOND}" / "result.json"
    kept = missing.read_bytes()
    missing.unlink()
    with pytest.raises(ConfigError) as info:
        run_scdd(*EVAL, "stage=merge", f"teacher={teacher}", STUDENTS, run_dir=run_dir)
    said = str(info.value)
    assert f"evaluate row sre2l@{SECOND} ipc=1 has no result" in said and "task 1 of 3" in said, said
    missing.write_bytes(kept)
    run_scdd(*EVAL, "stage=merge", f"teacher={teacher}", STUDENTS, run_dir=run_dir)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["ipc"]["1"]["sre2l"]["students"][SECOND]["top1"] == json.loads(kept)["top1"]
    assert (run_dir / "cross_arch.png").is_file()


def _report(path: Path, convnet: float, second: float, full: float) -> Path:
    def row(top1: float, other: float) -> dict:
        return {"top1": top1, "students": {"convnet": {"top1": top1}, SECOND: {"top1": other}}}

    path.mkdir(parents=True)
    report = {"ipc": {"1": {"scdd": row(convnet, second)}}, "full_data": row(full, full / 2),
              "teacher": {"supervised_top1": 0.9}, "seconds": {}}
    (path / "report.json").write_text(json.dumps(report))
    return path


def test_table_and_aggregate_have_a_column_per_model(tmp_path, capsys):
    from engine.evaluate.aggregate import main
    from engine.evaluate.report import render_table

    values = [(0.2, 0.6, 0.8), (0.4, 0.7, 0.9)]
    runs = [_report(tmp_path / f"s{i}", *v) for i, v in enumerate(values)]
    table = render_table(json.loads((runs[0] / "report.json").read_text())).splitlines()
    assert table[0] == (f"| method | IPC | top-1 % convnet | top-1 % {SECOND} | best top-1 % | top-5 % | recover s "
                        f"| student s |")
    assert all(line.count("|") == table[0].count("|") for line in table if line.startswith("|"))
    assert table[2].startswith(f"| SC-DD (SSL teacher) | 1 | {100 * values[0][0]:.1f} | {100 * values[0][1]:.1f} |")
    assert table[3].startswith(f"| full training data | all | {100 * values[0][2]:.1f} | {100 * values[0][2] / 2:.1f} |")
    assert main([str(r) for r in runs]) == 0
    per_model = capsys.readouterr().out.split("\n\n")[-1]
    assert f"| method | IPC 1 top-1 % convnet | IPC 1 top-1 % {SECOND} | all top-1 % convnet | all top-1 % {SECOND} |" \
        in per_model
    assert "| SC-DD (SSL teacher) | 30.0 ± 14.1 | 65.0 ± 7.1 | - | - |" in per_model
    assert "| full training data | - | - | 85.0 ± 7.1 | 42.5 ± 3.5 |" in per_model
