"""Functional entry point for the BN-matching loss: picks the Triton kernel or the torch reference.

``backend``:
  * ``"auto"``   - Triton when ``x`` is a CUDA tensor, else the pure-PyTorch reference.
  * ``"triton"`` - always Triton; CPU tensors only under ``TRITON_INTERPRET=1`` (tests).
  * ``"torch"``  - always the reference (``kernels.bn_matching_reference``).
The Triton module is imported on first use only, so ``import kernels`` stays cheap.
"""

from __future__ import annotations

import os

from torch import Tensor

from .bn_matching_reference import bn_matching_loss_reference, bn_stats_reference, matching_loss_from_stats

__all__ = ["BACKENDS", "resolve_backend", "bn_matching_loss", "bn_matching_stats"]

BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, x: Tensor) -> str:
    """Map ``backend`` to the concrete ``"triton"`` or ``"torch"`` for input ``x``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown BN-matching backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        return "triton" if x.is_cuda else "torch"
    if backend == "triton" and not x.is_cuda and not triton_interpreter_enabled():
        raise RuntimeError(
            "backend='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 set before kernels are imported); "
            "use backend='torch' or 'auto' on CPU"
        )
    return backend


def bn_matching_loss(x: Tensor, running_mean: Tensor, running_var: Tensor, backend: str = "auto",
                     groups: int = 1) -> Tensor:
    """``||running_var - var(x)||_2 + ||running_mean - mean(x)||_2`` for x [N, C, H, W].

    Returns an fp32 scalar, differentiable w.r.t. ``x`` (dL/dx in x's dtype). With ``groups`` = G > 1
    the N images are G independent groups of N/G: one loss per group, [G].
    """
    if resolve_backend(backend, x) == "triton":
        from .bn_matching_triton import bn_matching_loss_triton

        return bn_matching_loss_triton(x, running_mean, running_var, groups)
    return bn_matching_loss_reference(x, running_mean, running_var, groups)


def bn_matching_stats(
    x: Tensor, running_mean: Tensor, running_var: Tensor, backend: str = "auto", groups: int = 1
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, mean, var): the loss as in ``bn_matching_loss`` plus the batch statistics [C] fp32
    ([G], [G, C], [G, C] with ``groups`` > 1).

    Only ``loss`` is differentiable through the Triton backend; the torch backend's mean/var
    stay attached to the graph.
    """
    if resolve_backend(backend, x) == "triton":
        from .bn_matching_triton import bn_matching_triton

        return bn_matching_triton(x, running_mean, running_var, groups)
    mean, var = bn_stats_reference(x, groups)
    return matching_loss_from_stats(mean, var, running_mean, running_var), mean, var
