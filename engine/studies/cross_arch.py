"""cross_arch: one SC-DD set (and the random real baseline), students of several architectures trained on it
with the same soft-label teacher and recipe; top-1 per row and architecture."""
from __future__ import annotations

import os
import time
from pathlib import Path

from engine.artifacts.layout import RunLayout
from engine.context import RunContext
from engine.evaluate import stage as evaluate_stage
from engine.studies import common
from engine.studies.settings import StudyConfig

TITLE = ("One distilled set (SC-DD: SSL teacher + linear probe, noise init) and the random real baseline, each "
         "trained on by students of several architectures with the same soft labels (the SSL teacher's) and "
         "recipe; only the student architecture changes along a row.")
ROWS = ("scdd", "random_real")
ROW_TITLES = {"scdd": "SC-DD (SSL teacher, noise init)", "random_real": "random real subset"}
VARIANT = common.Variant("scdd", "ssl", info={"rows": list(ROWS)})


def student_variant(arch: str) -> str:
    """The sub-run of one more student architecture (a build without evaluate.students): its squeeze/ and
    recover/ link to the SC-DD variant's."""
    return f"scdd-student-{arch}"


def _contexts(ctx: RunContext, study: StudyConfig, seed: int) -> dict[str, RunContext]:
    """architecture -> the run context that trains it (all in one with evaluate.students)."""
    if common.has_students_option():
        vctx = common.variant_context(ctx, study, VARIANT, seed, {"evaluate.students": list(study.students)})
        return {arch: vctx for arch in study.students}
    first, *others = study.students
    out = {first: common.variant_context(ctx, study, VARIANT, seed, {"evaluate.student": first})}
    for arch in others:
        variant = common.Variant(student_variant(arch), "ssl")
        out[arch] = common.variant_context(ctx, study, variant, seed, {**VARIANT.overrides, "evaluate.student": arch})
    return out


def validate(ctx: RunContext, study: StudyConfig) -> None:
    contexts = _contexts(ctx, study, ctx.run.seed)
    common.validate_variant(contexts[study.students[0]], "ssl")
    for vctx in contexts.values():  # each student model against the data
        evaluate_stage.validate(vctx, teachers_from_squeeze=["ssl"])


def _link(link: Path, target: Path) -> None:
    """``link`` -> ``target`` (a relative symlink), replacing a stale one."""
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        if link.is_symlink() and Path(os.readlink(link)) == Path(os.path.relpath(target, link.parent)):
            return
        link.unlink()
    link.symlink_to(os.path.relpath(target, link.parent), target_is_directory=True)


def run(ctx: RunContext, study: StudyConfig) -> dict:
    started = time.time()
    ipc = study.reduced.ipc if study.scale == "reduced" else max(ctx.run.ipc)

    def measure(variant: common.Variant, seed: int) -> dict:
        contexts = _contexts(ctx, study, seed)
        main = contexts[study.students[0]]
        out = {study.students[0]: common.run_variant(main, "ssl", rows=["scdd"])["results"]}
        for arch, vctx in contexts.items():
            if arch in out:
                continue
            if vctx is main:
                out[arch] = out[study.students[0]]
                continue
            for part in ("squeeze", "recover"):
                _link(vctx.run_dir / part, main.run_dir / part)
            sets = {k: v for k, v in evaluate_stage.available_sets(vctx.run_dir).items() if k == "scdd"}
            out[arch] = evaluate_stage.evaluate_rows(vctx, evaluate_stage.build_eval_config(vctx), sets)
        return {f"{row}/{arch}": common.row_top1(out[arch], ipc, row, arch) for row in ROWS for arch in study.students}

    found = common.run_seeds(ctx, study, [VARIANT], measure)
    entry = found[VARIANT.name]
    table = common.markdown_table(
        ["row (IPC %d)" % ipc] + [f"{arch} top-1 %" for arch in study.students],
        [[ROW_TITLES[row]] + [common.cell(entry, f"{row}/{arch}", True) for arch in study.students] for row in ROWS])
    plot = _plot(entry, study.students, RunLayout(ctx.run_dir).study_plot("cross_arch.png"), ipc)
    how = ("evaluate.students" if common.has_students_option()
           else "one evaluate per architecture, in study/scdd-student-<arch>/")
    lines = common.header(ctx, study, TITLE) + [
        f"Students: {', '.join(study.students)} ({how}); teacher and recover model: {ctx.model_cfg.name}.", "", table]
    return common.write_study(ctx, lines, {"top-1 per row and student architecture": plot},
                              {"study": study.name, "ipc": ipc, "students": list(study.students), "variants": found},
                              time.time() - started)


def _plot(entry: dict, students: list[str], path: Path, ipc: int) -> Path:
    plt = common.figure()
    fig, ax = plt.subplots(figsize=(1.8 + 1.4 * len(students), 3.6))
    width = 0.8 / len(ROWS)
    for i, row in enumerate(ROWS):
        x = [j + (i - (len(ROWS) - 1) / 2) * width for j in range(len(students))]
        y = [100 * entry["mean"].get(f"{row}/{arch}", float("nan")) for arch in students]
        err = [100 * entry["sd"].get(f"{row}/{arch}", 0.0) for arch in students]
        ax.bar(x, y, width, yerr=err if any(err) else None, capsize=3, label=ROW_TITLES[row])
    ax.set_xticks(range(len(students)))
    ax.set_xticklabels(students, fontsize=8)
    ax.set(ylabel="student top-1 %", title=f"cross-architecture students, IPC {ipc}")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return common.save_plot(fig, path)
