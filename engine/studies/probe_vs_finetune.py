"""probe_vs_finetune: one SSL pretraining, then a linear probe (frozen backbone) or fine-tuning (backbone and
its BN statistics train with the head); how far each moves the BN statistics and what that does to the set.

The pretraining runs once, in the linear variant: a linear probe leaves the backbone bit-identical, so its
teacher file is the pretrained backbone, and the finetune variant imports it (ssl.init_from) and fine-tunes.
The shift of each teacher's BN running statistics is measured against that file."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from engine.artifacts.layout import RunLayout
from engine.artifacts.teacher import read_teacher
from engine.context import RunContext
from engine.studies import common
from engine.studies.settings import StudyConfig

TITLE = ("One SSL pretraining (in the linear variant), then either a linear probe on the frozen backbone or "
         "fine-tuning of backbone + head (BN statistics in train mode); both probe on augmented views for the "
         "same epochs. BN shift: per BN layer, the mean over channels of |running stat of the final teacher - "
         "running stat of the pretrained backbone|, then the mean over layers (variance shift relative to the "
         "pretrained layer's mean variance). Entropy: of each layer's running-variance histogram (bn_stats.json), "
         "mean over layers. Student: the SC-DD set (noise init) recovered from each teacher, labelled by it.")
PROBE = {"squeeze.probe.views": "augmented", "squeeze.probe.standardize": False}


def variants(ctx: RunContext, study: StudyConfig, seed: int) -> list[common.Variant]:
    linear = common.Variant("linear", "ssl", {**PROBE, "squeeze.probe.mode": "linear"}, {"mode": "linear"})
    pretrained = RunLayout(common.variant_dir(ctx, study, "linear", seed)).teacher("ssl")
    finetune = {**PROBE, "squeeze.probe.mode": "finetune", "ssl.init_from": str(pretrained)}
    if study.finetune_lr_scale is not None:
        finetune["squeeze.probe.backbone_lr_scale"] = study.finetune_lr_scale
    return [linear, common.Variant("finetune", "ssl", finetune, {"mode": "finetune"})]


def validate(ctx: RunContext, study: StudyConfig) -> None:
    for variant in variants(ctx, study, ctx.run.seed):
        overrides = dict(variant.overrides)
        if "ssl.init_from" in overrides and not Path(overrides["ssl.init_from"]).is_file():
            overrides.pop("ssl.init_from")  # the linear variant writes it first; its settings are checked here
        variant = common.Variant(variant.name, variant.kind, overrides)
        common.validate_variant(common.variant_context(ctx, study, variant, ctx.run.seed), variant.kind)


def bn_shift(reference: dict[str, torch.Tensor], final: dict[str, torch.Tensor]) -> list[dict]:
    """Per BN layer (state-dict prefix, forward order): mean |Δ running_mean| and mean |Δ running_var| over
    channels, and the latter relative to the reference's mean running variance."""
    rows = []
    for key in reference:
        if not key.endswith(".running_mean"):
            continue
        layer = key[: -len(".running_mean")]
        ref_mean, ref_var = reference[key].double(), reference[f"{layer}.running_var"].double()
        d_mean = (final[key].double() - ref_mean).abs().mean()
        d_var = (final[f"{layer}.running_var"].double() - ref_var).abs().mean()
        rows.append({"layer": layer, "mean_shift": float(d_mean), "var_shift": float(d_var),
                     "var_shift_relative": float(d_var / ref_var.mean().clamp_min(1e-12))})
    return rows


def run(ctx: RunContext, study: StudyConfig) -> dict:
    started = time.time()
    ipc = study.reduced.ipc if study.scale == "reduced" else max(ctx.run.ipc)
    layers: dict[str, list] = {}

    def measure(variant: common.Variant, seed: int) -> dict:
        by_name = {v.name: v for v in variants(ctx, study, seed)}
        vctx = common.variant_context(ctx, study, by_name[variant.name], seed)
        out = common.run_variant(vctx, "ssl")
        reference = read_teacher(RunLayout(common.variant_dir(ctx, study, "linear", seed)).teacher("ssl"))
        final = read_teacher(RunLayout(vctx.run_dir).teacher("ssl"))
        shift = bn_shift(reference["state_dict"], final["state_dict"])
        layers.setdefault(variant.name, []).append(shift)
        n = max(1, len(shift))
        return {"probe_top1": common.teacher_accuracy(out),
                "bn_mean_shift": sum(r["mean_shift"] for r in shift) / n,
                "bn_var_shift_relative": sum(r["var_shift_relative"] for r in shift) / n,
                "bn_var_entropy": sum(r["var_entropy"] for r in out["bn"]) / max(1, len(out["bn"])),
                "student_top1": common.row_top1(out["results"], ipc, "scdd"),
                "random_real_top1": common.row_top1(out["results"], ipc, "random_real")}

    found = common.run_seeds(ctx, study, variants(ctx, study, ctx.run.seed), measure)
    for name, entry in found.items():
        entry["layers"] = layers.get(name, [])
    rows = [[name, common.cell(v, "probe_top1", True), common.cell(v, "bn_mean_shift", digits=4),
             common.cell(v, "bn_var_shift_relative", digits=3), common.cell(v, "bn_var_entropy", digits=3),
             common.cell(v, "student_top1", True), common.cell(v, "random_real_top1", True)]
            for name, v in found.items()]
    table = common.markdown_table(["probe", "probe top-1 %", "BN mean shift (mean abs Δμ)", "BN var shift (mean abs Δσ² / mean σ²)",
                                   "BN var entropy (nats)", f"SC-DD student top-1 % (IPC {ipc})",
                                   "random real top-1 % (same labels)"], rows)
    plot = _plot(layers, RunLayout(ctx.run_dir).study_plot("bn_shift_per_layer.png"))
    lines = common.header(ctx, study, TITLE) + [table]
    return common.write_study(ctx, lines, {"per-layer BN shift from the pretrained backbone, both probes": plot},
                              {"study": study.name, "ipc": ipc, "variants": found}, time.time() - started)


def _plot(layers: dict[str, list], path: Path) -> Path:
    plt = common.figure()
    fig, (ax_mean, ax_var) = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, per_seed in layers.items():
        if not per_seed:
            continue
        count = len(per_seed[0])
        for ax, key in ((ax_mean, "mean_shift"), (ax_var, "var_shift_relative")):
            y = [sum(seed[i][key] for seed in per_seed) / len(per_seed) for i in range(count)]
            ax.plot(range(count), y, marker="o", label=name)
            ax.set_xticks(range(count))
    ax_mean.set(title="running mean: mean |Δ| over channels", xlabel="BN layer", ylabel="|Δμ|")
    ax_var.set(title="running var: mean |Δ| / mean σ² (pretrained)", xlabel="BN layer", ylabel="relative |Δσ²|")
    for ax in (ax_mean, ax_var):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return common.save_plot(fig, path)
