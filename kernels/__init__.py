"""Kernels for SC-DD: the BN-matching loss (Triton + PyTorch reference) and a fused BN module.

Importing this package does not import Triton; the Triton modules load on first use, so it works
on CPU-only machines without ``TRITON_INTERPRET``.
"""

from .bn_matching import BACKENDS, bn_matching_loss, bn_matching_stats, resolve_backend
from .bn_matching_reference import bn_matching_loss_reference, bn_stats_reference
from .fused_bn import (FusedBNMatching, fused_bn_matching, restore_bn, set_groups, swap_in_fused_bn,
                       weighted_matching_loss)

__all__ = [
    "BACKENDS",
    "bn_matching_loss",
    "bn_matching_stats",
    "resolve_backend",
    "bn_matching_loss_reference",
    "bn_stats_reference",
    "FusedBNMatching",
    "fused_bn_matching",
    "swap_in_fused_bn",
    "restore_bn",
    "set_groups",
    "weighted_matching_loss",
]
