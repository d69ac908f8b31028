"""FusedBNMatching (compiled Triton) swapped into torchvision ResNets on CUDA against the hook path
(plain eval BN + forward hooks computing the reference loss): logits, per-layer losses and the input
gradient of CE + r_bn * BN loss, TF32 off, NCHW and channels_last."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision

from engine.models.resnet import resnet18_cifar
from kernels import bn_matching_loss_reference, fused_bn_matching

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
FIRST_BN_MULTIPLIER = 10.0
R_BN = 0.01


def _network(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "resnet18_cifar":
        net = resnet18_cifar(3)
        net.fc = torch.nn.Linear(net.out_dim, 100)
    else:
        net = getattr(torchvision.models, name)(weights=None, num_classes=1000)
    # BN statistics that are not the init's 0/1: a few training-mode forwards on shifted inputs.
    size = 32 if name == "resnet18_cifar" else 224
    net.train()
    with torch.no_grad():
        for i in range(2):
            net(torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(i)) * 1.3 + 0.2)
    return net.eval().requires_grad_(False).to(CUDA), size


def _hook_path(net, x, labels):
    losses = []

    def hook(module, inputs, _output):
        losses.append(bn_matching_loss_reference(inputs[0], module.running_mean, module.running_var))

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    try:
        x = x.detach().clone().requires_grad_()
        logits = net(x)
        bn = losses[0] * FIRST_BN_MULTIPLIER + sum(losses[1:])
        (F.cross_entropy(logits, labels) + R_BN * bn).backward()
    finally:
        for h in handles:
            h.remove()
    return logits.detach(), torch.stack([l.detach() for l in losses]), x.grad


def _fused_path(net, x, labels):
    with fused_bn_matching(net, backend="triton") as modules:
        x = x.detach().clone().requires_grad_()
        logits = net(x)
        losses = [m.last_loss for m in modules]
        bn = losses[0] * FIRST_BN_MULTIPLIER + sum(losses[1:])
        (F.cross_entropy(logits, labels) + R_BN * bn).backward()
    return logits.detach(), torch.stack([l.detach() for l in losses]), x.grad


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet18_cifar"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_fused_resnet_matches_hook_path(no_tf32, name, channels_last):
    net, size = _network(name)
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(4, 3, size, size, generator=g) * 1.1).to(CUDA)
    labels = torch.randint(0, 100, (4,), generator=g).to(CUDA)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    logits_h, losses_h, grad_h = _hook_path(net, x, labels)
    logits_f, losses_f, grad_f = _fused_path(net, x, labels)
    assert len(losses_f) == len(losses_h) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    scale = logits_h.abs().max().item()
    torch.testing.assert_close(logits_f, logits_h, rtol=1e-4, atol=1e-4 * scale)
    torch.testing.assert_close(losses_f, losses_h, rtol=1e-4, atol=1e-6)
    gscale = grad_h.abs().max().item()
    if not channels_last:
        torch.testing.assert_close(grad_f, grad_h, rtol=1e-3, atol=1e-3 * gscale)
        return
    # NHWC: cuDNN's channels-last convolutions round differently, so the input gradient of the plain hook
    # path itself moves by 1.2% (ResNet-18) / 4.6% (ResNet-50) of its scale between NCHW and NHWC (an H200
    # run). The fused NHWC gradient must sit within that layout noise of the hook NHWC one.
    _, _, grad_h_nchw = _hook_path(net.to(memory_format=torch.contiguous_format), x.contiguous(), labels)
    layout_noise = (grad_h - grad_h_nchw).abs().max().item()
    assert (grad_f - grad_h).abs().max().item() <= 2 * layout_noise + 1e-3 * gscale
