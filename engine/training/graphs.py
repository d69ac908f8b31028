"""A whole training step (forward, loss, backward, optimizer) captured once as a CUDA graph and replayed.

Small batches of distilled sets leave a GPU step bound by kernel launches: a ResNet-18 student step at
batch 64 keeps the GPU busy 3.6 ms of about 19 ms on an H200 (benchmarks/student_speed.py --profile).
A replay launches the step's kernels as one graph. What a captured step needs from its function:
- it reads its inputs only from the device tensors it is given (the static buffers here), and its
  operations do not depend on host values of the batch (no host branches on what was drawn);
- a capturable optimizer whose learning rate is a device tensor the step writes from its inputs;
- no read-back (``.item()``, boolean masks), and autocast without its weight-cast cache.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from engine.errors import ConfigError
from engine.training.precision import pack_bytes, to_device_all, unpack_bytes

GRAPH_WARMUP_STEPS = 3
"""Eager steps of the captured shape before the capture: they create the optimizer state, pick cuDNN's
algorithms and warm the allocator (real steps, on a side stream as CUDA graph capture asks)."""


def require_cuda_graphs(device: torch.device, key: str) -> None:
    """One line refusing ``key``=true off CUDA."""
    if torch.device(device).type != "cuda":
        raise ConfigError(f"{key}=true needs a CUDA device (this run is on {torch.device(device).type}); "
                          f"set {key}=false")


def plain_lr(state: dict) -> dict:
    """An optimizer state dict with a device lr tensor (a CUDA-graph run's) as the float it holds: checkpoints
    hold plain numbers, loadable by any run."""
    for group in state.get("param_groups", []):
        if isinstance(group.get("lr"), torch.Tensor):
            group["lr"] = float(group["lr"])
    return state


def _signature(host: Sequence[torch.Tensor]) -> tuple:
    return tuple((tuple(t.shape), t.dtype, t.device.type) for t in host)


def _on_host(tensors: Sequence[torch.Tensor]) -> list[int]:
    return [i for i, t in enumerate(tensors) if t.device.type == "cpu"]


class CapturedStep:
    """``CapturedStep(step, device)(host_tensors)``: ``step(device_tensors) -> tensor`` (its output, e.g. the
    loss) run on this call's host tensors, moved in one copy.

    The first input shapes seen run eagerly ``warmup`` times, are then captured (the capture computes
    nothing, so that step is replayed at once) and replayed for every later call of those shapes: each
    replay copies the call's host tensors into the graph's one static input buffer (a pinned, non-blocking
    copy) and its device tensors (a batch gathered from a set held on the GPU) into their own static copies,
    and launches the graph. Other shapes (an epoch's last, smaller batch) run eagerly on the same state.
    Returns a copy of the output (the graph's own is overwritten by the next replay)."""

    def __init__(self, step: Callable[[list[torch.Tensor]], torch.Tensor], device: torch.device,
                 warmup: int = GRAPH_WARMUP_STEPS, before_capture: Optional[Callable[[], None]] = None,
                 key: str = "cuda_graphs") -> None:
        require_cuda_graphs(device, key)
        self.step, self.device, self.warmup, self.key = step, torch.device(device), warmup, key
        self.before_capture = before_capture
        self.signature: Optional[tuple] = None
        self.eager_calls = 0
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.static: Optional[torch.Tensor] = None
        self.static_device: dict[int, torch.Tensor] = {}
        self.output: Optional[torch.Tensor] = None
        self.side = torch.cuda.Stream(device=self.device)

    def __call__(self, host: Sequence[torch.Tensor]) -> torch.Tensor:
        signature = _signature(host)
        if self.signature is None:
            self.signature = signature  # the first batch's shapes are the full batch's
        if signature != self.signature:
            return self.step(to_device_all(host, self.device))
        if self.graph is not None:
            on_host = _on_host(host)
            buffer, _ = pack_bytes([host[i] for i in on_host], pin=True)
            self.static.copy_(buffer, non_blocking=True)
            for i, static in self.static_device.items():  # inputs already on the device (a set held there)
                static.copy_(host[i])
            self.graph.replay()
            return self.output.clone()
        if self.eager_calls < self.warmup:
            self.eager_calls += 1
            self.side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.side):
                out = self.step(to_device_all(host, self.device))
            torch.cuda.current_stream(self.device).wait_stream(self.side)
            return out
        return self._capture(host)

    def _capture(self, host: Sequence[torch.Tensor]) -> torch.Tensor:
        on_host = _on_host(host)
        buffer, starts = pack_bytes([host[i] for i in on_host], pin=True)
        self.static = torch.empty(buffer.numel(), dtype=torch.uint8, device=self.device)
        self.static.copy_(buffer, non_blocking=True)
        inputs = list(host)
        for i, part in zip(on_host, unpack_bytes(self.static, starts, [host[i] for i in on_host])):
            inputs[i] = part
        self.static_device = {i: t.clone() for i, t in enumerate(host) if i not in on_host}
        for i, static in self.static_device.items():
            inputs[i] = static
        if self.before_capture is not None:
            self.before_capture()
        graph = torch.cuda.CUDAGraph()
        # thread_local: loader worker threads (pinning, decoding) may call CUDA while this thread captures
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.output = self.step(inputs)
        except RuntimeError as exc:  # an operation that cannot be captured: name the switch that avoids it
            reason = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise RuntimeError(f"capturing the training step as a CUDA graph failed ({reason}); "
                               f"set {self.key}=false to run it eagerly") from exc
        self.graph = graph
        graph.replay()
        return self.output.clone()
