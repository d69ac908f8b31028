"""Pure-PyTorch reference for the BN-matching loss (defines the semantics; also the CPU path).

For one BatchNorm layer's input ``x`` [N, C, H, W] and the layer's running statistics:

    mean_c = mean over (N, H, W) of x[:, c]
    var_c  = biased variance over (N, H, W) of x[:, c]
    loss   = ||running_var - var||_2 + ||running_mean - mean||_2

(plain L2 norms, not squared, as in SRe2L's recovery loss). With ``groups=G`` the batch is G
independent class-batches of N/G images each (``x.unflatten(0, (G, N // G))``): statistics are per
(group, channel) and the loss is one value per group ([G]); ``groups=1`` keeps the 0-d loss.
All accumulation is in fp32 (fp64 when ``x`` is fp64, so ``gradcheck`` can run through this file).
Where a norm's argument is exactly zero its gradient is zero, which is what
``torch.linalg.vector_norm``'s backward gives.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_groups", "bn_stats_reference", "bn_matching_loss_reference", "matching_loss_from_stats",
           "compute_dtype"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for an input dtype: fp64 stays fp64, everything else runs in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_groups(x: Tensor, groups: int) -> int:
    """Images per group of x [N, ...] split into ``groups`` equal groups (ValueError otherwise)."""
    if groups < 1 or x.shape[0] % groups:
        raise ValueError(f"a batch of {x.shape[0]} images cannot be split into {groups} equal groups")
    return x.shape[0] // groups


def bn_stats_reference(x: Tensor, groups: int = 1) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x`` [N, C, H, W] over (N, H, W).

    With ``groups`` > 1: ([G, C], [G, C]) over each group's (N/G, H, W).

    Returns ``(mean, var)``, each [C] in fp32 (fp64 for fp64 input). No permute/contiguous copy:
    ``torch.var_mean`` reduces over the dims in place for NCHW and channels_last alike and uses a
    Welford-style (shift-invariant) algorithm, so large-mean inputs keep their small variance.
    Half-precision inputs are upcast once (one fp32 copy of ``x``) because reducing them in their
    own dtype would round the statistics to 8-11 mantissa bits.
    """
    if x.dim() != 4:
        raise ValueError(f"bn_stats_reference expects a 4-D [N, C, H, W] tensor, got shape {tuple(x.shape)}")
    check_groups(x, groups)
    xf = x.to(compute_dtype(x.dtype))
    if groups == 1:
        var, mean = torch.var_mean(xf, dim=(0, 2, 3), correction=0)
    else:
        # Splitting the batch dim is a view for NCHW and channels_last alike: no copy.
        var, mean = torch.var_mean(xf.unflatten(0, (groups, -1)), dim=(1, 3, 4), correction=0)
    return mean, var


def bn_matching_loss_reference(x: Tensor, running_mean: Tensor, running_var: Tensor, groups: int = 1) -> Tensor:
    """``||running_var - var(x)||_2 + ||running_mean - mean(x)||_2`` as a differentiable scalar.

    Args:
        x: [N, C, H, W], fp32/fp16/bf16 (fp64 accepted for gradcheck), any memory format.
        running_mean, running_var: [C]; cast to the accumulation dtype (fp32, or fp64).
        groups: independent equal groups of the batch (see the module docstring).
    Returns:
        0-d tensor in fp32 (fp64 for fp64 input), [G] with groups > 1; ``backward`` gives dL/dx in
        ``x.dtype``.
    """
    mean, var = bn_stats_reference(x, groups)
    return matching_loss_from_stats(mean, var, running_mean, running_var)


def matching_loss_from_stats(mean: Tensor, var: Tensor, running_mean: Tensor, running_var: Tensor) -> Tensor:
    """The loss from already computed batch statistics ([C], or [G, C] for one loss per group [G]);
    computed in mean's dtype."""
    _check_stats_shape(running_mean, running_var, mean.shape[-1])
    rm = running_mean.to(device=mean.device, dtype=mean.dtype)
    rv = running_var.to(device=mean.device, dtype=mean.dtype)
    return torch.linalg.vector_norm(rv - var, dim=-1) + torch.linalg.vector_norm(rm - mean, dim=-1)


def _check_stats_shape(running_mean: Tensor, running_var: Tensor, channels: int) -> None:
    if running_mean.shape != (channels,) or running_var.shape != (channels,):
        raise ValueError(
            f"running_mean/running_var must have shape [{channels}], got "
            f"{tuple(running_mean.shape)} and {tuple(running_var.shape)}"
        )
