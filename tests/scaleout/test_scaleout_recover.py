"""Recover split across 2 torchrun processes: same distilled set as one process, resume, a rank without a batch."""
import torch

from engine.artifacts.distilled import DistilledSet
from engine.artifacts.layout import RunLayout
from teachers import MODEL_OVERRIDES

# ipc 2 x (10 classes / 5 per batch) = 4 class batches: 2 per rank.
RECOVER = ("data=digits", *MODEL_OVERRIDES, "stage=recover", "progress=false", "recover.iterations=5",
           "recover.classes_per_batch=5", "recover.ipc_per_batch=1", "ipc=[2]")


def _distilled(run_dir):
    return DistilledSet.open(RunLayout(run_dir).recover_set("supervised", "noise")).tensors()


def _single_process(run_scdd, teacher, run_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process runs
    try:
        run_scdd(*RECOVER, f"teacher={teacher}", run_dir=run_dir)
    finally:
        torch.set_num_threads(threads)
    return _distilled(run_dir)


def test_two_processes_assemble_the_single_process_set_and_resume_skips_finished_batches(
        torchrun, run_scdd, digits_teacher_ckpt, tmp_path):
    one = _single_process(run_scdd, digits_teacher_ckpt, tmp_path / "one")
    two_dir = tmp_path / "two"
    result = torchrun(2, *RECOVER, f"teacher={digits_teacher_ckpt}", run_dir=two_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    two = _distilled(two_dir)
    assert two["images"].shape == (20, 1, 8, 8)
    assert torch.equal(two["images"], one["images"])
    assert torch.equal(two["labels"], one["labels"]) and torch.equal(two["ipc_index"], one["ipc_index"])
    assert result.stdout.count("recover supervised-noise:") == 1  # only rank 0 reports

    # Simulated kill: one unfinished batch on each rank (plan[r::2]) and no assembled set yet.
    out = RunLayout(two_dir).recover_set("supervised", "noise")
    batches = out / "batches"
    (out / "index.json").unlink()
    for lost in ("b000002.json", "b000003.json"):  # rank 0 owns 0, 2; rank 1 owns 1, 3
        (batches / lost).unlink()
    kept = {name: (batches / name).stat().st_ino for name in ("b000000.json", "b000001.json")}
    result = torchrun(2, *RECOVER, f"teacher={digits_teacher_ckpt}", "resume=true", run_dir=two_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    # finished batches are kept as they were (a rewrite would replace the file: new inode)
    assert {name: (batches / name).stat().st_ino for name in kept} == kept
    assert sorted(p.name for p in batches.glob("b*.json")) == [f"b00000{i}.json" for i in range(4)]
    assert torch.equal(_distilled(two_dir)["images"], one["images"])


def test_a_rank_past_the_last_class_batch_only_waits(compose, digits_teacher_ckpt, tmp_path):
    # 10 classes in one batch of 10 at ipc 1 is one batch for two processes: rank 1's share is
    # empty; it synthesizes nothing, writes nothing (rank 0 prepares and assembles the set) and
    # returns after the barriers (no-ops here: no process group; the 2-process run is in
    # test_launchers.py's pipeline test).
    from engine.cli import build_context
    from engine.distributed import DistEnv
    from engine.recover.stage import run

    cfg = compose("data=digits", *MODEL_OVERRIDES, "stage=recover", "progress=false",
                  "recover.iterations=2", "recover.classes_per_batch=10", "ipc=[1]",
                  f"teacher={digits_teacher_ckpt}")
    ctx = build_context(cfg, tmp_path / "run")
    ctx.dist = DistEnv(rank=1, world_size=2)
    result = run(ctx)
    assert result["sets"]["supervised-noise"]["image_iterations_per_s"] == 0.0
    assert not (tmp_path / "run" / "recover").exists()
