"""`python -m kernels.bench`: the fused BN module timed per backend and G against the unfused path,
and the bf16-vs-fp32 trajectory check (engine.bench.gpu_checks) on CPU-sized shapes."""
import math

import pytest
import torch

from kernels import bench
from kernels.bn_matching_reference import bn_matching_loss_reference

pytestmark = pytest.mark.usefixtures("one_thread")


def test_module_rows_grouped_and_not(tmp_path, capsys):
    out = tmp_path / "kernels.json"
    rows = bench.main(["--shapes", "cifar", "--batch", "2", "--groups", "1,2", "--iters", "1",
                       "--json", str(out)])
    assert {(r["groups"], r["provider"]) for r in rows} == {(g, p) for g in (1, 2) for p in ("unfused", "fused torch")}
    assert len(rows) == 4 * 2 * 2  # 4 CIFAR shapes
    for r in rows:
        assert r["shape"][0] == 2 * r["groups"]
        assert r["ms"] > 0 and math.isfinite(r["gbps"]) and r["bytes"] == 5 * math.prod(r["shape"]) * 4
    printed = capsys.readouterr().out
    assert "fused torch" in printed and "vs unfused" in printed and out.is_file()


def test_fused_module_gives_the_unfused_values():
    """What the bench times is the same computation: y and the loss of both paths agree."""
    bn = torch.nn.BatchNorm2d(8).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    x = torch.randn(4, 8, 5, 5, generator=torch.Generator().manual_seed(0))
    module = bench.fused_module(bn, "torch", 1)
    y, loss = bench.unfused_call(bn, 1)(x)
    torch.testing.assert_close(module(x), y)
    torch.testing.assert_close(module.last_loss, loss)
    grouped = bench.fused_module(bn, "torch", 2)  # one loss per class-batch, the halves' own
    y2, loss2 = bench.unfused_call(bn, 2)(x)
    torch.testing.assert_close(grouped(x), y2)
    assert grouped.last_loss.shape == (2,)
    torch.testing.assert_close(grouped.last_loss, loss2)
    torch.testing.assert_close(grouped.last_loss[1], bench.unfused_call(bn, 1)(x[2:])[1])


def test_loss_table_still_runs(capsys):
    rows = bench.main(["--what", "loss", "--shapes", "cifar", "--batch", "2", "--iters", "1", "--no-compile"])
    assert {r["provider"] for r in rows} == {"eager"} and all(r["ms"] > 0 for r in rows)


def test_trajectory_check_runs_and_compares(capsys):
    from engine.bench import gpu_checks

    summary = gpu_checks.main(["--model", "convnet", "--image-size", "16", "--batch", "4", "--num-classes", "10",
                               "--steps", "3", "--every", "1", "--device", "cpu"])
    assert [row["step"] for row in summary["fp32"]] == [0, 1, 2]
    assert all(math.isfinite(row["bn"]) and row["bn"] > 0 for row in summary["fp32"])
    assert [row["step"] for row in summary["bf16"]] == [0, 1, 2] and summary["worst_rel_bn"] < 0.5


def test_calibrated_teacher_has_data_statistics():
    from engine.bench.gpu_checks import calibrated_teacher

    model = calibrated_teacher("convnet", 10, 16, torch.device("cpu"), batches=1, batch=4)
    first = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not model.training and not torch.allclose(first.running_var, torch.ones_like(first.running_var))
