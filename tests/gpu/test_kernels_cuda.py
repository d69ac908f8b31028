"""The compiled Triton BN-matching kernels on CUDA tensors against the float64 reference: loss,
batch statistics and dL/dx, and the fused BN module's y, loss and input gradient, in fp32, fp16 and
bf16, NCHW and channels_last, at every BN-input shape of ResNet-18/50 at 224 px and of the CIFAR
ResNet-18 at 32 px."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kernels import FusedBNMatching, bn_matching_loss, bn_matching_loss_reference, bn_stats_reference
from kernels import bn_matching_triton as bmt

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
BATCH = 8
# BN inputs [C, H, W] (first occurrence of each): stem, then each stage's block shapes.
RESNET18_224 = [(64, 112, 112), (64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)]
RESNET50_224 = [(64, 112, 112), (64, 56, 56), (256, 56, 56), (128, 56, 56), (128, 28, 28), (512, 28, 28),
                (256, 14, 14), (1024, 14, 14), (512, 7, 7), (2048, 7, 7)]
CIFAR_RESNET18_32 = [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)]
SHAPES = sorted({(BATCH, *s) for s in RESNET18_224 + RESNET50_224 + CIFAR_RESNET18_32})
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GRAD_RTOL = {torch.float32: 5e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
"""dL/dx against float64 truth: fp32 stats of up to 1e5 values per channel, then the output dtype's
rounding."""
STAT_RTOL = 1e-5


def _close(actual, expected, rtol):
    expected = expected.detach().double()
    scale = max(expected.abs().max().item(), 1e-30)
    torch.testing.assert_close(actual.detach().double(), expected, rtol=rtol, atol=rtol * scale)


def _input(shape, dtype, channels_last, seed=0):
    g = torch.Generator(device=CUDA).manual_seed(seed)
    x = (torch.randn(shape, generator=g, device=CUDA, dtype=torch.float32) * 2.0 + 0.5).to(dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x.contiguous()


def _running(c, seed=1):
    g = torch.Generator(device=CUDA).manual_seed(seed)
    return (torch.randn(c, generator=g, device=CUDA),
            torch.rand(c, generator=g, device=CUDA) * 3 + 0.1)


def test_kernels_are_compiled_not_interpreted():
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    for kernel in (bmt._bn_matching_fwd_kernel, bmt._bn_matching_bwd_kernel):
        assert isinstance(kernel, JITFunction) and not isinstance(kernel, InterpretedFunction)


def test_auto_backend_picks_triton_for_cuda_tensors(monkeypatch):
    calls = []
    real = bmt.bn_matching_loss_triton
    monkeypatch.setattr(bmt, "bn_matching_loss_triton", lambda *a: calls.append(1) or real(*a))
    x = _input((2, 4, 5, 5), torch.float32, False)
    bn_matching_loss(x, *_running(4), backend="auto")
    assert calls == [1]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_compiled_kernel_matches_float64_reference(shape, channels_last, dtype):
    x = _input(shape, dtype, channels_last)
    rm, rv = _running(shape[1])
    xt = x.detach().clone().requires_grad_()
    loss, mean, var = bmt.bn_matching_triton(xt, rm, rv)
    (loss * 1.7).backward()
    x64 = x.detach().double().requires_grad_()
    loss64 = bn_matching_loss_reference(x64, rm.double(), rv.double())
    (loss64 * 1.7).backward()
    mean64, var64 = bn_stats_reference(x.detach().double())

    assert loss.dtype == mean.dtype == var.dtype == torch.float32 and loss.device == x.device
    _close(mean, mean64, STAT_RTOL)
    _close(var, var64, STAT_RTOL)
    _close(loss, loss64, STAT_RTOL)
    assert xt.grad.dtype == dtype and xt.grad.is_contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    _close(xt.grad, x64.grad, GRAD_RTOL[dtype])


def _bn(c, seed=2):
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c, eps=1e-5)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.2)
        bn.weight.copy_(torch.randn(c, generator=g))
        bn.bias.copy_(torch.randn(c, generator=g))
    return bn.to(CUDA).eval()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_bn_module_matches_batch_norm_plus_reference(shape, channels_last, dtype):
    """y, the loss, and dx of (y * w).sum() + 0.7 * loss (both gradient paths at once, then each
    alone); the BN's own parameters get no gradient."""
    bn = _bn(shape[1])
    bn.requires_grad_(True)
    fused = FusedBNMatching.from_bn(bn, backend="triton")
    x = _input(shape, dtype, channels_last, seed=3)
    w = torch.randn(shape, generator=torch.Generator(device=CUDA).manual_seed(4), device=CUDA)
    for y_weight, loss_weight in ((w, 0.7), (w, 0.0), (torch.zeros_like(w), 0.7)):
        x64 = x.detach().double().requires_grad_()
        bn64 = _bn(shape[1]).double()
        y64 = bn64(x64)
        loss64 = bn_matching_loss_reference(x64, bn64.running_mean, bn64.running_var)
        ((y64 * y_weight.double()).sum() + loss_weight * loss64).backward()

        xa = x.detach().clone().requires_grad_()
        y = fused(xa)
        ((y.float() * y_weight).sum() + loss_weight * fused.last_loss).backward()
        assert y.dtype == dtype and fused.last_loss.dtype == torch.float32
        _close(y, y64, GRAD_RTOL[dtype] if dtype != torch.float32 else 1e-5)
        _close(fused.last_loss, loss64, STAT_RTOL)
        _close(xa.grad, x64.grad, GRAD_RTOL[dtype])
        assert bn.weight.grad is None and bn.bias.grad is None


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("groups", [1, 4])
def test_ticket_merge_is_exact_across_many_programs_and_repeats(channels_last, groups):
    """The last-program merge on real concurrent programs: many programs per (group, channel block),
    repeated launches (tickets must come back to zero), against float64, every call bit-identical."""
    x = _input((64, 64, 28, 28), torch.float32, channels_last, seed=3)
    rm, rv = _running(64)
    first = [t.clone() for t in bmt.bn_matching_triton(x, rm, rv, groups)]
    for _ in range(20):
        again = bmt.bn_matching_triton(x, rm, rv, groups)
        for a, b in zip(first, again):
            assert torch.equal(a, b)
    torch.cuda.synchronize()
    assert int(bmt._TICKETS[("cuda", x.device.index)].abs().sum()) == 0
    from kernels.bn_matching_reference import bn_stats_reference
    mean64, var64 = bn_stats_reference(x.double(), groups)
    torch.testing.assert_close(first[1].double(), mean64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(first[2].double(), var64, rtol=1e-5, atol=1e-5)
