"""FusedBNMatching against nn.BatchNorm2d (eval) + the reference BN-matching loss, both backends."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kernels import (
    FusedBNMatching,
    bn_matching_loss_reference,
    fused_bn_matching,
    restore_bn,
    swap_in_fused_bn,
    weighted_matching_loss,
)

GRAD_RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _close(actual, expected, rtol):
    expected = expected.detach().double()
    scale = max(expected.abs().max().item(), 1e-30)
    torch.testing.assert_close(actual.detach().double(), expected, rtol=rtol, atol=rtol * scale)


def _make_bn(c, affine=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c, affine=affine, eps=1e-3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.2)
        if affine:
            bn.weight.copy_(torch.randn(c, generator=g))
            bn.bias.copy_(torch.randn(c, generator=g))
    return bn.eval().requires_grad_(False)


def _make_input(shape, dtype, channels_last, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 1.5 + 0.3).to(dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def _expected(bn, x, y_weight, loss_weight):
    """Eval-mode BN output, reference loss and dx of (y * y_weight).sum() + loss_weight * loss,
    computed in fp32 from the same input values."""
    xr = x.detach().float().requires_grad_()
    y = bn(xr)
    loss = bn_matching_loss_reference(xr, bn.running_mean, bn.running_var)
    ((y * y_weight).sum() + loss_weight * loss).backward()
    return y.detach(), loss.detach(), xr.grad


def _actual(module, x, y_weight, loss_weight):
    xa = x.detach().clone().requires_grad_()
    y = module(xa)
    loss = module.last_loss
    terms = []
    if y_weight is not None:
        terms.append((y * y_weight).sum())
    if loss_weight is not None:
        terms.append(loss_weight * loss)
    sum(terms).backward()
    return y.detach(), loss.detach(), xa.grad


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_fused_matches_bn_plus_reference(backend, channels_last, affine):
    shape = (3, 5, 4, 3)
    bn = _make_bn(shape[1], affine=affine)
    x = _make_input(shape, torch.float32, channels_last)
    y_weight = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    fused = FusedBNMatching.from_bn(bn, backend=backend)

    y_e, loss_e, dx_e = _expected(bn, x, y_weight, 0.7)
    y_a, loss_a, dx_a = _actual(fused, x, y_weight, 0.7)
    assert y_a.dtype == x.dtype and y_a.shape == x.shape
    _close(y_a, y_e, 1e-5)
    _close(loss_a, loss_e, 1e-5)
    _close(dx_a, dx_e, 1e-5)
    if backend == "triton" and channels_last:
        assert y_a.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fused_triton_half_inputs(dtype):
    shape = (2, 3, 4, 4)
    bn = _make_bn(shape[1])
    x = _make_input(shape, dtype, False)
    y_weight = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    y_e, loss_e, dx_e = _expected(bn, x, y_weight, 0.7)
    y_a, loss_a, dx_a = _actual(FusedBNMatching.from_bn(bn, backend="triton"), x, y_weight, 0.7)
    assert y_a.dtype == dtype and dx_a.dtype == dtype and loss_a.dtype == torch.float32
    _close(y_a, y_e, GRAD_RTOL[dtype])
    _close(loss_a, loss_e, 1e-5)
    _close(dx_a, dx_e, GRAD_RTOL[dtype])


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("use", ["y-only", "loss-only"])
def test_fused_single_output_gradients(backend, use):
    shape = (2, 4, 3, 3)
    bn = _make_bn(shape[1])
    x = _make_input(shape, torch.float32, False)
    fused = FusedBNMatching.from_bn(bn, backend=backend)
    if use == "y-only":
        # y.sum() gives an expanded, stride-0 grad_y: the launcher must cope with it.
        xa = x.clone().requires_grad_()
        fused(xa).sum().backward()
        _, _, dx_e = _expected(bn, x, torch.ones(shape), 0.0)
        _close(xa.grad, dx_e, 1e-5)
    else:
        _, loss_e, dx_e = _expected(bn, x, torch.zeros(shape), 1.3)
        _, loss_a, dx_a = _actual(fused, x, None, 1.3)
        _close(loss_a, loss_e, 1e-5)
        _close(dx_a, dx_e, 1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fused_is_eval_mode_and_frozen(backend):
    bn = _make_bn(3)
    bn.requires_grad_(True)  # even trainable BN parameters must not receive gradients
    fused = FusedBNMatching.from_bn(bn, backend=backend).train()
    running_before = (bn.running_mean.clone(), bn.running_var.clone())
    x = _make_input((2, 3, 3, 3), torch.float32, False).requires_grad_()
    y = fused(x)
    (y.sum() + fused.last_loss).backward()
    _close(y, F.batch_norm(x.detach(), bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps), 1e-5)
    assert bn.weight.grad is None and bn.bias.grad is None
    assert torch.equal(bn.running_mean, running_before[0]) and torch.equal(bn.running_var, running_before[1])
    fused.enabled = False
    fused(x.detach())
    assert fused.last_loss is None


def _tiny_net():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 2),
    )
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval().requires_grad_(False)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_swap_and_restore_model(backend):
    net = _tiny_net()
    originals = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    keys = list(net.state_dict().keys())
    x = torch.randn(2, 3, 5, 5)
    expected_out = net(x)

    # Reference: hooks on the plain model, as SRe2L's recovery does.
    losses_ref = []

    def hook(mod, inp, out):
        losses_ref.append(bn_matching_loss_reference(inp[0], mod.running_mean, mod.running_var))

    hooks = [m.register_forward_hook(hook) for m in originals]
    xr = x.clone().requires_grad_()
    net(xr)
    (losses_ref[0] * 10 + losses_ref[1]).backward()
    for h in hooks:
        h.remove()

    with fused_bn_matching(net, backend=backend) as fused:
        assert [f._original_bn for f in fused] == originals
        assert list(net.state_dict().keys()) == keys
        xa = x.clone().requires_grad_()
        out = net(xa)
        total = weighted_matching_loss(fused, first_multiplier=10.0)
        total.backward()
    _close(out, expected_out, 1e-5)
    _close(total, losses_ref[0] * 10 + losses_ref[1], 1e-5)
    _close(xa.grad, xr.grad, 1e-4)

    assert [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)] == originals
    assert not any(isinstance(m, FusedBNMatching) for m in net.modules())
    _close(net(x), expected_out, 0)


def test_context_manager_restores_on_error_and_swap_validates():
    net = _tiny_net()
    with pytest.raises(RuntimeError, match="boom"):
        with fused_bn_matching(net, backend="torch"):
            raise RuntimeError("boom")
    assert not any(isinstance(m, FusedBNMatching) for m in net.modules())
    with pytest.raises(ValueError, match="unknown BN-matching backend"):
        swap_in_fused_bn(net, backend="cuda")
    with pytest.raises(ValueError):
        FusedBNMatching.from_bn(nn.BatchNorm2d(3, track_running_stats=False))
    modules = swap_in_fused_bn(net, backend="torch")
    assert len(modules) == 2
    with pytest.raises(RuntimeError):
        weighted_matching_loss(modules)  # no forward yet
    restore_bn(net)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 2
