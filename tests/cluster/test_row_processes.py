"""evaluate.row_processes: rows trained side by side in forked one-thread processes equal one process."""
import json
import shutil

import pytest
import torch

from engine.evaluate.stage import balance
from teachers import MODEL_OVERRIDES

pytestmark = pytest.mark.usefixtures("one_thread")

ARGS = ("data=digits", "device=cpu", *MODEL_OVERRIDES, "progress=false", "ipc=[1,2]", "recover.iterations=3",
        "recover.classes_per_batch=10", "recover.ipc_per_batch=2")
EVAL = ("data=digits", "device=cpu", *MODEL_OVERRIDES, "progress=false", "ipc=[1,2]", "stage=evaluate",
        "evaluate.epochs=3", "evaluate.eval_every=2", "evaluate.full_data_epochs=1")


def test_balance_splits_rows_by_cost_largest_first():
    groups = balance([(0, 10), (1, 10), (2, 100), (3, 50), (4, 45)], 2)
    assert sorted(p for g in groups for p in g) == [0, 1, 2, 3, 4]
    assert sorted(groups) == [[2, 1], [3, 4, 0]]  # loads 110 and 105
    assert balance([(0, 5)], 3) == [[0], [], []]


def test_rows_in_two_processes_equal_one_process_bit_for_bit(run_scdd, digits_teacher, tmp_path, capfd):
    run_scdd(*ARGS, "stage=recover", f"teacher={digits_teacher}", run_dir=tmp_path / "one")
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    run_scdd(*EVAL, f"teacher={digits_teacher}", "evaluate.row_processes=1", run_dir=tmp_path / "one")
    capfd.readouterr()
    assert torch.get_num_threads() == 1  # the processes run one thread each, as this one
    run_scdd(*EVAL, f"teacher={digits_teacher}", "evaluate.row_processes=2", run_dir=tmp_path / "two")
    finished = [line for line in capfd.readouterr().out.splitlines() if line.startswith("evaluate: ")]
    rows = sorted((tmp_path / "one" / "evaluate").rglob("result.json"))
    assert len(rows) == 5 and len(finished) == 5  # sre2l + random_real per ipc, full data; a line each
    for path in rows:
        a = json.loads(path.read_text())
        b = json.loads((tmp_path / "two" / path.relative_to(tmp_path / "one")).read_text())
        assert (a["top1"], a["top5"], a["history"], a["fingerprint"]) == (b["top1"], b["top5"], b["history"],
                                                                          b["fingerprint"])
    one, two = (json.loads((tmp_path / run / "report.json").read_text()) for run in ("one", "two"))
    assert {i: {k: r["top1"] for k, r in v.items()} for i, v in one["ipc"].items()} == \
        {i: {k: r["top1"] for k, r in v.items()} for i, v in two["ipc"].items()}
