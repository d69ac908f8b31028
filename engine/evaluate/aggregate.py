"""Mean and spread of several runs' reports: `python -m engine.evaluate.aggregate RUN_DIR ...`.

Each RUN_DIR holds the report.json of one `scdd` run (typically the same settings with seed=0,1,2);
prints two markdown tables, final top-1 % (the headline) and best top-1 % (best full test pass), as
mean +- sample standard deviation per row and ipc. A run whose report has no best for a row (written
before best was recorded) counts in the final table only. Runs with evaluate.students add a third table:
final top-1 % per row, ipc and student model.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from engine.evaluate.report import ROW_TITLES


METRICS = {"top1": "final top-1 %", "best_top1": "best top-1 %"}


def collect(reports: list[dict], metric: str = "top1") -> dict[str, dict[str, list[float]]]:
    """row title -> column (ipc, or 'all') -> ``metric`` values (top1 | best_top1), one per report that
    has it. Teachers have one top-1 (no training curve here): they are rows of the top1 table only."""
    table: dict[str, dict[str, list[float]]] = {}
    for report in reports:
        for ipc, rows in report["ipc"].items():
            for key, row in rows.items():
                if row.get(metric) is not None:
                    table.setdefault(ROW_TITLES.get(key, key), {}).setdefault(ipc, []).append(row[metric])
        if report.get("full_data", {}).get(metric) is not None:
            table.setdefault("full training data", {}).setdefault("all", []).append(report["full_data"][metric])
        for key, title in (("ssl_probe_top1", "teacher: SSL + linear probe"),
                           ("supervised_top1", "teacher: supervised")):
            if metric == "top1" and key in report.get("teacher", {}):
                table.setdefault(title, {}).setdefault("all", []).append(report["teacher"][key])
    return table


def format_cell(values: list[float]) -> str:
    mean, sd = spread(values)
    return f"{100 * mean:.1f} ± {100 * sd:.1f}" if len(values) > 1 else f"{100 * mean:.1f}"


def render(table: dict[str, dict[str, list[float]]], runs: int, metric: str = "top1") -> str:
    columns = sorted({c for cols in table.values() for c in cols if c != "all"}, key=int)
    name = METRICS[metric]
    head = "| method | " + " | ".join(f"IPC {c} {name}" for c in columns) + " | all |"
    lines = [f"{name} over {runs} runs, mean ± sample sd", "", head, "|---" * (len(columns) + 2) + "|"]
    for title, cols in table.items():
        cells = [format_cell(cols[c]) if c in cols else "-" for c in columns]
        lines.append(f"| {title} | " + " | ".join(cells) + f" | {format_cell(cols['all']) if 'all' in cols else '-'} |")
    return "\n".join(lines)


def collect_students(reports: list[dict]) -> dict[str, dict[tuple[str, str], list[float]]]:
    """row title -> (ipc or 'all', student model) -> final top-1 values, from rows with "students"."""
    table: dict[str, dict[tuple[str, str], list[float]]] = {}

    def add(title: str, column: str, row: dict) -> None:
        for model, result in row.get("students", {}).items():
            if result.get("top1") is not None:
                table.setdefault(title, {}).setdefault((column, model), []).append(result["top1"])

    for report in reports:
        for ipc, rows in report["ipc"].items():
            for key, row in rows.items():
                add(ROW_TITLES.get(key, key), ipc, row)
        add("full training data", "all", report.get("full_data", {}))
    return table


def render_students(table: dict[str, dict[tuple[str, str], list[float]]], runs: int) -> str:
    """The per-model table: a column per ipc and student model (models in their evaluate.students order)."""
    found = list(dict.fromkeys(c for cols in table.values() for c in cols))
    models = list(dict.fromkeys(model for _, model in found))
    ipcs = sorted({ipc for ipc, _ in found}, key=lambda c: (c == "all", int(c) if c != "all" else 0))
    columns = [(ipc, model) for ipc in ipcs for model in models if (ipc, model) in found]
    head = "| method | " + " | ".join(f"{'IPC ' + ipc if ipc != 'all' else 'all'} top-1 % {model}"
                                      for ipc, model in columns) + " |"
    lines = [f"final top-1 % per student model over {runs} runs, mean ± sample sd", "", head,
             "|---" * (len(columns) + 1) + "|"]
    for title, cols in table.items():
        lines.append(f"| {title} | " + " | ".join(format_cell(cols[c]) if c in cols else "-" for c in columns) + " |")
    return "\n".join(lines)


BEATS_MARK = "▲"
BEATS_TEXT = (f"{BEATS_MARK} beats random real beyond the spread: the row's mean − sd exceeds the random real "
              f"subset's mean + sd at that IPC (sample sd over the seeds).")


def spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample sd; 0 for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def beats_random_real(row: list[float], random_real: list[float]) -> bool:
    """Whether a row's mean − sd exceeds random real's mean + sd (both over the same seeds)."""
    (mean, sd), (rr_mean, rr_sd) = spread(row), spread(random_real)
    return mean - sd > rr_mean + rr_sd


def seed_summary(reports: list[dict], seeds: list[int], metric: str = "top1") -> dict:
    """The root report of a seeds=[...] run from each seed's report.json: per ipc and row key
    {mean, sd, values, beats_random_real} of ``metric``; full data and teachers as {mean, sd, values}."""
    def cell(values: list[float], rr: list[float] | None = None, is_rr: bool = False) -> dict:
        mean, sd = spread(values)
        out = {"mean": mean, "sd": sd, "values": values}
        if rr is not None:
            out["beats_random_real"] = (not is_rr) and len(rr) == len(values) and beats_random_real(values, rr)
        return out

    ipcs: dict[str, dict[str, list[float]]] = {}
    for report in reports:
        for ipc, rows in report["ipc"].items():
            for key, row in rows.items():
                if row.get(metric) is not None:
                    ipcs.setdefault(ipc, {}).setdefault(key, []).append(row[metric])
    summary: dict = {"seeds": list(seeds), "metric": metric, "mark": BEATS_TEXT, "ipc": {}}
    for ipc, rows in ipcs.items():
        rr = rows.get("random_real")
        summary["ipc"][ipc] = {key: cell(values, rr if rr else None, key == "random_real")
                               for key, values in rows.items()}
    full = [r["full_data"][metric] for r in reports if r.get("full_data", {}).get(metric) is not None]
    if full:
        summary["full_data"] = cell(full)
    for key in ("ssl_probe_top1", "supervised_top1"):
        values = [r["teacher"][key] for r in reports if key in r.get("teacher", {})]
        if values and metric == "top1":
            summary.setdefault("teacher", {})[key] = cell(values)
    return summary


def render_seed_summary(summary: dict) -> str:
    """The summary as a markdown table: rows by title, one column per IPC, mean ± sd in %, the mark."""
    columns = sorted(summary["ipc"], key=int)
    keys: list[str] = []
    for ipc in columns:
        keys += [k for k in summary["ipc"][ipc] if k not in keys]

    def fmt(c: dict | None) -> str:
        if c is None:
            return "-"
        text = f"{100 * c['mean']:.1f} ± {100 * c['sd']:.1f}"
        return text + (f" {BEATS_MARK}" if c.get("beats_random_real") else "")

    name = METRICS.get(summary["metric"], summary["metric"])
    lines = [f"{name} over seeds {summary['seeds']}, mean ± sample sd", "",
             "| method | " + " | ".join(f"IPC {c}" for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for key in keys:
        lines.append(f"| {ROW_TITLES.get(key, key)} | " + " | ".join(fmt(summary["ipc"][c].get(key)) for c in columns)
                     + " |")
    extra = []
    if "full_data" in summary:
        extra.append(("full training data", summary["full_data"]))
    for key, title in (("ssl_probe_top1", "teacher: SSL + linear probe"), ("supervised_top1", "teacher: supervised")):
        if key in summary.get("teacher", {}):
            extra.append((title, summary["teacher"][key]))
    for title, c in extra:
        lines.append(f"| {title} | " + " | ".join(fmt(c) if i == 0 else "" for i in range(len(columns))) + " |")
    return "\n".join(lines + ["", summary["mark"]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories holding report.json")
    args = parser.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r / "report.json").is_file()]
    if missing:
        print(f"aggregate: error: no report.json in {', '.join(missing)}; pass finished `scdd` run dirs",
              file=sys.stderr)
        return 2
    reports = [json.loads((r / "report.json").read_text()) for r in args.runs]
    tables = [render(collect(reports, metric), len(reports), metric) for metric in METRICS]
    students = collect_students(reports)
    if students:
        tables.append(render_students(students, len(reports)))
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
