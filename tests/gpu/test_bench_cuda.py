"""`scdd stage=bench` on CUDA: the recover-step breakdown counts CUDA kernel time, every phase is
nonzero and the fractions sum to 1."""
import json

import pytest

pytestmark = pytest.mark.gpu

TINY = ("data=digits", "model.width=16", "model.depth=2", "stage=bench", "bench.steps=2", "bench.warmup=1",
        "bench.repeats=1", "bench.pretrain_batch=16", "bench.eval_batch=16", "bench.breakdown_steps=3",
        "progress=false", "device=cuda")


def test_breakdown_on_cuda_is_kernel_time_with_nonzero_phases(run_scdd, tmp_path):
    run_scdd(*TINY, run_dir=tmp_path)
    saved = json.loads((tmp_path / "bench.json").read_text())
    breakdown = saved["breakdown"]
    assert breakdown["basis"] == "cuda kernel time" and breakdown["step_ms"] > 0
    fractions = breakdown["fractions"]
    assert set(fractions) == {"augmentation", "teacher_forward", "bn_statistics", "backward", "optimizer", "other"}
    assert sum(fractions.values()) == pytest.approx(1.0, abs=1e-6)
    assert all(fractions[k] > 0 for k in ("augmentation", "teacher_forward", "bn_statistics", "backward",
                                          "optimizer")), fractions
    assert saved["peak_memory_mb"] > 0 and saved["memory_kind"].startswith("cuda")
