"""A BN layer's matching work on the Triton path is one kernel launch forward and one backward.

Recover's step is bound by fixed per-layer costs on the GPU (issue 14), so the fused module may not
launch anything besides its two kernels: no merge or loss kernels, no rsqrt/mul for the BN scale, no
clone of the loss. Kernel launches are counted at the Triton kernels; every other device computation
would pass through the torch dispatcher, which records it here.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import kernels.bn_matching_triton as bmt
from kernels import bn_matching_reference, swap_in_fused_bn

# Ops that only allocate or re-view memory: no kernel runs for them on a device.
_NO_COMPUTE = {"empty", "empty_like", "empty_strided", "view", "reshape", "_reshape_alias", "as_strided",
               "detach", "alias", "select", "unsqueeze", "squeeze", "expand", "_unsafe_view"}


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


class _CountLaunches:
    """Stands in for a Triton kernel object and counts ``kernel[grid](...)`` launches."""

    def __init__(self, kernel, counts: dict, name: str):
        self._kernel, self._counts, self._name = kernel, counts, name

    def __getitem__(self, grid):
        self._counts[self._name] = self._counts.get(self._name, 0) + 1
        launcher = self._kernel[grid]

        def launch(*args, **kwargs):
            # The interpreter's own tensor copies are the kernel's work, not work besides it.
            with _disable_current_modes():
                return launcher(*args, **kwargs)

        return launch


def _bn(c: int, seed: int = 0) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c, eps=1e-3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        bn.weight.copy_(torch.randn(c, generator=g))
        bn.bias.copy_(torch.randn(c, generator=g))
    return bn.eval().requires_grad_(False)


def _digits_batch(n: int, channels: int) -> torch.Tensor:
    """Real 8x8 digit images, channels made from shifted copies (no noise-only data)."""
    from sklearn.datasets import load_digits

    images = torch.from_numpy(load_digits().images[:n]).float() / 16.0  # [n, 8, 8]
    return torch.stack([images.roll(k, dims=-1) * (1 + 0.1 * k) for k in range(channels)], dim=1)


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_fused_layer_is_one_launch_forward_and_one_backward(monkeypatch, groups, channels_last):
    counts: dict[str, int] = {}
    for name in ("_bn_matching_fwd_kernel", "_bn_matching_bwd_kernel"):
        monkeypatch.setattr(bmt, name, _CountLaunches(getattr(bmt, name), counts, name))
    # Small tiles: several programs per (group, channel block), so the tickets decide who merges.
    monkeypatch.setattr(bmt, "_TILE_ELEMS", 16)
    monkeypatch.setattr(bmt, "_MAX_BLOCK_HW", 8)
    monkeypatch.setattr(bmt, "_MAX_BLOCK_C", 4)
    monkeypatch.setattr(bmt, "_target_programs", lambda *_: 1000)
    container = nn.Sequential(_bn(6))
    (fused,) = swap_in_fused_bn(container, backend="triton")
    fused.groups = groups
    x = _digits_batch(6, 6)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    grad_y = torch.ones_like(x) * 0.5  # made before recording: it is the caller's tensor
    grad_loss = torch.linspace(0.5, 1.5, groups) if groups > 1 else torch.tensor(1.0)
    bmt._tickets(x.device, 1)  # the one-time allocation of the ticket counters happens before

    with _RecordOps() as recorded:
        y = container(x)
        torch.autograd.backward([y, fused.last_loss], [grad_y, grad_loss])

    assert counts == {"_bn_matching_fwd_kernel": 1, "_bn_matching_bwd_kernel": 1}
    computing = [op for op in recorded.ops if op not in _NO_COMPUTE]
    assert computing == [], f"device work besides the two kernels: {computing}"

    # ... and the single launches still compute the right thing.
    xr = x.detach().double().requires_grad_()
    bn64 = _bn(6).double()
    y_ref = bn64(xr)
    loss_ref = bn_matching_reference.bn_matching_loss_reference(xr, bn64.running_mean, bn64.running_var, groups)
    torch.autograd.backward([y_ref, loss_ref], [grad_y.double(), grad_loss.double()])
    torch.testing.assert_close(y.detach().double(), y_ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.last_loss.detach().double(), loss_ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-6)


def test_tickets_are_left_at_zero_and_calls_repeat(monkeypatch):
    """Every launch resets the tickets it drew; a missed reset would leave the next call unmerged."""
    monkeypatch.setattr(bmt, "_TILE_ELEMS", 16)
    monkeypatch.setattr(bmt, "_MAX_BLOCK_HW", 8)
    monkeypatch.setattr(bmt, "_MAX_BLOCK_C", 4)
    monkeypatch.setattr(bmt, "_target_programs", lambda *_: 1000)
    bn = _bn(6)
    x = _digits_batch(8, 6)
    first = [t.clone() for t in bmt.bn_matching_triton(x, bn.running_mean, bn.running_var, 2)]
    tickets = bmt._TICKETS[("cpu", None)]
    assert int(tickets.abs().sum()) == 0
    for _ in range(2):
        again = bmt.bn_matching_triton(x, bn.running_mean, bn.running_var, 2)
        for a, b in zip(first, again):
            assert torch.equal(a, b)
    assert int(tickets.abs().sum()) == 0
    mean, var = bn_matching_reference.bn_stats_reference(x.double(), 2)
    torch.testing.assert_close(first[1].double(), mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(first[2].double(), var, rtol=1e-5, atol=1e-6)
