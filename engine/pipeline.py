"""`scdd` (stage=pipeline): squeeze -> recover from each teacher -> evaluate rows -> report."""
from __future__ import annotations

import time

from engine.context import RunContext
from engine.evaluate import stage as evaluate_stage
from engine.recover import stage as recover_stage
from engine.evaluate.report import write_report
from engine.squeeze import stage as squeeze_stage


RECOVER_RUNS = (("noise", ("ssl", "supervised")), ("real", ("ssl",)))
"""The distilled sets the report compares: noise init from each teacher, and real init from the SSL one."""


def validate(ctx: RunContext) -> None:
    """Check every stage the pipeline runs before the first starts: squeeze; recover for each set, with the
    teachers squeeze will write; evaluate, with its label teacher from squeeze and the sets from recover."""
    squeeze_stage.validate(ctx)
    squeeze_cfg, _ = squeeze_stage.parse_config(ctx.sections.get("squeeze", {}), ctx.sections.get("ssl", {}))
    made = [] if squeeze_cfg.probe_only else list(squeeze_cfg.teachers)
    for init, teachers in RECOVER_RUNS:
        recover_stage.validate(ctx, teachers_from_squeeze=made, init=init, teachers=list(teachers))
    evaluate_stage.validate(ctx, teachers_from_squeeze=made)


def run(ctx: RunContext) -> dict:
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
