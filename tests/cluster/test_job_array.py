"""Job arrays without a process group: task shares from the environment, recover by share, merge and verify."""
import json
import shutil

import pytest

from engine.artifacts.distilled import DistilledSet
from engine.distributed import TaskShare, read_task_share
from engine.errors import ConfigError
from engine.recover.plan import batches_for_task, plan_batches, task_of_batch, task_range
from teachers import MODEL_OVERRIDES

ARGS = ("data=digits", "device=cpu", *MODEL_OVERRIDES, "progress=false", "ipc=[3]", "recover.iterations=3",
        "recover.classes_per_batch=5", "recover.ipc_per_batch=1")  # 6 batches: classes 0-4 / 5-9 x ipc 0-2


def test_task_share_from_scdd_or_slurm_variables():
    assert read_task_share({}) == TaskShare()
    share = read_task_share({"SCDD_TASK_ID": "2", "SCDD_TASK_COUNT": "3"})
    assert (share.index, share.count, share.is_array) == (2, 3, True)
    slurm = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1"}
    assert (read_task_share(slurm).index, read_task_share(slurm).count) == (2, 3)  # --array=1-3
    for bad, said in (({"SCDD_TASK_ID": "3", "SCDD_TASK_COUNT": "3"}, "outside 3 tasks"),
                      ({"SCDD_TASK_ID": "1"}, "['SCDD_TASK_COUNT'] unset"),
                      ({"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "2"}, "not an integer")):
        with pytest.raises(ConfigError, match=said.replace("[", r"\[").replace("]", r"\]")):
            read_task_share(bad)


def test_task_ranges_cover_the_plan_once_and_name_owners():
    plan = plan_batches(10, 3, 5)
    shares = [batches_for_task(plan, t, 4) for t in range(4)]
    assert [len(s) for s in shares] == [2, 2, 1, 1]
    assert [b.index for s in shares for b in s] == [b.index for b in plan]
    assert [task_of_batch(6, p, 4) for p in range(6)] == [0, 0, 1, 1, 2, 3]
    assert [len(task_range(2, t, 3)) for t in range(3)] == [1, 1, 0]


def _array(run_scdd, monkeypatch, run_dir, teacher, *extra, tasks=range(3), count=3):
    for t in tasks:
        monkeypatch.setenv("SCDD_TASK_ID", str(t))
        monkeypatch.setenv("SCDD_TASK_COUNT", str(count))
        run_scdd(*ARGS, "stage=recover", f"teacher={teacher}", *extra, run_dir=run_dir)
    monkeypatch.delenv("SCDD_TASK_ID")
    monkeypatch.delenv("SCDD_TASK_COUNT")


def _merge_error(run_scdd, run_dir, teacher) -> str:
    with pytest.raises(ConfigError) as info:
        run_scdd(*ARGS, "stage=merge", f"teacher={teacher}", run_dir=run_dir)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_three_task_array_merged_equals_one_process_bit_for_bit(run_scdd, digits_teacher, tmp_path, monkeypatch):
    run_scdd(*ARGS, "stage=recover", f"teacher={digits_teacher}", run_dir=tmp_path / "one")
    single = tmp_path / "one" / "recover" / "supervised-noise"
    array = tmp_path / "array" / "recover" / "supervised-noise"
    _array(run_scdd, monkeypatch, tmp_path / "array", digits_teacher)
    assert not (array / "index.json").exists()  # tasks never assemble
    assert sorted(p.name for p in (array / "batches").iterdir()) == [f"b{i:06d}.json" for i in range(6)]
    keep = tmp_path / "keep"
    shutil.copytree(array, keep)

    # a share removed: refused with one line naming the batch and the task that should have made it
    (array / "batches" / "b000003.json").unlink()
    said = _merge_error(run_scdd, tmp_path / "array", digits_teacher)
    assert "batch 3 (classes 5-9, ipc 1-1)" in said and "task 1 of 3 should have made it" in said, said
    assert not (array / "index.json").exists()

    # a share made with another r_bn (task 2's batches from an array run with recover.r_bn=0.5)
    _array(run_scdd, monkeypatch, tmp_path / "other", digits_teacher, "recover.r_bn=0.5", tasks=[2])
    shutil.copy(keep / "batches" / "b000003.json", array / "batches" / "b000003.json")
    shutil.copy(tmp_path / "other" / "recover" / "supervised-noise" / "batches" / "b000005.json",
                array / "batches" / "b000005.json")
    said = _merge_error(run_scdd, tmp_path / "array", digits_teacher)
    assert "batch 5 (classes 5-9, ipc 2-2)" in said and "other settings" in said, said
    assert "task 2 of 3 should have made it" in said, said

    # every share back: merged, the set equals the single-process one bit for bit
    shutil.copy(keep / "batches" / "b000005.json", array / "batches" / "b000005.json")
    result = run_scdd(*ARGS, "stage=merge", f"teacher={digits_teacher}", run_dir=tmp_path / "array")
    assert result["recover"]["sets"]["supervised-noise"]["batches"] == 6
    a, b = DistilledSet.open(single), DistilledSet.open(array)
    assert a.index == b.index
    for rel in a.index["files"]:
        assert (single / rel).read_bytes() == (array / rel).read_bytes()
    assert (single / "loss_log.csv").read_bytes() == (array / "loss_log.csv").read_bytes()
    assert json.loads((single / "summary.json").read_text()) == json.loads((array / "summary.json").read_text())


def test_task_refuses_a_shared_folder_made_with_other_settings(run_scdd, digits_teacher, tmp_path, monkeypatch):
    _array(run_scdd, monkeypatch, tmp_path, digits_teacher, tasks=[0])
    with pytest.raises(ConfigError, match=r"recover.r_bn: 10.0 -> 0.5"):
        _array(run_scdd, monkeypatch, tmp_path, digits_teacher, "recover.r_bn=0.5", tasks=[1])


EVAL = ("data=digits", "device=cpu", *MODEL_OVERRIDES, "progress=false", "ipc=[1,2]", "stage=evaluate",
        "evaluate.epochs=2", "evaluate.eval_every=1", "evaluate.full_data=false")
ROWS = [("ipc1", "sre2l"), ("ipc1", "random_real"), ("ipc2", "sre2l"), ("ipc2", "random_real")]


def test_evaluate_rows_by_task_gathered_by_merge_equal_one_process(run_scdd, digits_teacher, tmp_path, monkeypatch):
    run_scdd(*ARGS, "stage=recover", f"teacher={digits_teacher}", run_dir=tmp_path / "one")
    shutil.copytree(tmp_path / "one", tmp_path / "array")
    run_scdd(*EVAL, f"teacher={digits_teacher}", run_dir=tmp_path / "one")
    for t in range(3):  # rows k, k+3, ... of the fixed order: task 0 trains two of the four rows
        monkeypatch.setenv("SCDD_TASK_ID", str(t))
        monkeypatch.setenv("SCDD_TASK_COUNT", "3")
        result = run_scdd(*EVAL, f"teacher={digits_teacher}", run_dir=tmp_path / "array")
        assert sum(len(rows) for rows in result["ipc"].values()) == (2 if t == 0 else 1)
    monkeypatch.delenv("SCDD_TASK_ID")
    monkeypatch.delenv("SCDD_TASK_COUNT")
    assert not (tmp_path / "array" / "report.json").exists()
    row = tmp_path / "array" / "evaluate" / "ipc2" / "sre2l" / "result.json"
    kept = row.read_bytes()
    row.unlink()
    with pytest.raises(ConfigError) as info:
        run_scdd(*EVAL, "stage=merge", f"teacher={digits_teacher}", run_dir=tmp_path / "array")
    said = str(info.value)
    assert "\n" not in said and "evaluate row sre2l ipc=2 has no result" in said and "task 2 of 3" in said, said
    row.write_bytes(kept)
    run_scdd(*EVAL, "stage=merge", f"teacher={digits_teacher}", run_dir=tmp_path / "array")
    for ipc, key in ROWS:
        a, b = (json.loads((tmp_path / run / "evaluate" / ipc / key / "result.json").read_text())
                for run in ("one", "array"))
        assert (a["top1"], a["top5"], a["history"], a["fingerprint"]) == (b["top1"], b["top5"], b["history"],
                                                                          b["fingerprint"])
    one, array = (json.loads((tmp_path / run / "report.json").read_text()) for run in ("one", "array"))
    assert {ipc: {k: r["top1"] for k, r in rows.items()} for ipc, rows in one["ipc"].items()} == \
        {ipc: {k: r["top1"] for k, r in rows.items()} for ipc, rows in array["ipc"].items()}
