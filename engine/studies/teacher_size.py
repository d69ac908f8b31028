"""teacher_size: SC-DD with teachers of several sizes, one fixed student; student top-1 against teacher size.

Reduced scale: ConvNet widths and depths (study.teachers) stand in for the paper's ResNet-18/50/101
(study.full_teachers at full scale)."""
from __future__ import annotations

import dataclasses
import time

from engine.artifacts.layout import RunLayout
from engine.context import RunContext
from engine.models import ModelConfig
from engine.studies import common
from engine.studies.settings import StudyConfig

TITLE = ("Student top-1 of the SC-DD set (SSL teacher + linear probe, noise init) recovered from teachers of "
         "several sizes; the student architecture and recipe are fixed, so only the teacher changes. The random "
         "real row uses the same teacher's soft labels (same budget).")


def teacher_models(study: StudyConfig) -> list[ModelConfig]:
    return list(study.full_teachers if study.scale == "full" else study.teachers)


def model_label(cfg: ModelConfig) -> str:
    return f"convnet w{cfg.width} d{cfg.depth}" if cfg.name == "convnet" else cfg.name


def variant_name(cfg: ModelConfig) -> str:
    return f"convnet-w{cfg.width}-d{cfg.depth}" if cfg.name == "convnet" else cfg.name


def fixed_student(ctx: RunContext, study: StudyConfig) -> str:
    """The student every variant trains: study.student, else convnet (reduced) or evaluate.student / the
    run's model (full)."""
    if study.student:
        return study.student
    if study.scale == "reduced":
        return "convnet"
    return (ctx.sections.get("evaluate") or {}).get("student") or ctx.model_cfg.name


def variants(ctx: RunContext, study: StudyConfig) -> list[common.Variant]:
    student = fixed_student(ctx, study)
    out = []
    for cfg in teacher_models(study):
        out.append(common.Variant(variant_name(cfg), "ssl",
                                  {"model": dataclasses.asdict(cfg), "evaluate.student": student},
                                  {"teacher": model_label(cfg), "params": common.param_count(cfg, ctx),
                                   "student": student}))
    return out


def validate(ctx: RunContext, study: StudyConfig) -> None:
    for variant in variants(ctx, study):
        common.validate_variant(common.variant_context(ctx, study, variant, ctx.run.seed), variant.kind)


def run(ctx: RunContext, study: StudyConfig) -> dict:
    started = time.time()
    ipc = study.reduced.ipc if study.scale == "reduced" else max(ctx.run.ipc)

    def measure(variant: common.Variant, seed: int) -> dict:
        out = common.run_variant(common.variant_context(ctx, study, variant, seed), variant.kind)
        return {"probe_top1": common.teacher_accuracy(out), "student_top1": common.row_top1(out["results"], ipc, "scdd"),
                "random_real_top1": common.row_top1(out["results"], ipc, "random_real")}

    found = common.run_seeds(ctx, study, variants(ctx, study), measure)
    rows = [[v["info"]["teacher"], f"{v['info']['params']:,}", common.cell(v, "probe_top1", True),
             common.cell(v, "student_top1", True), common.cell(v, "random_real_top1", True)]
            for v in found.values()]
    student = next(iter(found.values()))["info"]["student"]
    table = common.markdown_table(["teacher", "teacher params", "probe top-1 %", f"SC-DD student top-1 % "
                                   f"({student}, IPC {ipc})", "random real top-1 % (same labels)"], rows)
    plot = _plot(found, RunLayout(ctx.run_dir).study_plot("student_vs_teacher_size.png"), student, ipc)
    lines = common.header(ctx, study, TITLE) + [table]
    return common.write_study(ctx, lines, {"student top-1 against teacher parameters (log x)": plot},
                              {"study": study.name, "ipc": ipc, "student": student, "variants": found},
                              time.time() - started)


def _plot(found: dict, path, student: str, ipc: int):
    plt = common.figure()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    entries = sorted(found.values(), key=lambda v: v["info"]["params"])
    x = [v["info"]["params"] for v in entries]
    for key, label in (("student_top1", "SC-DD set"), ("random_real_top1", "random real"),
                       ("probe_top1", "teacher (probe)")):
        y = [100 * v["mean"].get(key, float("nan")) for v in entries]
        err = [100 * v["sd"].get(key, 0.0) for v in entries]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label)
    for v, xi in zip(entries, x):
        ax.annotate(v["info"]["teacher"], (xi, 100 * v["mean"].get("student_top1", 0.0)), fontsize=7,
                    textcoords="offset points", xytext=(3, -10))
    ax.set_xscale("log")
    ax.set(xlabel="teacher parameters", ylabel="top-1 %", title=f"student {student}, IPC {ipc}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return common.save_plot(fig, path)
