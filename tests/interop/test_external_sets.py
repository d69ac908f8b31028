"""`scdd stage=evaluate evaluate.external_sets={name:/path}` on digits: a set in the reference layout (real digits
saved as the reference scripts save, PIL's default JPEG) becomes one more row of the report, trained with the
same soft-label teacher and recipe as the baseline; resume reuses its import until its files change; every bad
set is refused in one line before anything is trained."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from engine.data import DataConfig, build_data
from engine.errors import ConfigError
from teachers import MODEL_OVERRIDES, train_digits_teacher

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")


def write_released(root: Path, per_class: int = 2) -> Path:
    digits = build_data(DataConfig(name="digits")).train
    for c in range(10):
        picks = [i for i, label in enumerate(digits.labels) if label == c][-per_class:]
        (root / f"new{c:03d}").mkdir(parents=True)
        for k, i in enumerate(picks):
            Image.fromarray(digits.images[i, 0].numpy()).save(root / f"new{c:03d}" / f"class{c:03d}_id{k:03d}.jpg")
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("external")
    teacher = train_digits_teacher(root / "teacher.pt", epochs=2)
    return root, teacher, write_released(root / "released")


def overrides(teacher: Path, released: Path, *extra: str) -> list[str]:
    return ["stage=evaluate", "data=digits", *MODEL_OVERRIDES, f"teacher={teacher}", "ipc=[1,2]", "progress=false",
            "evaluate.epochs=2", "evaluate.batch_size=10", "evaluate.eval_every=1", "evaluate.full_data=false",
            f"evaluate.external_sets={{released:{released}}}", *extra]


def test_one_command_adds_the_released_set_as_a_report_row_and_resume_reuses_it(setup, run_scdd, tmp_path):
    root, teacher, released = setup
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "engine.cli", *overrides(teacher, released),
                           f"hydra.run.dir={run_dir}"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((run_dir / "report.json").read_text())
    for ipc, images in (("1", 10), ("2", 20)):
        assert list(report["ipc"][ipc]) == ["released", "random_real"]
        assert report["ipc"][ipc]["released"]["images"] == images
        assert 0.0 <= report["ipc"][ipc]["released"]["top1"] <= 1.0
    assert "| released | 2 |" in (run_dir / "report.md").read_text()
    index = json.loads((run_dir / "external" / "released" / "index.json").read_text())
    assert index["source"]["path"] == str(released.resolve()) and index["image_format"] == "jpeg"
    assert len(index["files"]) == 20 and index["labels"][:4] == [0, 0, 1, 1]
    row = json.loads((run_dir / "evaluate" / "ipc2" / "released" / "result.json").read_text())
    assert row["fingerprint"]["train_set"] == f"{index['digest']}/ipc2"
    # the soft-label teacher is the baseline's
    baseline = json.loads((run_dir / "evaluate" / "ipc2" / "random_real" / "result.json").read_text())
    assert row["fingerprint"]["label_teacher"] == baseline["fingerprint"]["label_teacher"] is not None
    assert row["fingerprint"]["recipe"] == baseline["fingerprint"]["recipe"]

    again = run_scdd(*overrides(teacher, released, "resume=true"), run_dir=run_dir)
    assert again["ipc"]["2"]["released"]["seconds"] == report["ipc"]["2"]["released"]["seconds"]  # reused


def test_a_changed_source_is_refused_on_resume(setup, run_scdd, tmp_path):
    root, teacher, _ = setup
    released = write_released(tmp_path / "released", per_class=1)
    run_dir = tmp_path / "run"
    run_scdd(*overrides(teacher, released, "ipc=[1]", "evaluate.epochs=1", "evaluate.random_real_seeds=1"),
             run_dir=run_dir)
    image = released / "new004" / "class004_id000.jpg"
    with Image.open(image) as img:
        img.rotate(90).save(image)
    with pytest.raises(ConfigError, match=r"external_sets\.released .* was made with other settings \(source_files"):
        run_scdd(*overrides(teacher, released, "ipc=[1]", "evaluate.epochs=1", "resume=true"), run_dir=run_dir)


def _bad_sets(root: Path):
    def missing():
        return root / "absent"

    def no_class_folders():
        (root / "flat").mkdir()
        return root / "flat"

    def too_many_classes():
        tree = write_released(root / "wide")
        (tree / "new010").mkdir()
        Image.new("L", (8, 8), 128).save(tree / "new010" / "class010_id000.jpg")
        return tree

    def wrong_size():
        tree = write_released(root / "big")
        Image.new("L", (16, 16), 128).save(tree / "new003" / "class003_id001.jpg")
        return tree

    def unreadable():
        tree = write_released(root / "bad")
        (tree / "new007" / "class007_id000.jpg").write_bytes(b"\xff\xd8 truncated")
        return tree

    return [(missing, "does not exist; point it at the set's folder"),
            (no_class_folders, "holds no newNNN class folders"),
            (too_many_classes, "has class folder new010 (class 10) but the teacher and data have 10 classes"),
            (wrong_size, "is 16x16 but data.image_size=8"),
            (unreadable, "class007_id000.jpg is unreadable")]


def test_bad_sets_are_refused_in_one_line_before_training(setup, run_scdd, tmp_path):
    root, teacher, _ = setup
    for make, expected in _bad_sets(tmp_path):
        run_dir = tmp_path / f"run_{make.__name__}"
        with pytest.raises(ConfigError) as exc:
            run_scdd(*overrides(teacher, make()), run_dir=run_dir)
        message = str(exc.value)
        assert message.startswith("evaluate.external_sets.released: ") and expected in message, message
        assert "\n" not in message
        assert not (run_dir / "evaluate").exists() and not (run_dir / "external").exists()

