"""`scdd` (stage=pipeline): squeeze -> recover from each teacher -> evaluate rows -> report."""
from __future__ import annotations

import dataclasses
import time

from engine.artifacts.layout import RunLayout
from engine.context import RunContext
from engine.evaluate.aggregate import render_seed_summary, seed_summary
from engine.io import save_json, save_text
from engine.evaluate import stage as evaluate_stage
from engine.recover import stage as recover_stage
from engine.evaluate.report import write_report
from engine.squeeze import stage as squeeze_stage


RECOVER_RUNS = (("noise", ("ssl", "supervised")), ("real", ("ssl",)))
"""The distilled sets the report compares: noise init from each teacher, and real init from the SSL one."""


def seed_contexts(ctx: RunContext) -> list[RunContext]:
    """One run context per seed of ``seeds`` (each a normal run dir <run>/seed<s>/ with seed=s, sharing the
    decoded data); just ``ctx`` when seeds is null."""
    if ctx.run.seeds is None:
        return [ctx]
    out = []
    for seed in ctx.run.seeds:
        child = dataclasses.replace(ctx, run=dataclasses.replace(ctx.run, seed=seed, seeds=None),
                                    run_dir=RunLayout(ctx.run_dir).seed_run(seed))
        child.__dict__["data"] = ctx.data  # the data never depends on the seed: built (decoded) once, in <run>
        out.append(child)
    return out


def validate(ctx: RunContext) -> None:
    if ctx.run.seeds is not None:
        for child in seed_contexts(ctx):
            validate(child)
        return
    _validate_one(ctx)


def _validate_one(ctx: RunContext) -> None:
    """Check every stage the pipeline runs before the first starts: squeeze; recover for each set, with the
    teachers squeeze will write; evaluate, with its label teacher from squeeze and the sets from recover."""
    squeeze_stage.validate(ctx)
    squeeze_cfg, _ = squeeze_stage.parse_config(ctx.sections.get("squeeze", {}), ctx.sections.get("ssl", {}))
    made = [] if squeeze_cfg.probe_only else list(squeeze_cfg.teachers)
    for init, teachers in RECOVER_RUNS:
        recover_stage.validate(ctx, teachers_from_squeeze=made, init=init, teachers=list(teachers))
    evaluate_stage.validate(ctx, teachers_from_squeeze=made)


def run(ctx: RunContext) -> dict:
    if ctx.run.seeds is not None:
        return run_seeds(ctx)
    return _run_one(ctx)


def run_seeds(ctx: RunContext) -> dict:
    """The whole pipeline once per seed (resume=true goes on where each stopped: finished artifacts match
    their fingerprints and are skipped), then the root report: mean ± sd over the seeds, and the rows that
    beat random real beyond the spread."""
    reports = []
    for child in seed_contexts(ctx):
        child.run_dir.mkdir(parents=True, exist_ok=True)
        reports.append(_run_one(child)["report"])
    if not ctx.dist.is_main:
        return {"seeds": {}}
    summary = seed_summary(reports, list(ctx.run.seeds))
    layout = RunLayout(ctx.run_dir)
    header = (f"# SC-DD report: data={ctx.data_cfg.name}, model={ctx.model_cfg.name}, "
              f"ipc={sorted(set(ctx.run.ipc))}, seeds={list(ctx.run.seeds)}\n\n")
    best = seed_summary(reports, list(ctx.run.seeds), "best_top1")
    text = (header + render_seed_summary(summary) + "\n\n" + render_seed_summary(best) + "\n\n"
            + "Each seed's own report: " + ", ".join(f"seed{s}/report.md" for s in ctx.run.seeds) + "\n")
    save_json({**summary, "best_top1": best}, layout.report_json)
    save_text(text, layout.report_md)
    print("\n" + text)
    print(f"report: {layout.report_md}")
    return {"seeds": summary}


def _run_one(ctx: RunContext) -> dict:
    seconds: dict[str, float] = {}
    start = time.time()
    squeeze_stage.run(ctx)
    seconds["squeeze"] = time.time() - start

    start = time.time()
    recover_seconds = {}
    for init, teachers in RECOVER_RUNS:
        out = recover_stage.run(ctx, init=init, teachers=list(teachers))
        recover_seconds.update({name: row["seconds"] for name, row in out["sets"].items()})
    recover_seconds["ssl-real/init"] = 0.0
    seconds["recover"] = time.time() - start

    start = time.time()
    cfg = evaluate_stage.build_eval_config(ctx)
    results = evaluate_stage.evaluate_rows(ctx, cfg, evaluate_stage.available_sets(ctx.run_dir))
    seconds["evaluate"] = time.time() - start
    seconds["total"] = sum(seconds.values())
    results["seconds"] = seconds
    report = write_report(ctx, results, seconds, recover_seconds)
    return {"results": results, "report": report}
