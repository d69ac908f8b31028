"""bn_variance: across teachers of several sizes, objectives and pretraining lengths, the variance and entropy of
their BN running variances next to the student top-1 of each teacher's distilled set, with Spearman's rank
correlation and a bootstrap 90% interval over the teachers (the paper's claim: more BN variance, better sets)."""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

from engine.artifacts.layout import RunLayout
from engine.config_store import to_node
from engine.context import RunContext
from engine.models import ModelConfig
from engine.squeeze.ssl import SSL_PRESETS
from engine.studies import common
from engine.studies.settings import StudyConfig
from engine.studies.teacher_size import fixed_student, model_label, variant_name

TITLE = ("Teachers of several sizes, objectives and pretraining lengths; each recovers its own distilled set (noise "
         "init), labels it and its random real baseline, and the same student architecture trains on it. BN "
         "variance: per BN layer, the mean over channels of the running variance; entropy: of the layer's "
         "running-variance histogram (squeeze.bn_hist_bins bins, nats); both then averaged over layers (per-layer "
         "values in study.json). Spearman's rho over teachers, with a percentile-bootstrap 90% interval "
         "(teachers resampled with replacement).")
MIN_TEACHERS = 8
"""Fewer teachers cannot support a rank correlation (issue 17)."""


def _objective(ctx: RunContext, name: str) -> dict:
    """The ssl= section of objective ``name``: its preset, with the run's epochs and batch size."""
    node = to_node(SSL_PRESETS[name])
    run = ctx.sections.get("ssl") or {}
    for key in ("epochs", "batch_size"):
        if key in run:
            node[key] = run[key]
    return node


def variants(ctx: RunContext, study: StudyConfig) -> list[common.Variant]:
    student = fixed_student(ctx, study)
    if study.scale == "full":
        base, models = ctx.model_cfg, [m for m in study.full_teachers if m != ctx.model_cfg]
        epochs = int((ctx.sections.get("ssl") or {}).get("epochs", 0)) or None
        lengths = [max(1, epochs // 4), max(1, epochs // 2)] if epochs else []
    else:
        base = ModelConfig()
        models = [m for m in study.teachers if m != base]
        lengths = sorted({max(1, study.reduced.ssl_epochs // 2), 2 * study.reduced.ssl_epochs} - {study.reduced.ssl_epochs})
    out: list[common.Variant] = []

    def add(name: str, kind: str, model: ModelConfig, objective: str, epochs=None, **extra) -> None:
        overrides = {"model": dataclasses.asdict(model), "evaluate.student": student, **extra}
        if epochs is not None:
            overrides["squeeze.epochs"] = epochs
        info = {"teacher": model_label(model), "objective": objective, "kind": kind, "student": student,
                "epochs": epochs if epochs is not None else (study.reduced.ssl_epochs if study.scale == "reduced" else "run's"),
                "params": common.param_count(model, ctx)}
        out.append(common.Variant(name, kind, overrides, info))

    # the run's SSL objective (ssl=) for every size and length, the other one once
    ssl = str((ctx.sections.get("ssl") or {}).get("name", "mocov2"))
    other = "mocov2" if ssl == "simclr" else "simclr"
    add(f"{ssl}-{variant_name(base)}", "ssl", base, ssl)
    for model in models:
        add(f"{ssl}-{variant_name(model)}", "ssl", model, ssl)
    for epochs in lengths:
        add(f"{ssl}-{variant_name(base)}-e{epochs}", "ssl", base, ssl, epochs)
    add(f"{other}-{variant_name(base)}", "ssl", base, other, ssl=_objective(ctx, other))
    add(f"supervised-{variant_name(base)}", "supervised", base, "supervised")
    for model in models if study.scale == "full" else models[:1]:
        add(f"supervised-{variant_name(model)}", "supervised", model, "supervised")
    return out


def validate(ctx: RunContext, study: StudyConfig) -> None:
    found = variants(ctx, study)
    if len(found) < MIN_TEACHERS:
        from engine.errors import ConfigError

        raise ConfigError(f"study=bn_variance compares {len(found)} teachers but a rank correlation needs >= "
                          f"{MIN_TEACHERS}; list more models in study.teachers (or study.full_teachers)")
    for variant in found:
        common.validate_variant(common.variant_context(ctx, study, variant, ctx.run.seed), variant.kind)


def run(ctx: RunContext, study: StudyConfig) -> dict:
    started = time.time()
    ipc = study.reduced.ipc if study.scale == "reduced" else max(ctx.run.ipc)
    layers: dict[str, list] = {}

    def measure(variant: common.Variant, seed: int) -> dict:
        out = common.run_variant(common.variant_context(ctx, study, variant, seed), variant.kind)
        layers.setdefault(variant.name, []).append(out["bn"])
        bn = out["bn"]
        return {"teacher_top1": common.teacher_accuracy(out),
                "bn_var": sum(r["var_mean"] for r in bn) / len(bn),
                "bn_entropy": sum(r["var_entropy"] for r in bn) / len(bn),
                "bn_entropy_min": min(r["var_entropy"] for r in bn),
                "bn_entropy_max": max(r["var_entropy"] for r in bn),
                "student_top1": common.row_top1(out["results"], ipc, variant.row),
                "random_real_top1": common.row_top1(out["results"], ipc, "random_real")}

    found = common.run_seeds(ctx, study, variants(ctx, study), measure)
    for name, entry in found.items():
        entry["layers"] = layers.get(name, [])
    top1 = [v["mean"]["student_top1"] for v in found.values()]
    correlations = {}
    for key, label in (("bn_entropy", "BN variance entropy"), ("bn_var", "BN variance (mean)")):
        x = [v["mean"][key] for v in found.values()]
        low, high = common.bootstrap_interval(x, top1, study.bootstrap, 0.9, seed=ctx.run.seed)
        correlations[key] = {"label": label, "rho": common.spearman(x, top1), "ci90": [low, high],
                             "teachers": len(x), "resamples": study.bootstrap}
    rows = [[name, v["info"]["objective"], v["info"]["teacher"], v["info"]["epochs"], f"{v['info']['params']:,}",
             common.cell(v, "teacher_top1", True), common.cell(v, "bn_var", digits=4),
             common.cell(v, "bn_entropy", digits=3),
             f"{v['mean']['bn_entropy_min']:.2f}-{v['mean']['bn_entropy_max']:.2f}",
             common.cell(v, "student_top1", True), common.cell(v, "random_real_top1", True)]
            for name, v in found.items()]
    student = next(iter(found.values()))["info"]["student"]
    table = common.markdown_table(
        ["teacher", "objective", "model", "pretrain epochs", "params", "teacher top-1 % (probe / own)",
         "BN var (mean over layers)", "BN var entropy (mean, nats)", "entropy range over layers",
         f"student top-1 % ({student}, IPC {ipc})", "random real top-1 % (same labels)"], rows)
    corr = common.markdown_table(
        ["against student top-1", "Spearman rho", "bootstrap 90% interval", "teachers"],
        [[c["label"], _num(c["rho"]), f"[{_num(c['ci90'][0])}, {_num(c['ci90'][1])}]", c["teachers"]]
         for c in correlations.values()])
    layout = RunLayout(ctx.run_dir)
    plot = _plot(found, correlations, layout.study_plot("bn_variance_vs_top1.png"), student, ipc)
    per_layer = _plot_layers(found, layout.study_plot("bn_per_layer.png"), student, ipc)
    lines = common.header(ctx, study, TITLE) + [table, "", "## Rank correlation over teachers", "", corr]
    return common.write_study(ctx, lines, {"BN variance entropy and mean variance against student top-1": plot,
                                           "per-layer BN variance entropy and mean variance of every teacher, "
                                           "coloured by its student's top-1": per_layer},
                              {"study": study.name, "ipc": ipc, "student": student, "correlations": correlations,
                               "variants": found}, time.time() - started)


def _num(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:+.2f}"


def _plot(found: dict, correlations: dict, path: Path, student: str, ipc: int) -> Path:
    plt = common.figure()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    colors = {"ssl": "tab:blue", "supervised": "tab:orange"}
    for ax, key in zip(axes, ("bn_entropy", "bn_var")):
        for name, v in found.items():
            x, y = v["mean"][key], 100 * v["mean"]["student_top1"]
            ax.errorbar([x], [y], xerr=[v["sd"][key]], yerr=[100 * v["sd"]["student_top1"]], fmt="o",
                        color=colors[v["info"]["kind"]], capsize=2)
            ax.annotate(name, (x, y), fontsize=6, textcoords="offset points", xytext=(3, 3))
        c = correlations[key]
        ax.set(xlabel=c["label"], ylabel=f"student top-1 % ({student}, IPC {ipc})",
               title=f"Spearman rho {_num(c['rho'])}, 90% CI [{_num(c['ci90'][0])}, {_num(c['ci90'][1])}]")
        ax.grid(alpha=0.3)
    axes[1].set_xscale("log")
    from matplotlib.ticker import NullFormatter

    axes[1].xaxis.set_minor_formatter(NullFormatter())  # 2x10^-1, 3x10^-1, ... overlap on a short decade
    for kind, color in colors.items():
        axes[0].scatter([], [], color=color, label=f"{kind} teacher")
    axes[0].legend(fontsize=8)
    return common.save_plot(fig, path)


def _plot_layers(found: dict, path: Path, student: str, ipc: int) -> Path:
    """Per BN layer (first seed), each teacher's variance entropy and mean variance as a line whose colour is
    its student's top-1: whether the layers, rather than their mean, separate good teachers from bad."""
    plt = common.figure()
    from matplotlib import cm, colors as mcolors

    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.8), gridspec_kw={"width_ratios": [1, 1, 0.05]})
    axes, colorbar_ax = axes[:2], axes[2]
    top1 = [100 * v["mean"]["student_top1"] for v in found.values()]
    norm = mcolors.Normalize(vmin=min(top1), vmax=max(top1) if max(top1) > min(top1) else min(top1) + 1)
    cmap = plt.get_cmap("viridis")
    for v, acc in zip(found.values(), top1):
        layers = v["layers"][0] if v["layers"] else []
        depth = list(range(1, len(layers) + 1))
        style = "-" if v["info"]["kind"] == "ssl" else "--"
        for ax, key in zip(axes, ("var_entropy", "var_mean")):
            ax.plot(depth, [row[key] for row in layers], style, marker="o", ms=3, color=cmap(norm(acc)), lw=1.2)
    for ax, label in zip(axes, ("BN running-variance entropy (nats)", "BN running variance (mean over channels)")):
        ax.set(xlabel="BN layer (input to output)", ylabel=label)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[1].set_yscale("log")
    bar = fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), cax=colorbar_ax)
    bar.set_label(f"student top-1 % ({student}, IPC {ipc})")
    axes[0].plot([], [], "k-", label="SSL teacher")
    axes[0].plot([], [], "k--", label="supervised teacher")
    axes[0].legend(fontsize=8)
    return common.save_plot(fig, path)
