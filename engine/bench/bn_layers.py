"""Per-BN-layer cost inside the real recover loop: launches and device time of each layer's BN-matching
work, forward and backward, from torch.profiler around ``synthesize_groups``.

    python -m engine.bench.bn_layers --model resnet18 --image-size 224 --batch 100 --groups 1 --precision fp32

The teacher's BN layers are swapped for FusedBNMatching (what recover runs) and each layer's forward
call is labelled ``recover/bn_layer/<i>``; a layer's backward is autograd's evaluation of its
BN-matching Function (``...BNMatching...Backward``). Every kernel counts for the range open when the
operator that launched it started (as in engine.bench.measure.phase_times), so the columns are the
layer's own launches and their device time per step, with nothing of the convolutions around it.
On CPU there are no kernels: the columns are the ranges' CPU time and the operators called in them.
Eager steps only (CUDA graphs hide the launches this table is about). Timings: a benchmark, not a test.
"""
from __future__ import annotations

import argparse
import bisect
import re
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import record_function

from engine.io import save_json
from engine.bench.device_stats import device_name, resolve_device
from engine.bench.measure import _objective, profiled
from engine.bench.recover_cli import recipe
from engine.models import ModelConfig, build_model
from engine.recover import synthesize
from engine.recover.synthesize import STEP_RANGE, Objective
from kernels import fused_bn_matching

LAYER_RANGE = "recover/bn_layer/"
_BACKWARD = re.compile(r"BNMatching\w*Backward")


@contextmanager
def _layer_labels(modules: list[nn.Module]) -> Iterator[list[tuple[int, ...]]]:
    """Label each module's forward ``recover/bn_layer/<i>``; yields the input shapes seen (per layer)."""
    shapes: list[tuple[int, ...]] = [()] * len(modules)
    open_ranges: dict[int, list] = {}

    def hooks(i: int):
        def enter(module, inputs):
            shapes[i] = tuple(inputs[0].shape)
            label = record_function(f"{LAYER_RANGE}{i}")
            label.__enter__()
            open_ranges.setdefault(i, []).append(label)

        def leave(module, _inputs, _output):
            open_ranges[i].pop().__exit__(None, None, None)

        return enter, leave

    handles = []
    for i, m in enumerate(modules):
        enter, leave = hooks(i)
        handles += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
    try:
        yield shapes
    finally:
        for h in handles:
            h.remove()


def layer_costs(events, layers: int, steps: int, *, on_device: bool) -> dict:
    """Per layer and step: forward/backward launches and microseconds, from ``prof.events()``.

    Forward ranges are the ``recover/bn_layer/<i>`` labels; backward ranges are autograd's evaluations
    of a BN-matching Function, which run in reverse layer order once per step, so the k-th of a step is
    layer ``layers - 1 - k``. On a device a range's cost is the kernels launched inside it; on CPU its
    own CPU time, and its operator calls stand in for launches.
    """
    events = list(events)
    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    forward = [e for e in cpu if e.name.startswith(LAYER_RANGE)]
    backward = sorted((e for e in cpu if _BACKWARD.search(e.name) and "evaluate_function" in e.name),
                      key=lambda e: e.time_range.start)
    ranges: list[tuple[float, float, int, str]] = [
        (e.time_range.start, e.time_range.end, int(e.name[len(LAYER_RANGE):]), "fwd") for e in forward]
    for k, e in enumerate(backward):
        ranges.append((e.time_range.start, e.time_range.end, layers - 1 - (k % layers), "bwd"))
    ranges.sort()
    starts = [r[0] for r in ranges]

    def owner(t: float):
        i = bisect.bisect_right(starts, t) - 1
        return ranges[i] if i >= 0 and t <= ranges[i][1] else None

    table = [{"layer": i, "fwd_launches": 0, "fwd_us": 0.0, "bwd_launches": 0, "bwd_us": 0.0}
             for i in range(layers)]
    annotations = {e.name for e in events if getattr(e, "is_user_annotation", False)}
    basis = "cpu time"
    if on_device:
        for event in cpu:
            kernels = [k for k in getattr(event, "kernels", None) or () if k.name not in annotations]
            hit = owner(event.time_range.start) if kernels else None
            if hit is None:
                continue
            row = table[hit[2]]
            row[f"{hit[3]}_launches"] += len(kernels)
            row[f"{hit[3]}_us"] += sum(k.duration for k in kernels)
        if any(r["fwd_us"] + r["bwd_us"] > 0 for r in table):
            basis = "cuda kernel time"
    if basis == "cpu time":
        spans = {(start, end): (layer, phase) for start, end, layer, phase in ranges}
        for start, end, layer, phase in ranges:
            table[layer][f"{phase}_us"] += end - start
        # Top-level operators only: an operator's own sub-operators are part of its work.
        for event in cpu:
            parent = getattr(event, "cpu_parent", None)
            if not event.name.startswith("aten::") or (parent is not None and parent.name.startswith("aten::")):
                continue
            while parent is not None and (parent.time_range.start, parent.time_range.end) not in spans:
                parent = getattr(parent, "cpu_parent", None)  # e.g. the autograd node inside evaluate_function
            if parent is not None:
                layer, phase = spans[(parent.time_range.start, parent.time_range.end)]
                table[layer][f"{phase}_launches"] += 1
    for row in table:
        for key in ("fwd_launches", "fwd_us", "bwd_launches", "bwd_us"):
            row[key] /= steps
    step_wall = sum(e.time_range.elapsed_us() for e in cpu if e.name == STEP_RANGE) / steps
    device_step = sum(k.duration for e in cpu for k in (getattr(e, "kernels", None) or ())
                      if k.name not in annotations) / steps
    return {"basis": basis, "layers": table, "step_wall_us": step_wall, "device_us_per_step": device_step,
            "bn_us_per_step": sum(r["fwd_us"] + r["bwd_us"] for r in table),
            "bn_launches_per_step": sum(r["fwd_launches"] + r["bwd_launches"] for r in table)}


def profile_layers(model: nn.Module, *, batch: int, groups: int, image_size: int, num_classes: int,
                   precision: str, steps: int, device: torch.device, channels_last: bool, backend: str) -> dict:
    """``steps`` eager steps of ``synthesize_groups`` (G class-batches of ``batch``) under the profiler,
    after one warm-up call; returns ``layer_costs`` plus the setting."""
    model = model.to(device).eval().requires_grad_(False)
    net = model.to(memory_format=torch.channels_last) if channels_last else model
    channels = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    aug = recipe(image_size)
    init = torch.randn(groups * batch, channels, image_size, image_size,
                       generator=torch.Generator().manual_seed(0)).to(device)
    labels = (torch.arange(batch, device=device) % num_classes).repeat(groups)
    bounds = (torch.full((1, channels, 1, 1), -2.5), torch.full((1, channels, 1, 1), 2.5))
    objective = Objective(r_bn=0.01, first_bn_multiplier=10.0, iterations=steps, lr=0.25)

    def run(iterations: int) -> None:
        generators = [torch.Generator().manual_seed(g) for g in range(groups)]
        synthesize.synthesize_groups(net, modules, list(init.chunk(groups)), list(labels.chunk(groups)),
                                     _objective(objective, iterations), aug, bounds, generators,
                                     channels_last=channels_last, precision=precision)

    with fused_bn_matching(net, backend=backend) as modules, _layer_labels(modules) as shapes:
        prof = profiled(run, warmup=2, steps=steps, device=device)
    model.to(memory_format=torch.contiguous_format)
    result = layer_costs(prof.events(), len(modules), steps, on_device=device.type == "cuda")
    for row, shape in zip(result["layers"], shapes):
        row["input"] = "x".join(map(str, shape))
    result.update(device=device_name(device), batch=batch, groups=groups, image_size=image_size,
                  precision=precision, steps=steps, channels_last=channels_last, backend=backend)
    return result


def render(result: dict) -> str:
    unit = "launches" if result["basis"] == "cuda kernel time" else "aten ops"
    lines = [f"BN-matching work per layer and step inside the recover loop ({result['device']}, "
             f"{result['precision']}, G={result['groups']} x batch {result['batch']}, {result['image_size']} px, "
             f"{result['steps']} profiled steps, basis: {result['basis']})",
             f"| layer | input | fwd {unit} | fwd us | bwd {unit} | bwd us |", "|---|---|---|---|---|---|"]
    for r in result["layers"]:
        lines.append(f"| {r['layer']} | {r['input']} | {r['fwd_launches']:.0f} | {r['fwd_us']:.1f} | "
                     f"{r['bwd_launches']:.0f} | {r['bwd_us']:.1f} |")
    lines.append(f"all {len(result['layers'])} layers: {result['bn_launches_per_step']:.0f} {unit}, "
                 f"{result['bn_us_per_step'] / 1000:.2f} ms per step; step wall time "
                 f"{result['step_wall_us'] / 1000:.2f} ms")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18_cifar")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--groups", type=int, default=1)
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument("--precision", default="fp32", choices=synthesize.PRECISIONS)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--nchw", action="store_true")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    num_classes = args.num_classes or (1000 if args.image_size >= 224 else 100)
    model = build_model(ModelConfig(name=args.model), num_classes, 3, args.image_size)
    result = profile_layers(model, batch=args.batch, groups=args.groups, image_size=args.image_size,
                            num_classes=num_classes, precision=args.precision, steps=args.steps, device=device,
                            channels_last=not args.nchw, backend=args.backend)
    print(render(result))
    if args.json:
        save_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
