"""recover.groups_per_step with 2 torchrun processes: each rank groups its own share (plan[r::2]), so
the steps stack other batches than in one process; the set is still the one-process, one-batch-at-a-time set."""
import torch

from engine.artifacts.distilled import DistilledSet
from engine.artifacts.layout import RunLayout
from teachers import MODEL_OVERRIDES

# ipc 3 x (10 classes / 4 per batch: 4, 4, 2) = 9 batches; rank 0 gets 0, 2, 4, 6, 8, rank 1 gets 1, 3, 5, 7
RECOVER = ("data=digits", *MODEL_OVERRIDES, "stage=recover", "progress=false", "recover.iterations=4",
           "recover.classes_per_batch=4", "recover.ipc_per_batch=1", "ipc=[3]")


def _distilled(run_dir):
    return DistilledSet.open(RunLayout(run_dir).recover_set("supervised", "noise")).tensors()


def test_two_processes_with_groups_give_the_one_process_set(torchrun, run_scdd, digits_teacher_ckpt, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process runs
    try:
        run_scdd(*RECOVER, f"teacher={digits_teacher_ckpt}", run_dir=tmp_path / "one")
    finally:
        torch.set_num_threads(threads)
    result = torchrun(2, *RECOVER, f"teacher={digits_teacher_ckpt}", "recover.groups_per_step=2",
                      run_dir=tmp_path / "two")
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = _distilled(tmp_path / "one"), _distilled(tmp_path / "two")
    assert two["images"].shape == (30, 1, 8, 8)
    assert torch.equal(two["labels"], one["labels"]) and torch.equal(two["ipc_index"], one["ipc_index"])
    # 8-bit PNGs: float rounding may at most move a pixel to the neighbouring level
    assert (two["images"] - one["images"]).abs().max() <= 1 / 255 + 1e-6
