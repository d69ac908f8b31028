"""Student training split over 2 torchrun processes (DDP) against one process on the same sets."""
import json
import shutil

import torch

from teachers import MODEL_OVERRIDES

COMMON = ("data=digits", *MODEL_OVERRIDES, "progress=false", "ipc=[2]")
EVALUATE = ("stage=evaluate", "evaluate.epochs=20", "evaluate.batch_size=16", "evaluate.lr=0.01",
            "evaluate.eval_every=10", "evaluate.full_data=false")


def test_ddp_students_match_one_process(torchrun, run_scdd, digits_teacher_ckpt, tmp_path):
    base = tmp_path / "base"
    run_scdd(*COMMON, "stage=recover", "recover.iterations=5", "recover.classes_per_batch=10",
             f"teacher={digits_teacher_ckpt}", run_dir=base)
    one_dir, two_dir = tmp_path / "one", tmp_path / "two"
    shutil.copytree(base, one_dir)
    shutil.copytree(base, two_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process runs
    try:
        one = run_scdd(*COMMON, *EVALUATE, f"teacher={digits_teacher_ckpt}", run_dir=one_dir)
    finally:
        torch.set_num_threads(threads)
    result = torchrun(2, *COMMON, *EVALUATE, f"teacher={digits_teacher_ckpt}", run_dir=two_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = ("sre2l", "random_real")
    for key in rows:
        a = one["ipc"]["2"][key]
        b = json.loads((two_dir / "evaluate" / "ipc2" / key / "result.json").read_text())
        assert len(b["history"]) == 20 and b["images"] == a["images"] == 20
        assert abs(a["top1"] - b["top1"]) <= 0.08, (key, a["top1"], b["top1"])
    assert sorted(p.name for p in (two_dir / "evaluate" / "ipc2" / "random_real").iterdir()) == [
        "real_subset.json", "result.json"]  # the index list of the baseline; the student state is removed
