"""The end-of-run report: a table on stdout, report.md + report.json, and PNGs to look at.

Students report final top-1 (the headline: after the last epoch) and best top-1 (the best full test
pass, every evaluate.eval_every epochs and the last), as the official scripts report a best epoch.
With evaluate.students the table has one final top-1 column per student model (best top-1, top-5 and
seconds stay the headline's, the first model's) and cross_arch.png draws them as bars.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

from engine.artifacts.layout import SET_FOLDERS, RunLayout  # noqa: E402
from engine.artifacts.teacher import read_teacher  # noqa: E402
from engine.context import RunContext  # noqa: E402
from engine.io import save_figure, save_json, save_text  # noqa: E402

ROW_TITLES = {
    "scdd": "SC-DD (SSL teacher)",
    "sre2l": "SRe2L-style (supervised teacher)",
    "scdd_real_init": "SC-DD, real init",
    "real_init_unrefined": "real init, unrefined",
    "sre2l_real_init": "SRe2L-style, real init",
    "random_real": "random real subset",
}
_SUMMARY_KEYS = ("top1", "top1_std", "best_top1", "top5", "images", "epochs", "seconds", "images_per_s",
                 "stored_labels_bytes_per_image_epoch", "students")


def teacher_metrics(layout: RunLayout) -> dict:
    out = {}
    for kind, key, metric in (("ssl", "ssl_probe_top1", "probe_top1"), ("supervised", "supervised_top1", "top1")):
        if layout.teacher(kind).is_file():
            out[key] = float(read_teacher(layout.teacher(kind))["metrics"][metric])
    return out


def _summary(row: dict) -> dict:
    return {k: row[k] for k in _SUMMARY_KEYS if k in row and row[k] is not None}


def build_report(results: dict, teacher: dict, seconds: dict, recover_seconds: dict) -> dict:
    report = {"ipc": {ipc: {key: _summary(row) for key, row in rows.items()}
                      for ipc, rows in results["ipc"].items()}}
    if "full_data" in results:
        report["full_data"] = _summary(results["full_data"])
    report["teacher"] = teacher
    report["seconds"] = dict(seconds)
    if recover_seconds:
        report["seconds"]["recover_per_set"] = recover_seconds
    return report


def _fmt(value, pct=True) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if pct else f"{value:.0f}"


def student_models(rows: list[dict]) -> list[str]:
    """The evaluate.students models of these rows, in their order; [] for single-student rows."""
    models: dict[str, None] = {}
    for row in rows:
        models.update(dict.fromkeys(row.get("students", {})))
    return list(models)


def _report_rows(report: dict) -> list[dict]:
    return [row for rows in report["ipc"].values() for row in rows.values()] + \
        ([report["full_data"]] if "full_data" in report else [])


def _top1_cell(row: dict) -> str:
    top1 = _fmt(row.get("top1"))
    if row.get("top1_std"):
        top1 += f" ± {100 * row['top1_std']:.1f}"
    return top1


def _top1_cells(row: dict, models: list[str]) -> str:
    """The final top-1 column(s) of a row: one per student model when the rows have "students"."""
    if not models:
        return _top1_cell(row)
    return " | ".join(_top1_cell(row.get("students", {}).get(model, {})) for model in models)


def render_table(report: dict) -> str:
    recover_s = report["seconds"].get("recover_per_set", {})
    models = student_models(_report_rows(report))
    top1_head = " | ".join(f"top-1 % {model}" for model in models) if models else "top-1 % (final)"
    lines = [f"| method | IPC | {top1_head} | best top-1 % | top-5 % | recover s | student s |",
             "|---" * (6 + max(1, len(models))) + "|"]
    for ipc, rows in report["ipc"].items():
        for key, row in rows.items():
            rec = recover_s.get(SET_FOLDERS.get(key, ""), None)
            lines.append(f"| {ROW_TITLES.get(key, key)} | {ipc} | {_top1_cells(row, models)} | "
                         f"{_fmt(row.get('best_top1'))} | {_fmt(row.get('top5'))} | "
                         f"{_fmt(rec, pct=False)} | {_fmt(row.get('seconds'), pct=False)} |")
    if "full_data" in report:
        row = report["full_data"]
        lines.append(f"| full training data | all | {_top1_cells(row, models)} | {_fmt(row.get('best_top1'))} | "
                     f"{_fmt(row.get('top5'))} | - | "
                     f"{_fmt(row.get('seconds'), pct=False)} |")
    teacher = report.get("teacher", {})
    others = " | -" * (len(models) - 1)  # a teacher has one top-1: under the first model's column
    if "ssl_probe_top1" in teacher:
        lines.append(f"| teacher: SSL + linear probe | all | {_fmt(teacher['ssl_probe_top1'])}{others} | - | - | - "
                     f"| - |")
    if "supervised_top1" in teacher:
        lines.append(f"| teacher: supervised | all | {_fmt(teacher['supervised_top1'])}{others} | - | - | - | - |")
    stage_s = {k: v for k, v in report["seconds"].items() if isinstance(v, (int, float))}
    footer = ", ".join(f"{k} {v:.0f}s" for k, v in stage_s.items())
    return "\n".join(lines) + (f"\n\nWall time per stage: {footer}\n" if footer else "\n")


def plot_accuracy(results: dict, path: Path) -> None:
    ipcs = list(results["ipc"])
    fig, axes = plt.subplots(1, len(ipcs), figsize=(5.5 * len(ipcs), 4), squeeze=False)
    for ax, ipc in zip(axes[0], ipcs):
        for key, row in results["ipc"][ipc].items():
            points = [(h["epoch"], h["top1"]) for h in row.get("history", []) if h.get("top1") is not None]
            if points:
                ax.plot(*zip(*points), marker="o", ms=3, label=ROW_TITLES.get(key, key))
        if "full_data" in results:
            ax.axhline(results["full_data"]["top1"], color="k", ls="--", lw=1, label="full data")
        ax.set(title=f"IPC {ipc}: student test top-1", xlabel="epoch", ylabel="top-1")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)
    plt.close(fig)


def plot_grids(layout: RunLayout, keys: list[str], path: Path) -> None:
    grids = [(key, layout.set_for_row(key) / "grid.png") for key in keys if key in SET_FOLDERS]
    grids = [(k, p) for k, p in grids if p.is_file()]
    if not grids:
        return
    fig, axes = plt.subplots(1, len(grids), figsize=(4 * len(grids), 4.4), squeeze=False)
    for ax, (key, grid_path) in zip(axes[0], grids):
        with Image.open(grid_path) as img:
            ax.imshow(img.convert("RGB"))
        ax.set_title(ROW_TITLES.get(key, key), fontsize=9)
        ax.axis("off")
    fig.suptitle("Distilled images (rows: classes, columns: images per class)")
    save_figure(fig, path)
    plt.close(fig)


def plot_cross_arch(report: dict, models: list[str], path: Path) -> None:
    """Final top-1 of each row (groups) and student model (bars), one panel per ipc; full data in each."""
    ipcs = list(report["ipc"])
    groups = max(len(rows) for rows in report["ipc"].values()) + 1
    panel = max(5.5, 1.5 + 0.25 * groups * len(models))
    fig, axes = plt.subplots(1, len(ipcs), figsize=(panel * len(ipcs), 4.5), squeeze=False)
    width = 0.8 / len(models)
    for ax, ipc in zip(axes[0], ipcs):
        rows = dict(report["ipc"][ipc])
        if "full_data" in report:
            rows["full data"] = report["full_data"]
        for m, model in enumerate(models):
            tops = [100 * (row.get("students", {}).get(model, {}).get("top1") or 0.0) for row in rows.values()]
            ax.bar([i + (m - (len(models) - 1) / 2) * width for i in range(len(rows))], tops, width, label=model)
        ax.set_xticks(range(len(rows)), [ROW_TITLES.get(key, key) for key in rows], rotation=30, ha="right",
                      fontsize=7)
        ax.set(title=f"IPC {ipc}: student top-1 per architecture", ylabel="top-1 %", ylim=(0, 100))
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)
    plt.close(fig)


def write_report(ctx: RunContext, results: dict, seconds: dict | None = None,
                 recover_seconds: dict | None = None) -> dict:
    if not ctx.dist.is_main:
        return {}
    layout = RunLayout(ctx.run_dir)
    report = build_report(results, teacher_metrics(layout), seconds or results.get("seconds", {}),
                          recover_seconds or {})
    table = render_table(report)
    header = (f"# SC-DD report: data={ctx.data_cfg.name}, model={ctx.model_cfg.name}, "
              f"ipc={sorted(set(ctx.run.ipc))}, seed={ctx.run.seed}\n\n")
    plot_accuracy(results, layout.accuracy_plot)
    keys = list(next(iter(results["ipc"].values())).keys()) if results["ipc"] else []
    plot_grids(layout, keys, layout.grids_plot)
    figures = [layout.accuracy_plot.name, layout.grids_plot.name]
    models = student_models(_report_rows(report))
    if len(models) > 1 and report["ipc"]:
        plot_cross_arch(report, models, layout.cross_arch_plot)
        figures.append(layout.cross_arch_plot.name)
    save_json(report, layout.report_json)
    save_text(header + table + f"\nFigures: {', '.join(figures)}\n", layout.report_md)
    print("\n" + header + table)
    print(f"report: {layout.report_md}")
    return report
