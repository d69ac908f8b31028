"""Benchmark what recover runs per BN layer: the fused BN module (eval-BN output + matching loss,
forward and backward), grouped and not; or the BN-matching loss alone (``--what loss``).

    python -m kernels.bench --shapes all --batch 100 --groups 1,4 --dtype float32 --iters 50
    python -m kernels.bench --what loss --shapes all --batch 100 --dtype float32 --iters 50 --json out.json

``--what module`` (default) times ``FusedBNMatching`` per backend (triton on CUDA, torch) against the
unfused path (``F.batch_norm`` + the reference loss, what a hook loop computes) on G x B images
(``--groups``: G class-batches per call, each with its own statistics and loss). Module bytes count
5 * numel(x) * itemsize: read x and write y in forward, read x and dy and write dx in backward.

``--what loss`` times the loss alone: Triton vs eager vs torch.compile.

Shapes are the BN-layer inputs of ResNet-18/50 at 224x224 and of a CIFAR ResNet-18 at 32x32.
Achieved bandwidth counts the unavoidable traffic of one fwd+bwd step:
    bytes = 3 * numel(x) * itemsize(x)     (read x in forward, read x in backward, write dx)
Per-channel statistics, scratch partials and the [C] vectors are ignored (< 1% for these shapes).
On a machine without CUDA only eager and compiled references run (CIFAR shapes, small batch),
and a line says that Triton figures need a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .bn_matching_reference import bn_matching_loss_reference
from .fused_bn import FusedBNMatching, set_groups

# (C, H, W) of the BN inputs, one entry per distinct shape.
SHAPES: dict[str, list[tuple[int, int, int]]] = {
    "cifar": [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)],
    "resnet18": [(64, 112, 112), (64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)],
    "resnet50": [(256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)],
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CPU_DEFAULT_BATCH = 8
CPU_DEFAULT_ITERS = 3


def _providers(device: torch.device, with_compile: bool) -> dict[str, Callable]:
    providers: dict[str, Callable] = {}
    if device.type == "cuda":
        from .bn_matching_triton import bn_matching_loss_triton

        providers["triton"] = bn_matching_loss_triton
    providers["eager"] = bn_matching_loss_reference
    if with_compile:
        providers["compile"] = torch.compile(bn_matching_loss_reference)
    return providers


def _time_ms(step: Callable[[], None], cuda: bool, iters: int, warmup: int) -> float:
    """Milliseconds per call of ``step`` after ``warmup`` calls (CUDA events on a GPU, wall clock on CPU)."""
    for _ in range(warmup):
        step()
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(iters):
            step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - t0) * 1e3 / iters


def _time_fwd_bwd(fn: Callable, x: torch.Tensor, rm: torch.Tensor, rv: torch.Tensor, iters: int, warmup: int) -> float:
    """Milliseconds per forward+backward (grad of the loss w.r.t. x)."""
    return _time_ms(lambda: torch.autograd.grad(fn(x, rm, rv), x), x.is_cuda, iters, warmup)


def fused_module(bn: nn.BatchNorm2d, backend: str, groups: int) -> FusedBNMatching:
    """``FusedBNMatching`` of ``bn`` with G groups per call."""
    module = FusedBNMatching(bn, backend=backend)
    set_groups([module], groups)
    return module


def unfused_call(bn: nn.BatchNorm2d, groups: int) -> Callable:
    """Eval BN + the reference loss, separately (two reads of x forward, autograd backward)."""

    def call(x):
        y = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        return y, bn_matching_loss_reference(x, bn.running_mean, bn.running_var, groups=groups)

    return call


def _time_module(call: Callable, x: torch.Tensor, dy: torch.Tensor, iters: int, warmup: int) -> float:
    """Milliseconds per forward (y, loss) + backward to x of ``sum(y * dy) + sum(loss)``."""

    def step():
        y, loss = call(x)
        torch.autograd.grad([y, loss], x, [dy, torch.ones_like(loss)])

    return _time_ms(step, x.is_cuda, iters, warmup)


def _settings(args: argparse.Namespace, cpu_runs: str):
    """(cuda, device, dtype, shape groups, batch, iters) of a table: the arguments, or on a machine without
    a GPU the CIFAR shapes at the CPU defaults (``cpu_runs`` names what runs there instead of Triton)."""
    cuda = torch.cuda.is_available()
    nets = list(SHAPES) if args.shapes == "all" else [args.shapes]
    batch, iters = args.batch, args.iters
    if not cuda:
        print(f"no GPU available: Triton figures need one; running {cpu_runs} on CPU, CIFAR shapes only")
        nets = ["cifar"]
        batch = batch or CPU_DEFAULT_BATCH
        iters = iters or CPU_DEFAULT_ITERS
    return (cuda, torch.device("cuda" if cuda else "cpu"), DTYPES[args.dtype], nets, batch or 100, iters or 50)


def run_module(args: argparse.Namespace) -> list[dict]:
    """The fused BN module (forward y + loss, backward) per backend and G, against the unfused path."""
    cuda, device, dtype, nets, batch, iters = _settings(args, "the torch backend")
    groups_list = args.groups or [1]
    backends = (["triton"] if cuda else []) + ["torch"]
    fmt = "nhwc" if args.channels_last else "nchw"
    print(f"device={torch.cuda.get_device_name() if cuda else 'cpu'} dtype={args.dtype} batch per group={batch} "
          f"groups={groups_list} iters={iters} memory format={fmt}")
    print("fused BN module, forward (y + loss) + backward; bytes = 5 * numel * itemsize; ms/group: one "
          "call's time per class-batch (G = 1: a call per class-batch)")
    header = (f"{'net':<9} {'G':>3} {'shape':<24} {'provider':<14} {'ms':>9} {'ms/group':>9} {'GB/s':>8} "
              f"{'vs unfused':>11}")
    print(header)
    print("-" * len(header))
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for net in nets:
        for c, h, w in SHAPES[net]:
            bn = nn.BatchNorm2d(c).to(device).eval().requires_grad_(False)
            with torch.no_grad():
                bn.running_mean.copy_(torch.randn(c, device=device, generator=gen))
                bn.running_var.copy_(torch.rand(c, device=device, generator=gen) + 0.5)
                bn.weight.copy_(torch.rand(c, device=device, generator=gen) + 0.5)
                bn.bias.copy_(torch.randn(c, device=device, generator=gen))
            for groups in groups_list:
                shape = (groups * batch, c, h, w)
                try:
                    x = torch.randn(shape, device=device, generator=gen).to(dtype)
                    dy = torch.randn(shape, device=device, generator=gen).to(dtype)
                except torch.cuda.OutOfMemoryError:
                    print(f"{net:<9} {groups:>3} {str(list(shape)):<24} out of memory")
                    continue
                if args.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                    dy = dy.contiguous(memory_format=torch.channels_last)
                x.requires_grad_()
                nbytes = 5 * x.numel() * x.element_size()
                providers: dict[str, Callable] = {"unfused": unfused_call(bn, groups)}
                for backend in backends:
                    providers[f"fused {backend}"] = lambda t, m=fused_module(bn, backend, groups): (m(t), m.last_loss)
                unfused_ms = None
                for name, call in providers.items():
                    try:
                        ms = _time_module(call, x, dy, iters, warmup=max(2, iters // 5))
                    except Exception as exc:  # keep the table going; report the failure in place
                        ms = float("nan")
                        print(f"  {name} failed on {shape}: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}", file=sys.stderr)
                    unfused_ms = ms if name == "unfused" else unfused_ms
                    gbps = nbytes / (ms * 1e-3) / 1e9
                    speedup = f"{unfused_ms / ms:.2f}x" if unfused_ms else "-"
                    print(f"{net:<9} {groups:>3} {str(list(shape)):<24} {name:<14} {ms:>9.3f} {ms / groups:>9.3f} "
                          f"{gbps:>8.1f} {speedup:>11}")
                    rows.append({"net": net, "groups": groups, "shape": list(shape), "memory_format": fmt,
                                 "dtype": args.dtype, "provider": name, "ms": ms, "ms_per_group": ms / groups,
                                 "gbps": gbps, "bytes": nbytes,
                                 "device": str(device)})
                del x, dy
    return rows


def run(args: argparse.Namespace) -> list[dict]:
    cuda, device, dtype, groups, batch, iters = _settings(args, "eager/compile references")
    providers = _providers(device, with_compile=not args.no_compile)

    rows = []
    header = f"{'net':<9} {'shape':<22} {'memfmt':<7} {'provider':<8} {'ms':>9} {'GB/s':>8}"
    print(f"device={torch.cuda.get_device_name() if cuda else 'cpu'} dtype={args.dtype} batch={batch} iters={iters}")
    print("bytes = 3 * numel * itemsize (read x fwd, read x bwd, write dx)")
    print(header)
    print("-" * len(header))
    gen = torch.Generator(device=device).manual_seed(0)
    for group in groups:
        for c, h, w in SHAPES[group]:
            shape = (batch, c, h, w)
            x = torch.randn(shape, device=device, dtype=torch.float32, generator=gen).to(dtype)
            if args.channels_last:
                x = x.to(memory_format=torch.channels_last)
            x.requires_grad_()
            rm = torch.randn(c, device=device, generator=gen)
            rv = torch.rand(c, device=device, generator=gen) + 0.5
            nbytes = 3 * x.numel() * x.element_size()
            for name, fn in providers.items():
                try:
                    ms = _time_fwd_bwd(fn, x, rm, rv, iters, warmup=max(2, iters // 5))
                    gbps = nbytes / (ms * 1e-3) / 1e9
                except Exception as exc:  # keep the table going; report the failure in place
                    ms, gbps = float("nan"), float("nan")
                    reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    print(f"  {name} failed on {shape}: {reason}", file=sys.stderr)
                fmt = "nhwc" if args.channels_last else "nchw"
                print(f"{group:<9} {str(list(shape)):<22} {fmt:<7} {name:<8} {ms:>9.3f} {gbps:>8.1f}")
                rows.append(
                    {"net": group, "shape": list(shape), "memory_format": fmt, "dtype": args.dtype, "provider": name,
                     "ms": ms, "gbps": gbps, "bytes": nbytes, "device": str(device)}
                )
            del x
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
        print(f"wrote {args.json}")
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--what", choices=["module", "loss"], default="module",
                   help="module: the fused BN module, grouped and not (default); loss: the loss alone")
    p.add_argument("--groups", type=lambda t: [int(v) for v in t.split(",")], default=None,
                   help="module: G values, comma-separated (default 1)")
    p.add_argument("--shapes", choices=["cifar", "resnet18", "resnet50", "all"], default="all")
    p.add_argument("--batch", type=int, default=None, help=f"default 100 on GPU, {CPU_DEFAULT_BATCH} on CPU")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--iters", type=int, default=None, help=f"default 50 on GPU, {CPU_DEFAULT_ITERS} on CPU")
    p.add_argument("--channels-last", action="store_true", help="benchmark channels_last inputs")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    rows = run_module(args) if args.what == "module" else run(args)
    if args.what == "module" and args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
