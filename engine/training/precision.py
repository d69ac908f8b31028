"""How a training step runs on its device: bf16 autocast, memory layout, optimizer kernels, copies.

One set of rules for students, pretraining, the probe and the supervised teacher. bf16 is autocast
around the forward only: weights, optimizer state and BatchNorm running statistics stay fp32 (the
module is never cast), and callers compute their losses from fp32 logits.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

from engine.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16")
"""auto: bf16 on CUDA, fp32 on the CPU (as deepspeed.bf16's None)."""


def check_precision(precision: str, key: str) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"{key}={precision!r} is not one of {'|'.join(PRECISIONS)}")


def resolve_precision(precision: str, device: torch.device) -> str:
    """fp32 | bf16: what ``precision`` means on ``device``."""
    check_precision(precision, "precision")
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return precision


def autocast(precision: str, device: torch.device):
    """The forward's context: torch.autocast(bfloat16) for bf16, nothing for fp32."""
    if resolve_precision(precision, device) != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def use_channels_last(choice: Optional[bool], device: torch.device) -> bool:
    """None: channels_last on CUDA (cuDNN's NHWC kernels), the default layout on the CPU. On the CPU NHWC
    measured 1.0-1.5x for the default fp32 student and 1.6x under bf16 (benchmarks/student_speed.py, oneDNN
    with AMX, noisy shared cores), but it changes fp32 rounding (~1e-6), and stored relabeling's teacher
    forward runs in the default layout: online and stored labels stay bit-equal only without it."""
    return torch.device(device).type == "cuda" if choice is None else bool(choice)


def optimizer_options(device: torch.device) -> dict:
    """Multi-tensor kernels: fused AdamW/SGD on CUDA (one kernel for all parameters), foreach on the
    CPU (the CPU has no fused SGD; foreach groups the per-parameter loops). Same update either way."""
    return {"fused": True} if torch.device(device).type == "cuda" else {"foreach": True}


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch onto ``device``: through pinned memory without blocking on CUDA, as is elsewhere."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def layout(module: nn.Module, channels_last: bool) -> nn.Module:
    """``module`` in NHWC (4-d weights only; the others are unaffected) or the default layout."""
    return module.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
