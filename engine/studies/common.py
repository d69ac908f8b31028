"""What every study shares: variants as sub-runs, reduced settings, the report, and the statistics.

A variant is one SC-DD run with a few settings changed (a teacher's model, objective, probe mode, ...),
in its own normal run directory <run>/study/<variant>/ (<variant>/s<seed>/ with study.seeds): squeeze,
recover and evaluate there resume as they do alone, so `resume=true` skips finished teachers, sets
and student rows, and a killed study goes on where it stopped.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from engine import preemption
from engine.artifacts.layout import SET_FOLDERS, RunLayout
from engine.config import from_mapping
from engine.context import RunConfig, RunContext
from engine.evaluate import stage as evaluate_stage
from engine.evaluate.aggregate import spread
from engine.evaluate.report import write_report as write_run_report
from engine.evaluate.settings import EvaluateConfig
from engine.io import save_figure, save_json, save_text
from engine.models import ModelConfig, build_model
from engine.recover import stage as recover_stage
from engine.squeeze import stage as squeeze_stage
from engine.studies.settings import StudyConfig

log = logging.getLogger("scdd.study")

ROW_OF_KIND = {"ssl": "scdd", "supervised": "sre2l"}
"""The report row of the noise-init set recovered from each teacher kind."""


def study_config(ctx: RunContext) -> StudyConfig:
    return from_mapping(StudyConfig, ctx.sections.get("study") or {}, "study")


def has_students_option() -> bool:
    """Whether this build's evaluate stage trains several student architectures per row
    (``evaluate.students``); without it cross_arch runs one evaluate per architecture."""
    return "students" in {f.name for f in dataclasses.fields(EvaluateConfig)}


@dataclass
class Variant:
    """One run of a study: ``overrides`` (dotted keys: ``model.width``, ``squeeze.epochs``, ``ipc``, ...)
    on top of the run's config (and, at reduced scale, of the reduced settings)."""

    name: str
    kind: str = "ssl"
    """The teacher squeeze trains (ssl | supervised): recover synthesizes from it, it labels every row."""
    overrides: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    """Columns of the study's table that describe the variant (objective, epochs, ...)."""

    @property
    def row(self) -> str:
        return ROW_OF_KIND[self.kind]


def seeds_of(ctx: RunContext, study: StudyConfig) -> list[int]:
    return list(study.seeds) if study.seeds is not None else [ctx.run.seed]


def variant_dir(ctx: RunContext, study: StudyConfig, name: str, seed: int) -> Path:
    return RunLayout(ctx.run_dir).study_variant(name, None if study.seeds is None else seed)


def scale_overrides(study: StudyConfig) -> dict[str, Any]:
    """The reduced scale's settings (none at full scale)."""
    if study.scale == "full":
        return {}
    r = study.reduced
    out = {"squeeze.epochs": r.ssl_epochs, "recover.iterations": r.recover_iterations,
           "evaluate.epochs": r.student_epochs, "evaluate.batch_size": r.student_batch_size,
           "evaluate.eval_every": r.eval_every, "evaluate.full_data": False,
           "ipc": [r.ipc]}
    if r.probe_epochs is not None:
        out["squeeze.probe.epochs"] = r.probe_epochs
    return out


def derive(ctx: RunContext, run_dir: Path, overrides: dict[str, Any]) -> RunContext:
    """A copy of ``ctx`` for a sub-run in ``run_dir`` with dotted ``overrides`` applied (``model.*`` and the
    top-level keys to their dataclasses, everything else to the plain sections); the data is shared."""
    sections = copy.deepcopy({k: v for k, v in ctx.sections.items() if k != "study"})
    model = dataclasses.asdict(ctx.model_cfg)
    run = dataclasses.asdict(ctx.run)
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if head == "model":
            if rest:
                model[rest] = value
            else:
                model = dict(value)
        elif not rest and head in RunConfig.__dataclass_fields__:
            run[head] = value
        else:
            node = sections
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
    sub = RunContext(run=from_mapping(RunConfig, run), data_cfg=ctx.data_cfg,
                     model_cfg=from_mapping(ModelConfig, model, "model"), run_dir=run_dir, dist=ctx.dist,
                     sections=sections)
    sub.__dict__["data"] = ctx.data  # cached_property: every variant reads the one decoded dataset
    return sub


def variant_context(ctx: RunContext, study: StudyConfig, variant: Variant, seed: int,
                    extra: Optional[dict[str, Any]] = None) -> RunContext:
    overrides = {**scale_overrides(study), "seed": seed, "squeeze.teachers": [variant.kind],
                 "evaluate.label_teacher": variant.kind, **variant.overrides, **(extra or {})}
    return derive(ctx, variant_dir(ctx, study, variant.name, seed), overrides)


def validate_variant(vctx: RunContext, kind: str) -> None:
    """The checks of every stage the variant runs, before any variant starts."""
    squeeze_stage.validate(vctx)
    recover_stage.validate(vctx, teachers_from_squeeze=[kind], init="noise", teachers=[kind])
    evaluate_stage.validate(vctx, teachers_from_squeeze=[kind])
    bundle = vctx.data
    build_model(vctx.model_cfg, bundle.num_classes, bundle.channels, bundle.image_size)


def run_variant(vctx: RunContext, kind: str, rows: Optional[Sequence[str]] = None,
                evaluate_overrides: Optional[dict[str, Any]] = None) -> dict:
    """squeeze (the one teacher) -> recover (noise init from it) -> evaluate its row and the random-real
    baseline; returns the evaluate results plus the teacher's final metrics and BN summary."""
    started = time.time()
    out = squeeze_stage.run(vctx)
    if "interrupted" in out:  # squeeze.stop_after_epochs or a signal: the epoch checkpoint is on disk
        raise preemption.Preempted(f"squeeze of {vctx.run_dir} stopped before its last epoch")
    recover_stage.run(vctx, init="noise", teachers=[kind])
    cfg = evaluate_stage.build_eval_config(vctx, **(evaluate_overrides or {}))
    wanted = set(rows) if rows is not None else {ROW_OF_KIND[kind]}
    sets = {k: v for k, v in evaluate_stage.available_sets(vctx.run_dir).items() if k in wanted}
    results = evaluate_stage.evaluate_rows(vctx, cfg, sets)
    results["seconds"] = {"total": time.time() - started}
    if vctx.dist.is_main:
        write_run_report(vctx, results)
    return {"results": results, **teacher_facts(vctx.run_dir, kind)}


def teacher_facts(run_dir: Path, kind: str) -> dict:
    """The teacher's final metrics (probe_top1 or top1, epochs) and per-layer BN summary from squeeze."""
    import json

    layout = RunLayout(run_dir)
    metrics = json.loads((layout.squeeze_dir(kind) / "metrics.json").read_text())["final"]
    bn = json.loads(layout.bn_stats(kind).read_text())["layers"]
    return {"teacher": metrics, "bn": bn}


def row_top1(results: dict, ipc: int, row: str, arch: Optional[str] = None) -> Optional[float]:
    entry = results["ipc"].get(str(ipc), {}).get(row)
    if entry is None:
        return None
    if arch is not None and entry.get("students"):
        student = entry["students"].get(arch)
        return None if student is None else float(student["top1"])
    return float(entry["top1"])


def param_count(model_cfg: ModelConfig, ctx: RunContext) -> int:
    bundle = ctx.data
    model = build_model(model_cfg, bundle.num_classes, bundle.channels, bundle.image_size)
    return int(sum(p.numel() for p in model.parameters()))


def teacher_accuracy(facts: dict) -> Optional[float]:
    """The teacher's test top-1: its probe's for an SSL teacher, its own for a supervised one."""
    metrics = facts["teacher"]
    value = metrics.get("probe_top1", metrics.get("top1"))
    return None if value is None else float(value)


def run_seeds(ctx: RunContext, study: StudyConfig, variants: Sequence[Variant],
              measure: Callable[[Variant, int], dict[str, Any]]) -> dict[str, dict]:
    """``measure(variant, seed)`` for every variant and seed -> variant -> {"seeds": [...], "mean": ..., "sd": ...}
    (numbers only are averaged; sd is the sample sd, 0 for one seed)."""
    out = {}
    for variant in variants:
        per_seed = []
        for seed in seeds_of(ctx, study):
            log.info("study %s: variant %s, seed %d", study.name, variant.name, seed)
            per_seed.append(measure(variant, seed))
        out[variant.name] = {"info": variant.info, "seeds": per_seed, **summarize(per_seed)}
    return out


def summarize(per_seed: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    mean, sd = {}, {}
    for key in per_seed[0]:
        values = [s[key] for s in per_seed]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None for v in values):
            mean[key], sd[key] = spread([float(v) for v in values])
    return {"mean": mean, "sd": sd}


def cell(entry: dict, key: str, percent: bool = False, digits: int = 1) -> str:
    """A table cell: the mean (± sd over several seeds); '-' when missing."""
    if key not in entry["mean"]:
        return "-"
    scale = 100.0 if percent else 1.0
    text = f"{entry['mean'][key] * scale:.{digits}f}"
    if len(entry["seeds"]) > 1:
        text += f" ± {entry['sd'][key] * scale:.{digits}f}"
    return text


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def header(ctx: RunContext, study: StudyConfig, what: str) -> list[str]:
    """The report's opening lines: what was run, at which scale, with how many seeds."""
    seeds = seeds_of(ctx, study)
    scale = (f"reduced ({', '.join(f'{k}={v}' for k, v in scale_overrides(study).items())})"
             if study.scale == "reduced" else "full (the run's own settings)")
    seed_text = (f"one seed per variant (seed={seeds[0]}; study.seeds=[0,1,2] repeats each and reports mean ± sd)"
                 if study.seeds is None else f"seeds {seeds}: mean ± sample sd over seeds")
    return [f"# Study: {study.name}", "", what, "",
            f"- data: {ctx.data_cfg.name}; scale: {scale}", f"- {seed_text}",
            "- variants: <run>/study/<variant>/ (normal run dirs; resume=true skips what is finished)", ""]


def write_study(ctx: RunContext, lines: list[str], figures: dict[str, Path], data: dict, seconds: float) -> dict:
    """report.md (``lines`` plus the figures' list) and study.json in the run dir."""
    layout = RunLayout(ctx.run_dir)
    lines = list(lines) + ["", "## Figures", ""] + [f"- `{path.name}`: {what}" for what, path in figures.items()]
    lines += ["", f"Wall time of this invocation: {seconds:.0f} s (resume=true reuses finished teachers, sets and student rows)."]
    data = {**data, "figures": {what: str(path) for what, path in figures.items()}, "seconds": seconds}
    save_json(data, layout.study_json)
    save_text("\n".join(lines) + "\n", layout.report_md)
    print("\n".join(lines))
    return data


def figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_plot(fig, path: Path) -> Path:
    plt = figure()
    fig.tight_layout()
    out = save_figure(fig, path)
    plt.close(fig)
    return out


def ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x), dtype=np.float64)
    r[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):
        tied = x == value
        r[tied] = r[tied].mean()
    return r


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson's of the tie-averaged ranks); nan when either side is constant."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"spearman needs two equal-length sequences of >= 2 values, got {len(x)} and {len(y)}")
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


def bootstrap_interval(x: Sequence[float], y: Sequence[float], resamples: int = 2000, level: float = 0.9,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of Spearman's rho over the pairs (resampled with replacement); resamples
    where a side is constant (rho undefined) are left out."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        pick = rng.integers(0, len(x), len(x))
        rho = spearman(x[pick], y[pick])
        if not math.isnan(rho):
            values.append(rho)
    if not values:
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


__all__ = ["ROW_OF_KIND", "SET_FOLDERS", "Variant", "bootstrap_interval", "derive", "run_variant", "spearman"]
