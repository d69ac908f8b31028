"""logger=tensorboard writes one event file per training loop under <run>/tensorboard/<stage>/<loop>/, with the
tags and step counts of the loop (read back with TensorBoard's EventAccumulator and checked against the JSON
files beside them); logger=none writes nothing."""
import csv
import json
import math

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from engine.data import DataConfig, build_data
from engine.errors import ConfigError
from engine.training.tb_logger import LoggerConfig
from teachers import MODEL_OVERRIDES

pytestmark = pytest.mark.usefixtures("one_thread")

SSL_BATCH, SUPERVISED_BATCH, STUDENT_BATCH, STUDENT_EPOCHS, PROBE_EPOCHS = 128, 64, 5, 2, 2
TINY = ("data=digits", *MODEL_OVERRIDES, "progress=false", "ipc=[1]", "squeeze.epochs=1",
        f"squeeze.probe.epochs={PROBE_EPOCHS}", "recover.iterations=3", f"evaluate.epochs={STUDENT_EPOCHS}",
        "evaluate.eval_every=1", f"evaluate.batch_size={STUDENT_BATCH}", "evaluate.full_data_epochs=1",
        f"ssl.batch_size={SSL_BATCH}", f"squeeze.supervised.batch_size={SUPERVISED_BATCH}")


def _scalars(folder):
    """{tag: [(step, value), ...]} of the one event file in ``folder``."""
    files = list(folder.iterdir())
    assert len(files) == 1 and files[0].name.startswith("events.out.tfevents"), files
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_every_training_loop_writes_its_metrics(run_scdd, tmp_path):
    run = tmp_path / "run"
    run_scdd(*TINY, run_dir=run)
    board = run / "tensorboard"
    train_images = len(build_data(DataConfig(name="digits")).train)

    for kind, batch in (("ssl", SSL_BATCH), ("supervised", SUPERVISED_BATCH)):
        rows = _scalars(board / "squeeze" / kind)
        steps = train_images // batch
        assert [s for s, _ in rows["train/loss"]] == list(range(1, steps + 1)), kind
        assert len(rows["train/lr"]) == steps
        history = json.loads((run / "squeeze" / kind / "metrics.json").read_text())["pretrain"]
        assert rows["epoch/loss"] == [(1, pytest.approx(history[0]["loss"], rel=1e-6))]
        assert rows["epoch/images_per_s"][0][1] > 0

    probe = _scalars(board / "squeeze" / "probe")
    final = json.loads((run / "squeeze" / "ssl" / "metrics.json").read_text())["final"]
    assert [s for s, _ in probe["train/loss"]] == list(range(1, PROBE_EPOCHS + 1))
    assert probe["test/top1"] == [(PROBE_EPOCHS, pytest.approx(final["probe_top1"]))]

    with open(run / "recover" / "ssl-noise" / "loss_log.csv", newline="") as handle:
        logged = list(csv.DictReader(handle))
    recover = _scalars(board / "recover" / "ssl-noise")
    assert {"recover/ce", "recover/bn", "recover/acc", "recover/lr"} <= set(recover)
    assert [v for _, v in recover["recover/ce"]] == pytest.approx([float(r["ce"]) for r in logged], rel=1e-6)

    for row in ("scdd", "sre2l", "random_real"):
        student = _scalars(board / "evaluate" / "ipc1" / row)
        result = json.loads((run / "evaluate" / "ipc1" / row / "result.json").read_text())
        steps = STUDENT_EPOCHS * math.ceil(10 / STUDENT_BATCH)  # ipc 1 x 10 classes
        assert [s for s, _ in student["train/loss"]] == list(range(1, steps + 1)), row
        assert [v for _, v in student["test/top1"]] == pytest.approx([h["top1"] for h in result["history"]])
        assert [s for s, _ in student["train/images_per_s"]] == list(range(1, STUDENT_EPOCHS + 1))
    assert (board / "evaluate" / "full" / "full_data").is_dir()


def test_logger_none_writes_nothing(run_scdd, tmp_path):
    run = tmp_path / "run"
    run_scdd(*TINY, "logger=none", "stage=squeeze", run_dir=run)
    assert (run / "squeeze" / "ssl" / "teacher.pt").is_file()
    assert not (run / "tensorboard").exists()


def test_logger_setting_is_checked():
    with pytest.raises(ConfigError, match="logger='wandb' is not one of tensorboard|none"):
        LoggerConfig(name="wandb")
