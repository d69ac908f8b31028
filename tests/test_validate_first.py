"""Validate everything first: a bad setting of any stage a run will execute stops the run before the first
stage starts (one line, nothing written under squeeze/ recover/ evaluate/), not after hours of earlier stages."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest

from engine.config import from_mapping
from engine.data import DataConfig
from engine.errors import ConfigError
from teachers import MODEL_OVERRIDES, train_digits_teacher

PIPELINE = ("data=digits", *MODEL_OVERRIDES, "progress=false", "stage=pipeline")
STAGE_FOLDERS = ("squeeze", "recover", "evaluate")


def _fails_before_any_stage(run_scdd, run_dir, *overrides) -> str:
    with pytest.raises(ConfigError) as info:
        run_scdd(*overrides, run_dir=run_dir)
    message = str(info.value)
    assert "\n" not in message  # the CLI prints it as one line
    for folder in STAGE_FOLDERS:
        assert not (run_dir / folder).exists(), f"{folder}/ was written before the error: {message}"
    return message


@pytest.mark.parametrize("overrides,message", [
    # the examples: each used to stop only after squeeze (and recover) had run
    (["recover.r_bn=abc"], "config 'recover.r_bn' must be of type float, got 'abc'"),
    (["ipc=[0]"], "ipc=[0]"),
    (["evaluate.epochs=-3"], "evaluate.epochs"),
    (["ipc=[500]"], "ipc=500 exceeds the 144 training images of class 8"),  # digits' smallest training class
    # and more settings only a later stage reads
    (["recover.classes_per_batch=abc"], "config 'recover.classes_per_batch' must be of type int"),
    (["recover.classes_per_batch=11"], "larger than the 10 classes"),
    (["evaluate.eval_every=0"], "evaluate.eval_every=0"),
    (["evaluate.random_real_seeds=0"], "evaluate.random_real_seeds=0"),
    (["squeeze.teachers=[supervised]"], "squeeze.teachers=['supervised'] makes none of them"),
    (["squeeze.teachers=[ssl]", "evaluate.label_teacher=supervised"], "evaluate.label_teacher=supervised"),
    (["squeeze.supervised.batch_size=5000"], "squeeze.supervised.batch_size=5000 exceeds the 1497 training"),
    (["evaluate.student=nope"], "nope"),
    (["trainer=deepspeed", "deepspeed.path=/does/not/exist.json"], "deepspeed.path=/does/not/exist.json does not exist"),
    (["loader=ffcv"], "loader=ffcv needs loader.beton_dir"),
    (["data.mean=[0.5]"], "data.mean is given but data.std is not"),
    (["evaluate.cuda_graphs=true"], "evaluate.cuda_graphs=true needs a CUDA device (this run is on cpu)"),
    (["evaluate.cuda_graphs=true", "evaluate.compile=true"], "evaluate.cuda_graphs=true and evaluate.compile=true"),
    (["squeeze.cuda_graphs=true"], "squeeze.cuda_graphs=true needs a CUDA device (this run is on cpu)"),
])
def test_pipeline_refuses_a_bad_setting_before_squeeze(run_scdd, tmp_path, overrides, message):
    assert message in _fails_before_any_stage(run_scdd, tmp_path / "run", *PIPELINE, *overrides)


def test_pipeline_checks_a_given_teacher_before_squeeze(run_scdd, tmp_path):
    assert "does not exist" in _fails_before_any_stage(run_scdd, tmp_path / "a", *PIPELINE,
                                                       f"teacher={tmp_path / 'nope.pt'}")
    (tmp_path / "not_a_teacher.pt").write_bytes(b"junk")
    assert "is corrupt" in _fails_before_any_stage(run_scdd, tmp_path / "b", *PIPELINE,
                                                   f"teacher={tmp_path / 'not_a_teacher.pt'}")
    teacher = train_digits_teacher(tmp_path / "teacher.pt", epochs=1)
    assert "trained as model=" in _fails_before_any_stage(run_scdd, tmp_path / "c", "data=digits", "stage=pipeline",
                                                          "model.width=32", "model.depth=2", f"teacher={teacher}")


def test_stages_run_alone_check_their_inputs_first(run_scdd, tmp_path):
    teacher = train_digits_teacher(tmp_path / "teacher.pt", epochs=1)
    recover = ("data=digits", *MODEL_OVERRIDES, "progress=false", "stage=recover", f"teacher={teacher}",
               "recover.iterations=1")
    # init=real takes ipc real images of every class
    assert "recover.init=real" in _fails_before_any_stage(run_scdd, tmp_path / "r", *recover, "ipc=[145]",
                                                          "recover.init=real")
    run_scdd(*recover, "ipc=[1]", run_dir=tmp_path / "set")
    # evaluate/relabel: a set made for 1 image per class is not silently evaluated as ipc 2
    for stage in ("evaluate", "relabel"):
        with pytest.raises(ConfigError, match=r"holds 1 images per class but ipc=2"):
            run_scdd("data=digits", *MODEL_OVERRIDES, f"stage={stage}", f"teacher={teacher}", "ipc=[2]",
                     run_dir=tmp_path / "set")
    assert not (tmp_path / "set" / "evaluate").exists()
    with pytest.raises(ConfigError, match="no distilled set"):
        run_scdd("data=digits", *MODEL_OVERRIDES, "stage=relabel", f"teacher={teacher}", run_dir=tmp_path / "empty")


@dataclass
class _Optionals:
    typing_optional: Optional[int] = None
    union_none: int | None = None
    union_list: list[float] | None = None


@pytest.mark.parametrize("key,value,message", [
    ("typing_optional", "abc", "'x.typing_optional' must be of type int, got 'abc'"),
    ("union_none", "abc", "'x.union_none' must be of type int, got 'abc'"),
    ("union_none", 1.5, "'x.union_none' must be of type int, got 1.5"),
    ("union_list", ["a"], "'x.union_list' must be of type float, got 'a'"),
])
def test_optional_fields_are_type_checked(key, value, message):
    """Optional[X] and X | None both check X (the X | None branch used to pass any value through)."""
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        from_mapping(_Optionals, {key: value}, "x")
    ok = from_mapping(_Optionals, {"typing_optional": 3, "union_none": None, "union_list": [1]}, "x")
    assert ok == _Optionals(3, None, [1.0])


def test_top_level_teacher_is_type_checked(run_scdd, tmp_path):
    with pytest.raises(ConfigError, match="config 'teacher' must be of type str, got 5"):
        run_scdd("data=digits", "stage=recover", "teacher=5", run_dir=tmp_path)


@pytest.mark.parametrize("fields,message", [
    ({"mean": [0.5]}, "data.mean is given but data.std is not"),
    ({"std": [0.25]}, "data.std is given but data.mean is not"),
    ({"mean": [0.5, 0.5], "std": [0.25, 0.25]}, "1 (gray) or 3 (RGB)"),
    ({"mean": [0.5], "std": [0.25, 0.25, 0.25]}, "same length"),
    ({"mean": [0.5], "std": [0.0]}, "must be > 0"),
])
def test_mean_and_std_go_together(fields, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from_mapping(DataConfig, {"name": "digits", **fields}, "data")
    assert from_mapping(DataConfig, {"name": "digits", "mean": [0.5], "std": [0.25]}, "data").std == [0.25]
