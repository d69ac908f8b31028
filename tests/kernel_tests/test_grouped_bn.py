"""Grouped BN matching (recover.groups_per_step): G independent class-batches in one tensor.

Each group's statistics, loss and dL/dx must be exactly those of running that group alone, on the
PyTorch reference, the fused torch module and the Triton kernels (interpreter); groups=1 keeps the
ungrouped 0-d loss.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kernels import FusedBNMatching, bn_matching_stats, bn_stats_reference, set_groups
from kernels import bn_matching_triton as bmt
from kernels.bn_matching_reference import bn_matching_loss_reference
from kernels.fused_bn_torch import fused_bn_matching_torch

pytestmark = pytest.mark.usefixtures("one_thread")

STAT_RTOL = 1e-5
GRAD_RTOL = 2e-5


def _close(actual, expected, rtol):
    expected = expected.detach().double()
    scale = max(expected.abs().max().item(), 1e-30)
    torch.testing.assert_close(actual.detach().double(), expected, rtol=rtol, atol=rtol * scale)


def _input(shape, channels_last, seed=0, loc=0.5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).float() * 2.0 + loc
    # groups with visibly different statistics, so a mixed-up group index cannot pass
    x = x * torch.linspace(0.5, 2.0, shape[0]).view(-1, 1, 1, 1) + torch.arange(shape[0]).view(-1, 1, 1, 1) * 0.3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _running(c, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(c, generator=g), torch.rand(c, generator=g) * 3 + 0.1


def _per_group_truth(x, rm, rv, groups, upstream):
    """Loss, mean, var and dL/dx of each group run alone through the reference (weighted by upstream[g])."""
    losses, means, vars_, grads = [], [], [], []
    for g, part in enumerate(x.detach().chunk(groups)):
        part = part.clone().requires_grad_()
        mean, var = bn_stats_reference(part)
        loss = bn_matching_loss_reference(part, rm, rv)
        (loss * upstream[g]).backward()
        losses.append(loss.detach())
        means.append(mean.detach())
        vars_.append(var.detach())
        grads.append(part.grad)
    return torch.stack(losses), torch.stack(means), torch.stack(vars_), torch.cat(grads)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape,groups", [((6, 3, 5, 5), 2), ((6, 4, 3, 2), 3), ((4, 5, 1, 1), 4)])
def test_grouped_stats_loss_and_grad_equal_each_group_alone(backend, channels_last, shape, groups):
    x = _input(shape, channels_last)
    rm, rv = _running(shape[1])
    upstream = torch.linspace(0.7, 1.9, groups)
    t_loss, t_mean, t_var, t_grad = _per_group_truth(x, rm, rv, groups, upstream)
    xg = x.clone().requires_grad_()
    loss, mean, var = bn_matching_stats(xg, rm, rv, backend=backend, groups=groups)
    assert loss.shape == (groups,) and mean.shape == (groups, shape[1]) and var.shape == (groups, shape[1])
    (loss * upstream).sum().backward()
    _close(loss, t_loss, STAT_RTOL)
    _close(mean, t_mean, STAT_RTOL)
    _close(var, t_var, STAT_RTOL)
    _close(xg.grad, t_grad, GRAD_RTOL)


@pytest.mark.parametrize("channels_last", [False, True])
def test_triton_grouped_multi_tile_merge(monkeypatch, channels_last):
    """Tiny tiles: many partials per group, merged over several chunks, still per group."""
    monkeypatch.setattr(bmt, "_TILE_ELEMS", 8)
    monkeypatch.setattr(bmt, "_MAX_BLOCK_HW", 4)
    monkeypatch.setattr(bmt, "_MAX_BLOCK_C", 2)
    monkeypatch.setattr(bmt, "_MERGE_BLOCK_T", 2)
    monkeypatch.setattr(bmt, "_target_programs", lambda *_: 2)
    x = _input((6, 3, 5, 4), channels_last, loc=100.0)
    rm, rv = _running(3)
    upstream = torch.tensor([1.3, 0.4, 2.2])
    t_loss, t_mean, t_var, t_grad = _per_group_truth(x, rm, rv, 3, upstream)
    xg = x.clone().requires_grad_()
    loss, mean, var = bmt.bn_matching_triton(xg, rm, rv, 3)
    (loss * upstream).sum().backward()
    _close(loss, t_loss, STAT_RTOL)
    _close(mean, t_mean, STAT_RTOL)
    _close(var, t_var, 1e-4)  # variance of a 100-mean channel: fp32 pivoted merges
    _close(xg.grad, t_grad, 1e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_module_grouped_output_loss_and_grad(backend, channels_last):
    """FusedBNMatching with groups: the eval-BN output is unchanged, the loss is one per group and
    dL/dx = dy * scale + each group's own matching gradient."""
    bn = nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.2, -0.1, 0.5, 1.0]))
        bn.running_var.copy_(torch.tensor([1.5, 0.7, 2.0, 0.9]))
        bn.weight.copy_(torch.tensor([1.1, 0.9, -0.5, 2.0]))
        bn.bias.copy_(torch.tensor([0.0, 0.3, -0.2, 0.1]))
    fused = FusedBNMatching.from_bn(bn, backend=backend)
    set_groups([fused], 2)
    x = _input((4, 4, 3, 3), channels_last).requires_grad_()
    y = fused(x)
    dy = torch.linspace(-1, 1, y.numel()).view_as(y)
    upstream = torch.tensor([0.8, 1.6])
    ((y * dy).sum() + (fused.last_loss * upstream).sum()).backward()

    xr = x.detach().clone().requires_grad_()
    y_ref = F.batch_norm(xr, bn.running_mean, bn.running_var, bn.weight.detach(), bn.bias.detach(), False, 0.0, bn.eps)
    (y_ref * dy).sum().backward()
    t_loss, _, _, t_grad = _per_group_truth(x, bn.running_mean, bn.running_var, 2, upstream)
    _close(y, y_ref, 1e-6)
    assert fused.last_loss.shape == (2,)
    _close(fused.last_loss, t_loss, STAT_RTOL)
    _close(x.grad, xr.grad + t_grad, GRAD_RTOL)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_groups_one_keeps_the_scalar_loss(backend):
    x = _input((3, 2, 2, 2), False)
    rm, rv = _running(2)
    loss, mean, var = bn_matching_stats(x, rm, rv, backend=backend, groups=1)
    assert loss.dim() == 0 and mean.shape == (2,) and var.shape == (2,)
    y, fused_loss = fused_bn_matching_torch(x, rm, rv, None, None, 1e-5, groups=1)
    assert fused_loss.dim() == 0
    _close(fused_loss, bn_matching_loss_reference(x, rm, rv), STAT_RTOL)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_uneven_groups_are_refused(backend):
    x = _input((5, 2, 2, 2), False)
    rm, rv = _running(2)
    with pytest.raises(ValueError, match="cannot be split into 2 equal groups"):
        bn_matching_stats(x, rm, rv, backend=backend, groups=2)
