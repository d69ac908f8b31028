"""Fused eval-BN + BN-matching loss in plain PyTorch, with a closed-form backward (CPU path).

Autograd through ``torch.var_mean`` keeps a graph of several full-size temporaries; the matching
loss's gradient is per-channel affine in x, so backward is one ``addcmul`` per layer:

    dL/dx = x * a_c + b_c,  a_c = 2 g_var,c / M,  b_c = g_mean,c / M - a_c * mean_c
    g_var = -(running_var - var) / ||running_var - var||   (0 where the norm is 0)

and the eval-mode BN output's gradient (dy * weight / sqrt(running_var + eps)) is added in the
same pass. Semantics are exactly those of ``bn_matching_reference``; tests compare them. With
``groups`` = G the batch is G independent groups (statistics, norms and a_c, b_c per group; the loss
is [G]); G = 1 keeps the 0-d loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .bn_matching_reference import check_groups

__all__ = ["FusedBNMatchingTorchFunction", "fused_bn_matching_torch"]


def _unit(diff: Tensor) -> tuple[Tensor, Tensor]:
    """Norms over the last dim and the unit vectors (0 where a norm is 0)."""
    norm = torch.linalg.vector_norm(diff, dim=-1, keepdim=True)
    unit = torch.where(norm > 0, diff / norm.clamp_min(torch.finfo(diff.dtype).tiny), torch.zeros_like(diff))
    return norm.squeeze(-1), unit


class FusedBNMatchingTorchFunction(torch.autograd.Function):
    """(y, loss) = (eval BN(x), ||rv - var(x)|| + ||rm - mean(x)||) per group; gradients w.r.t. x only."""

    @staticmethod
    def forward(ctx, x: Tensor, running_mean: Tensor, running_var: Tensor, scale: Tensor, shift: Tensor,
                groups: int = 1):
        check_groups(x, groups)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        xf = x if x.dtype == acc else x.to(acc)
        # [G, C] statistics; splitting the batch dim is a view in either memory format
        split = xf.unflatten(0, (groups, -1))
        if x.device.type == "cpu":
            # two passes (the mean, then the mean squared deviation): as stable as var_mean and 4-6x faster on
            # the CPU, whose var_mean reduces over non-adjacent dims slowly (100x64x28x28 NHWC: 3.3 vs 18.8 ms)
            centre = split.mean(dim=(1, 3, 4), keepdim=True)
            var, mean = (split - centre).square_().mean(dim=(1, 3, 4)), centre.reshape(groups, -1)
        else:  # one read, no full-size temporary
            var, mean = torch.var_mean(split, dim=(1, 3, 4), correction=0)
        norm_v, unit_v = _unit(running_var.to(acc) - var)
        norm_m, unit_m = _unit(running_mean.to(acc) - mean)
        loss = norm_v + norm_m
        y = torch.addcmul(shift.to(x.dtype).view(1, -1, 1, 1), x, scale.to(x.dtype).view(1, -1, 1, 1))
        ctx.save_for_backward(x, mean, unit_v, unit_m, scale)
        ctx.groups = groups
        return y, (loss[0] if groups == 1 else loss)

    @staticmethod
    def backward(ctx, grad_y: Tensor, grad_loss: Tensor):
        x, mean, unit_v, unit_m, scale = ctx.saved_tensors
        groups = ctx.groups
        count = x.numel() // (x.shape[1] * groups)
        g = grad_loss.reshape(groups, 1)
        # d loss / d var = -unit_v, d loss / d mean = -unit_m  (each [G, C])
        a = -2.0 * unit_v * g / count
        b = -unit_m * g / count - a * mean
        shape = (groups, 1, -1, 1, 1)
        grad_x = torch.addcmul(b.to(x.dtype).view(shape), x.unflatten(0, (groups, -1)),
                               a.to(x.dtype).view(shape)).flatten(0, 1)
        if grad_y is not None:
            grad_x = torch.addcmul(grad_x, grad_y, scale.to(x.dtype).view(1, -1, 1, 1))
        return grad_x, None, None, None, None, None


def fused_bn_matching_torch(x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor | None,
                            bias: Tensor | None, eps: float, groups: int = 1) -> tuple[Tensor, Tensor]:
    """Eval-mode BN output and the matching loss (0-d, or [G] with groups > 1) from one autograd node
    (no activation copies)."""
    inv_std = torch.rsqrt(running_var.float() + eps)
    scale = inv_std * (weight.float() if weight is not None else 1.0)
    shift = (bias.float() if bias is not None else 0.0) - running_mean.float() * scale
    return FusedBNMatchingTorchFunction.apply(x, running_mean, running_var, scale.detach(), shift.detach(), groups)
