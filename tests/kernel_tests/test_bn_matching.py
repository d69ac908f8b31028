"""BN-matching loss: Triton kernels (CPU interpreter) against the PyTorch reference.

Every case compares the forward (loss, mean, var) and dL/dx. Shapes stay tiny because the
interpreter runs each program in Python.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from kernels import bn_matching_loss, bn_matching_loss_reference, bn_matching_stats, bn_stats_reference
from kernels import bn_matching_triton as bmt

REPO = Path(__file__).resolve().parents[2]

# Relative tolerances for dL/dx (output dtype rounding) and for the statistics (fp32 accumulation
# of identical inputs in a different order).
GRAD_RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
STAT_RTOL = 1e-5

SHAPES = [(2, 3, 5, 5), (1, 5, 4, 4), (3, 8, 1, 1), (4, 3, 3, 2), (2, 6, 6, 6)]


def _close(actual, expected, rtol):
    """assert_close with the absolute tolerance scaled to the reference's magnitude."""
    expected = expected.detach().double()
    scale = max(expected.abs().max().item(), 1e-30)
    torch.testing.assert_close(actual.detach().double(), expected, rtol=rtol, atol=rtol * scale)


def _make_input(shape, dtype, channels_last, loc=0.5, std=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * std + loc).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x.requires_grad_()


def _make_running(c, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    rm = torch.randn(c, generator=g, dtype=torch.float64).to(dtype)
    rv = (torch.rand(c, generator=g, dtype=torch.float64) * 3 + 0.1).to(dtype)
    return rm, rv


def _loss_and_grad(fn, x, rm, rv, upstream=1.7):
    x = x.detach().clone().requires_grad_()
    loss = fn(x, rm, rv)
    (loss * upstream).backward()
    return loss.detach(), x.grad


def _float64_truth(x, rm, rv):
    """Loss, mean, var and dL/dx in float64 from the same input values."""
    return _loss_and_grad(bn_matching_loss_reference, x.detach().double(), rm.double(), rv.double())


# ------------------------------------------------------------------------------------- reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_reference_stats_match_float64(dtype, channels_last):
    x = _make_input((3, 5, 4, 3), dtype, channels_last).detach()
    mean, var = bn_stats_reference(x)
    assert mean.dtype == var.dtype == torch.float32 and mean.shape == var.shape == (5,)
    x64 = x.double()
    _close(mean, x64.mean(dim=(0, 2, 3)), 1e-6)
    _close(var, x64.var(dim=(0, 2, 3), unbiased=False), 1e-6)


def test_reference_large_mean_matches_float64():
    g = torch.Generator().manual_seed(3)
    x = (1e3 + 1e-2 * torch.randn(4, 3, 6, 6, generator=g, dtype=torch.float64)).float()
    mean, var = bn_stats_reference(x)
    x64 = x.double()
    _close(mean, x64.mean(dim=(0, 2, 3)), 1e-7)
    # var ~1e-4 under a 1e3 mean: naive E[x^2]-E[x]^2 in fp32 would be pure rounding noise here.
    _close(var, x64.var(dim=(0, 2, 3), unbiased=False), 1e-3)


def test_reference_gradcheck_float64():
    x = torch.randn(2, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    rm = torch.randn(3, dtype=torch.float64, requires_grad=True)
    rv = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(bn_matching_loss_reference, (x, rm, rv))


def test_reference_is_plain_l2_norms():
    x = _make_input((2, 4, 3, 3), torch.float32, False).detach()
    rm, rv = _make_running(4)
    x64 = x.double()
    mean, var = x64.mean(dim=(0, 2, 3)), x64.var(dim=(0, 2, 3), unbiased=False)
    expected = torch.sqrt(((rv.double() - var) ** 2).sum()) + torch.sqrt(((rm.double() - mean) ** 2).sum())
    loss = bn_matching_loss_reference(x, rm, rv)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    _close(loss, expected, 1e-6)


def test_reference_rejects_bad_shapes():
    with pytest.raises(ValueError):
        bn_matching_loss_reference(torch.randn(2, 3, 4), torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError):
        bn_matching_loss_reference(torch.randn(2, 3, 4, 4), torch.zeros(4), torch.ones(3))


# ---------------------------------------------------------------------------------- triton path


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_triton_matches_reference(shape, channels_last, dtype):
    x = _make_input(shape, dtype, channels_last)
    rm, rv = _make_running(shape[1])

    x_t = x.detach().clone().requires_grad_()
    loss_t, mean_t, var_t = bmt.bn_matching_triton(x_t, rm, rv)
    (loss_t * 1.7).backward()
    loss_r, dx_r = _loss_and_grad(bn_matching_loss_reference, x, rm, rv)
    mean_r, var_r = bn_stats_reference(x.detach())

    assert loss_t.dtype == mean_t.dtype == var_t.dtype == torch.float32
    assert not mean_t.requires_grad and not var_t.requires_grad
    _close(loss_t, loss_r, STAT_RTOL)
    _close(mean_t, mean_r, STAT_RTOL)
    _close(var_t, var_r, STAT_RTOL)
    dx_t = x_t.grad
    assert dx_t.dtype == dtype and dx_t.shape == x.shape
    assert dx_t.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    _close(dx_t, dx_r, GRAD_RTOL[dtype])


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_triton_fp32_matches_float64_truth(channels_last):
    x = _make_input((3, 5, 6, 5), torch.float32, channels_last)
    rm, rv = _make_running(5)
    loss64, dx64 = _float64_truth(x, rm, rv)
    mean64, var64 = bn_stats_reference(x.detach().double())

    x_t = x.detach().clone().requires_grad_()
    loss, mean, var = bmt.bn_matching_triton(x_t, rm, rv)
    (loss * 1.7).backward()
    _close(loss, loss64, 2e-6)
    _close(mean, mean64, 2e-6)
    _close(var, var64, 2e-6)
    _close(x_t.grad, dx64, 1e-5)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("target_programs", [1, 1000], ids=["many-tiles-per-program", "one-tile-per-program"])
@pytest.mark.parametrize("loc", [30.0, 1e3])
def test_triton_multi_tile_merge(monkeypatch, channels_last, target_programs, loc):
    """Tiny tiles force the in-program Chan merge and the multi-chunk merge kernel path."""
    monkeypatch.setattr(bmt, "_TILE_ELEMS", 8)
    monkeypatch.setattr(bmt, "_MAX_BLOCK_HW", 4)
    monkeypatch.setattr(bmt, "_MAX_BLOCK_C", 2)
    monkeypatch.setattr(bmt, "_MERGE_BLOCK_T", 2)
    monkeypatch.setattr(bmt, "_target_programs", lambda *_: target_programs)
    x = _make_input((3, 5, 5, 3), torch.float32, channels_last, loc=loc, std=0.5)
    rm, rv = _make_running(5)
    loss64, dx64 = _float64_truth(x, rm, rv)
    mean64, var64 = bn_stats_reference(x.detach().double())

    x_t = x.detach().clone().requires_grad_()
    loss, mean, var = bmt.bn_matching_triton(x_t, rm, rv)
    (loss * 1.7).backward()
    _close(mean, mean64, 2e-7)
    _close(var, var64, 1e-5)
    _close(loss, loss64, 1e-5 * loc)  # fp32 ulp of the mean grows with loc
    _close(x_t.grad, dx64, 1e-5 * loc)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_triton_large_mean_small_variance(channels_last):
    g = torch.Generator().manual_seed(5)
    x = (1e3 + 1e-2 * torch.randn(4, 3, 6, 6, generator=g, dtype=torch.float64)).float()
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    rm = torch.full((3,), 1e3) + torch.tensor([0.5, -0.25, 0.0])
    rv = torch.full((3,), 2e-4)
    loss64, dx64 = _float64_truth(x, rm, rv)
    mean64, var64 = bn_stats_reference(x.double())

    x_t = x.clone().requires_grad_()
    loss, mean, var = bmt.bn_matching_triton(x_t, rm, rv)
    (loss * 1.7).backward()
    _close(mean, mean64, 1e-7)
    _close(var, var64, 1e-3)
    # An fp32 mean near 1e3 is only known to ulp(1e3) = 6e-5, so ||rm - mean|| ~ 0.56 carries
    # ~1e-4 absolute error in any fp32 implementation (the reference included).
    _close(loss, loss64, 5e-4)
    _close(x_t.grad, dx64, 1e-3)
    # The reference is held to the same float64 truth.
    loss_r, dx_r = _loss_and_grad(bn_matching_loss_reference, x, rm, rv)
    _close(loss_r, loss64, 5e-4)
    _close(dx_r, dx64, 1e-3)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("both_zero", [False, True], ids=["var-norm-zero", "both-norms-zero"])
def test_zero_norm_gradient_is_finite_and_matches(backend, both_zero):
    """Per-channel constant x has exactly var == 0 and mean == the constant in any summation
    order, so with running_var = 0 one norm's argument is exactly zero (both, if running_mean is
    set to the constants too). Its (sub)gradient must be 0, not NaN."""
    consts = torch.tensor([0.5, -1.25, 3.0])
    x = consts.view(1, 3, 1, 1).expand(2, 3, 4, 4).contiguous()
    rv = torch.zeros(3)
    rm = consts.clone() if both_zero else torch.tensor([0.0, 1.0, 2.0])
    loss, dx = _loss_and_grad(lambda *a: bn_matching_loss(*a, backend=backend), x, rm, rv)
    assert torch.isfinite(dx).all()
    loss_r, dx_r = _loss_and_grad(bn_matching_loss_reference, x, rm, rv)
    if both_zero:
        assert loss.item() == 0.0 and torch.count_nonzero(dx) == 0
    _close(loss, loss_r, 1e-6)
    _close(dx, dx_r, 1e-6)


def test_triton_non_dense_input_is_copied():
    base = _make_input((2, 4, 6, 6), torch.float32, False).detach()
    x = base[:, :, ::2, 1:]  # strided view: neither NCHW- nor channels_last-contiguous
    rm, rv = _make_running(4)
    loss_t, dx_t = _loss_and_grad(lambda *a: bmt.bn_matching_loss_triton(*a), x, rm, rv)
    loss_r, dx_r = _loss_and_grad(bn_matching_loss_reference, x, rm, rv)
    _close(loss_t, loss_r, STAT_RTOL)
    _close(dx_t, dx_r, 1e-5)


def test_triton_rejects_unsupported_inputs():
    with pytest.raises(TypeError):
        bmt.bn_matching_loss_triton(torch.randn(2, 3, 2, 2, dtype=torch.float64), torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError):
        bmt.bn_matching_loss_triton(torch.randn(2, 3, 2, 2), torch.zeros(2), torch.ones(2))


# ----------------------------------------------------------------------------------- dispatcher


def test_dispatcher_auto_uses_torch_on_cpu(monkeypatch):
    def _fail(*_a, **_k):
        raise AssertionError("triton path must not run for CPU tensors with backend='auto'")

    monkeypatch.setattr(bmt, "bn_matching_loss_triton", _fail)
    monkeypatch.setattr(bmt, "bn_matching_triton", _fail)
    x = _make_input((2, 3, 2, 2), torch.float32, False).detach()
    rm, rv = _make_running(3)
    assert kernels.resolve_backend("auto", x) == "torch"
    _close(bn_matching_loss(x, rm, rv), bn_matching_loss_reference(x, rm, rv), 0)
    loss, mean, var = bn_matching_stats(x, rm, rv)
    _close(loss, bn_matching_loss_reference(x, rm, rv), 1e-7)
    _close(mean, bn_stats_reference(x)[0], 0)


def test_dispatcher_explicit_backends_agree():
    x = _make_input((2, 3, 3, 3), torch.float32, True).detach()
    rm, rv = _make_running(3)
    for fn in (bn_matching_loss, lambda *a, **k: bn_matching_stats(*a, **k)[0]):
        _close(fn(x, rm, rv, backend="triton"), fn(x, rm, rv, backend="torch"), STAT_RTOL)


def test_dispatcher_unknown_backend():
    x = torch.randn(2, 3, 2, 2)
    with pytest.raises(ValueError, match="unknown BN-matching backend"):
        bn_matching_loss(x, torch.zeros(3), torch.ones(3), backend="cuda")


def test_dispatcher_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        bn_matching_loss(torch.randn(2, 3, 2, 2), torch.zeros(3), torch.ones(3), backend="triton")
    assert set(kernels.BACKENDS) == {"auto", "triton", "torch"}


def test_import_is_lazy_about_triton():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import sys, kernels; assert 'triton' not in sys.modules, 'triton imported eagerly'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True)
