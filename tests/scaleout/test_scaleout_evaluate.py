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


def test_relabel_stage_then_stored_label_students_with_two_processes(torchrun, run_scdd, digits_teacher_ckpt,
                                                                     tmp_path):
    """`stage=relabel` on 2 processes (each label folder written by one rank), then `stage=evaluate
    evaluate.relabel=stored` on 2 processes trains from those files without rewriting them."""
    run_dir = tmp_path / "run"
    common = ("data=digits", *MODEL_OVERRIDES, "progress=false", "ipc=[1,2]", f"teacher={digits_teacher_ckpt}")
    run_scdd(*common, "stage=recover", "recover.iterations=3", "recover.classes_per_batch=10", run_dir=run_dir)
    stored = ("evaluate.epochs=3", "evaluate.batch_size=16", "evaluate.eval_every=3", "evaluate.full_data=false")
    result = torchrun(2, *common, "stage=relabel", *stored, run_dir=run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    folders = [run_dir / "evaluate" / f"ipc{ipc}" / "sre2l" / "labels" for ipc in (1, 2)]
    stamps = {}
    for folder in folders:  # one (set, ipc) item per rank
        assert sorted(p.name for p in folder.iterdir()) == ["epoch00000.pt", "epoch00001.pt", "epoch00002.pt",
                                                           "meta.json"]
        stamps.update({p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("epoch*.pt")})
    assert result.stdout.count("relabel sre2l ipc=") == 2
    result = torchrun(2, *common, "stage=evaluate", "evaluate.relabel=stored", *stored, run_dir=run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in stamps} == stamps  # reused, not rewritten
    for ipc in (1, 2):
        row = json.loads((run_dir / "evaluate" / f"ipc{ipc}" / "sre2l" / "result.json").read_text())
        assert row["stored_labels_bytes_per_image_epoch"] > 0 and len(row["history"]) == 3
        assert row["fingerprint"]["relabel"] == "stored"
        real = run_dir / "evaluate" / f"ipc{ipc}" / "random_real" / "labels"
        assert (real / "epoch00002.pt").is_file()  # the baseline's labels, written by rank 0 of the stage
