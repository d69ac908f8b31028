"""How a training step runs on its device: bf16 autocast, memory layout, optimizer kernels, copies, compilation.

One set of rules for students, pretraining, the probe and the supervised teacher. bf16 is autocast
around the forward only: weights, optimizer state and BatchNorm running statistics stay fp32 (the
module is never cast), and callers compute their losses from fp32 logits.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional, Sequence

import torch
from torch import nn

from engine.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16")
"""auto: bf16 on CUDA and on a CPU with native bf16 arithmetic (AVX512-BF16/AMX), else fp32 (as
deepspeed.bf16's None)."""


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 convolutions and matmuls natively on this CPU (AVX512-BF16 or AMX). Without
    it bf16 is emulated and slower than fp32, so ``auto`` stays fp32 there (most laptops)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN's bf16 query
        return False


def check_precision(precision: str, key: str) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"{key}={precision!r} is not one of {'|'.join(PRECISIONS)}")


def resolve_precision(precision: str, device: torch.device) -> str:
    """fp32 | bf16: what ``precision`` means on ``device``."""
    check_precision(precision, "precision")
    if precision == "auto":
        kind = torch.device(device).type
        return "bf16" if kind == "cuda" or (kind == "cpu" and cpu_has_native_bf16()) else "fp32"
    return precision


def autocast(precision: str, device: torch.device):
    """The forward's context: torch.autocast(bfloat16) for bf16, nothing for fp32. Without the weight-cast
    cache: a forward casts each weight once anyway, and a CUDA graph capture must not keep a cache."""
    if resolve_precision(precision, device) != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, cache_enabled=False)


def use_channels_last(choice: Optional[bool], device: torch.device, precision: str = "fp32") -> bool:
    """None: channels_last on CUDA (cuDNN's NHWC kernels) and on the CPU under bf16, the default layout for
    fp32 on the CPU. Default student (ConvNet, 28 px, batch 100, 1 thread, AMX CPU; benchmarks/student_speed.py):
    fp32 1.00x, fp32+NHWC 1.34x, bf16 1.45x, bf16+NHWC 2.90x: oneDNN's bf16 kernels want NHWC. fp32 keeps the
    default layout on the CPU so fp32 results stay bit-equal to runs made before the setting. Stored
    relabeling runs its teacher in the same layout and precision (relabel.py), so online and stored labels
    agree either way."""
    if choice is not None:
        return bool(choice)
    kind = torch.device(device).type
    return kind == "cuda" or (kind == "cpu" and resolve_precision(precision, device) == "bf16")


def optimizer_options(device: torch.device) -> dict:
    """Multi-tensor kernels: fused AdamW/SGD on CUDA (one kernel for all parameters), foreach on the
    CPU (the CPU has no fused SGD; foreach groups the per-parameter loops). Same update either way."""
    return {"fused": True} if torch.device(device).type == "cuda" else {"foreach": True}


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch onto ``device``: through pinned memory without blocking on CUDA, as is elsewhere."""
    return to_device_all([tensor], device)[0]


def cached_on_device(make):
    """Decorator: ``make(*args)`` (tensors built on a device from hashable arguments such as the device and
    dtype) runs once per arguments and is kept. For constants a training step would otherwise copy from the
    host every step (a pageable copy makes the host wait for the GPU). They are made outside inference mode
    and without autograd: plain tensors that later steps may use while recording gradients."""

    @functools.lru_cache(maxsize=None)
    @functools.wraps(make)
    def cached(*args):
        with torch.inference_mode(False), torch.no_grad():
            return make(*args)

    return cached


_ALIGN = 16
"""Byte alignment of each tensor in a packed transfer: any dtype's view of its slice starts aligned."""


def to_device_all(tensors: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """``tensors`` on ``device``, the host ones moved in ONE copy: every host->device transfer of a training
    step goes through here.

    A copy from pageable host memory makes the host wait for the stream (CUDA's rule for pageable
    transfers), so a step with several small copies (crop boxes, flips, jitter factors) can never run
    ahead of the GPU and becomes launch-bound. On CUDA the host tensors' bytes are gathered into one
    pinned buffer and copied without blocking (the caching host allocator keeps the buffer alive until
    the copy has run); on other non-CPU devices into one ordinary buffer, so tests on the meta device
    see the same single copy. On the CPU the tensors come back unchanged (no copy, bit-equal results).
    Values and shapes are kept; a packed tensor arrives contiguous."""
    device = torch.device(device)
    tensors = list(tensors)
    host = [i for i, t in enumerate(tensors) if t.device.type == "cpu"]
    if device.type == "cpu" or not host:
        return [t.to(device) for t in tensors]
    out = [t if t.device.type == "cpu" else t.to(device) for t in tensors]  # the latter: no copy, or not ours
    if len(host) == 1 and device.type == "cuda":  # pinning copies it anyway: no packing needed
        out[host[0]] = tensors[host[0]].pin_memory().to(device, non_blocking=True)
        return out
    buffer, starts = pack_bytes([tensors[i] for i in host], pin=device.type == "cuda")
    moved = buffer.to(device, non_blocking=device.type == "cuda")
    for i, part in zip(host, unpack_bytes(moved, starts, [tensors[i] for i in host])):
        out[i] = part
    return out


def pack_bytes(tensors: Sequence[torch.Tensor], pin: bool = False) -> tuple[torch.Tensor, list[int]]:
    """(one uint8 host buffer holding every tensor's bytes, each one's start), each start aligned."""
    starts, total = [], 0
    for t in tensors:
        starts.append(total)
        total += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    buffer = torch.empty(total, dtype=torch.uint8, pin_memory=pin)
    for t, part in zip(tensors, unpack_bytes(buffer, starts, tensors)):
        part.copy_(t)
    return buffer, starts


def unpack_bytes(buffer: torch.Tensor, starts: Sequence[int], like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``pack_bytes``' inverse on ``buffer`` (or its copy on a device): views of its bytes as contiguous
    tensors of ``like``'s dtypes and shapes."""
    return [buffer[start:start + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
            for start, t in zip(starts, like)]


def layout(module: nn.Module, channels_last: bool) -> nn.Module:
    """``module`` in NHWC (4-d weights only; the others are unaffected) or the default layout."""
    return module.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@contextlib.contextmanager
def compiled(modules: Sequence[nn.Module]):
    """Inside: each of ``modules`` (none: nothing changes) runs its forward (and so its backward) through
    torch.compile: fused BatchNorm+ReLU and elementwise kernels, fewer launches. ``nn.Module.compile`` works in
    place, so state_dict keys, checkpoints and resume stay those of the plain modules; ``dynamic=False``: a new
    batch shape compiles once more instead of tracing symbolic shapes. On leaving, the modules run eagerly
    again, so later users (the probe, relabeling, a saved teacher) never pay a recompilation for their shapes."""
    for module in modules:
        module.compile(dynamic=False)
    try:
        yield
    finally:
        for module in modules:
            module._compiled_call_impl = None  # what Module.compile set; None is the eager path
