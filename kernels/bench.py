"""Benchmark the BN-matching loss, forward + backward: Triton vs eager vs torch.compile.

    python -m kernels.bench --shapes all --batch 100 --dtype float32 --iters 50 --json out.json

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

from .bn_matching_reference import bn_matching_loss_reference

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


def _time_fwd_bwd(fn: Callable, x: torch.Tensor, rm: torch.Tensor, rv: torch.Tensor, iters: int, warmup: int) -> float:
    """Milliseconds per forward+backward (grad of the loss w.r.t. x)."""

    def step():
        loss = fn(x, rm, rv)
        torch.autograd.grad(loss, x)

    for _ in range(warmup):
        step()
    if x.is_cuda:
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


def run(args: argparse.Namespace) -> list[dict]:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = DTYPES[args.dtype]
    groups = list(SHAPES) if args.shapes == "all" else [args.shapes]
    batch, iters = args.batch, args.iters
    if not cuda:
        print("no GPU available: Triton figures need one; running eager/compile references on CPU, CIFAR shapes only")
        groups = ["cifar"]
        batch = batch or CPU_DEFAULT_BATCH
        iters = iters or CPU_DEFAULT_ITERS
    batch = batch or 100
    iters = iters or 50
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", choices=["cifar", "resnet18", "resnet50", "all"], default="all")
    p.add_argument("--batch", type=int, default=None, help=f"default 100 on GPU, {CPU_DEFAULT_BATCH} on CPU")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--iters", type=int, default=None, help=f"default 50 on GPU, {CPU_DEFAULT_ITERS} on CPU")
    p.add_argument("--channels-last", action="store_true", help="benchmark channels_last inputs")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
