"""`scdd` (stage=pipeline): squeeze -> recover from each teacher -> evaluate rows -> report."""
from __future__ import annotations

import time

from engine.context import RunContext
from engine.evaluate import stage as evaluate_stage
from engine.recover import stage as recover_stage
from engine.evaluate.report import write_report
from engine.squeeze import stage as squeeze_stage


def run(ctx: RunContext) -> dict:
    seconds: dict[str, float] = {}
    start = time.time()
    squeeze_stage.run(ctx)
    seconds["squeeze"] = time.time() - start

    start = time.time()
    recover_seconds = {}
    # The distilled sets the report compares: noise init from each teacher, and real init from the SSL one.
    for init, teachers in (("noise", ["ssl", "supervised"]), ("real", ["ssl"])):
        out = recover_stage.run(ctx, init=init, teachers=teachers)
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
