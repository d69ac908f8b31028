"""Eval-mode BatchNorm2d that also records its layer's BN-matching loss (for synthesis/recovery).

SRe2L-style recovery runs a frozen teacher in eval mode and, at every BN layer, compares the
statistics of the layer's input with the layer's running statistics. Hooks would read each BN
input twice (once for BN, once for the statistics); ``FusedBNMatching`` reads it once on the
Triton backend (and the torch backend, via ``fused_bn_torch``): one forward pass writes ``y`` and the statistics, one
backward kernel writes ``dy * weight / sqrt(running_var + eps) + dL_match/dx``.

Usage::

    with fused_bn_matching(teacher, backend="auto") as bns:
        logits = teacher(images)
        loss_bn = sum(m.last_loss for m in bns)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .bn_matching import BACKENDS, resolve_backend
from .fused_bn_torch import fused_bn_matching_torch

__all__ = ["FusedBNMatching", "swap_in_fused_bn", "restore_bn", "fused_bn_matching", "weighted_matching_loss",
           "set_groups"]

_BN_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm)
_STATE_NAMES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class FusedBNMatching(nn.Module):
    """Eval-mode BN output plus ``last_loss`` = BN-matching loss of this call's input.

    Parameters and buffers are the wrapped BN's own tensors under the same names, so a model's
    ``state_dict`` keys do not change while it is swapped in. They are treated as frozen: no
    gradient reaches weight, bias or the running statistics, and the running statistics are never
    updated (the output is always the eval-mode one, whatever ``self.training`` says).

    Attributes:
        backend: "auto" | "triton" | "torch" (see ``kernels.bn_matching``).
        enabled: when False, behaves as plain eval-mode BN and sets ``last_loss`` to None.
        groups: the input's batch is this many independent equal class-batches (recover's
            ``groups_per_step``): statistics and the loss are per group. The BN output does not
            depend on it (eval mode: running statistics).
        last_loss: fp32 scalar of the latest forward (differentiable w.r.t. the input), [groups]
            when groups > 1, or None.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, backend: str = "auto") -> None:
        super().__init__()
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError("FusedBNMatching needs a BatchNorm with running statistics (track_running_stats=True)")
        self.num_features = bn.num_features
        self.eps = float(bn.eps)
        self.backend = backend
        self.enabled = True
        self.groups = 1
        self.last_loss: Tensor | None = None
        for name in _STATE_NAMES:
            value = getattr(bn, name, None)
            if isinstance(value, nn.Parameter):
                self.register_parameter(name, value)
            elif name in bn._buffers:
                self.register_buffer(name, value)
            else:
                setattr(self, name, None)
        # Kept outside the module tree so it is neither a submodule nor part of state_dict.
        object.__setattr__(self, "_original_bn", bn)

    @classmethod
    def from_bn(cls, bn: nn.modules.batchnorm._BatchNorm, backend: str = "auto") -> "FusedBNMatching":
        return cls(bn, backend=backend)

    def original_bn(self) -> nn.Module:
        """The wrapped BN, with this module's current parameters and buffers written back."""
        bn = self._original_bn
        for name in _STATE_NAMES:
            if name in self._parameters:
                bn._parameters[name] = self._parameters[name]
            elif name in self._buffers:
                bn._buffers[name] = self._buffers[name]
        return bn

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"FusedBNMatching expects [N, C, H, W] input, got shape {tuple(x.shape)}")
        weight = self.weight.detach() if self.weight is not None else None
        bias = self.bias.detach() if self.bias is not None else None
        if not self.enabled:
            self.last_loss = None
            return F.batch_norm(x, self.running_mean, self.running_var, weight, bias, False, 0.0, self.eps)
        if resolve_backend(self.backend, x) == "triton":
            from .bn_matching_triton import fused_bn_matching_triton

            y, loss = fused_bn_matching_triton(x, self.running_mean, self.running_var, weight, bias, self.eps,
                                               self.groups)
        else:
            y, loss = fused_bn_matching_torch(x, self.running_mean, self.running_var, weight, bias, self.eps,
                                              self.groups)
        self.last_loss = loss
        return y

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, backend={self.backend!r}, groups={self.groups}"


def swap_in_fused_bn(model: nn.Module, backend: str = "auto") -> list[FusedBNMatching]:
    """Replace every BatchNorm2d/SyncBatchNorm in ``model`` by a ``FusedBNMatching``, in place.

    Returns the new modules in registration order, which is the forward order for torchvision
    ResNets (and most CNNs); a BN registered under several parents is wrapped once. Undo with
    ``restore_bn``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown BN-matching backend {backend!r}; expected one of {BACKENDS}")
    if isinstance(model, _BN_TYPES):
        raise ValueError("swap_in_fused_bn needs a container module, not a bare BatchNorm")
    wrapped: dict[int, FusedBNMatching] = {}
    order: list[FusedBNMatching] = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _BN_TYPES):
                fused = wrapped.get(id(child))
                if fused is None:
                    fused = FusedBNMatching.from_bn(child, backend=backend)
                    wrapped[id(child)] = fused
                    order.append(fused)
                setattr(parent, name, fused)
    return order


def set_groups(modules: Sequence[FusedBNMatching], groups: int) -> None:
    """Make the next forward treat its batch as ``groups`` independent equal class-batches."""
    if groups < 1:
        raise ValueError(f"groups={groups} must be >= 1")
    for m in modules:
        m.groups = groups


def restore_bn(model: nn.Module) -> None:
    """Put back the original BN modules replaced by ``swap_in_fused_bn`` (state kept in sync)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FusedBNMatching):
                setattr(parent, name, child.original_bn())


@contextlib.contextmanager
def fused_bn_matching(model: nn.Module, backend: str = "auto") -> Iterator[list[FusedBNMatching]]:
    """Context manager: BN layers of ``model`` swapped for ``FusedBNMatching`` inside the block."""
    modules = swap_in_fused_bn(model, backend=backend)
    try:
        yield modules
    finally:
        restore_bn(model)


def weighted_matching_loss(modules: Sequence[FusedBNMatching], first_multiplier: float = 1.0) -> Tensor:
    """Sum of the modules' ``last_loss``, the first one scaled by ``first_multiplier`` (SRe2L's
    ``first_bn_multiplier``). Modules whose last forward recorded no loss are skipped."""
    losses = [m.last_loss for m in modules if m.last_loss is not None]
    if not losses:
        raise RuntimeError("no FusedBNMatching module has recorded a loss; run a forward pass first")
    total = losses[0] * first_multiplier
    for loss in losses[1:]:
        total = total + loss
    return total
