"""The main job end to end on digits with tiny settings: report.json, report.md and PNGs."""
import json
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent

TINY = ("data=digits", "model.width=16", "model.depth=2", "progress=false", "ipc=[1,2]",
        "squeeze.epochs=2", "squeeze.probe.epochs=5", "recover.iterations=5", "evaluate.epochs=3",
        "evaluate.eval_every=1", "evaluate.full_data_epochs=1")
ROWS = ("scdd", "sre2l", "scdd_real_init", "real_init_unrefined", "random_real")


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    from hydra import compose, initialize_config_dir

    from engine.cli import execute

    run_dir = tmp_path_factory.mktemp("pipeline")
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = compose(config_name="config", overrides=list(TINY))
    result = execute(cfg, run_dir)
    return run_dir, result


def test_report_json_has_every_key_with_fractions(pipeline_run):
    run_dir, _ = pipeline_run
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report["ipc"]) == {"1", "2"}
    for ipc in ("1", "2"):
        assert set(report["ipc"][ipc]) == set(ROWS)
        for row in ROWS:
            assert 0.0 <= report["ipc"][ipc][row]["top1"] <= 1.0
    assert 0.0 <= report["full_data"]["top1"] <= 1.0
    assert 0.0 <= report["teacher"]["ssl_probe_top1"] <= 1.0
    assert 0.0 <= report["teacher"]["supervised_top1"] <= 1.0
    assert {"squeeze", "recover", "evaluate", "total"} <= set(report["seconds"])
    assert "best" not in json.dumps(report)


def test_report_table_and_pngs(pipeline_run):
    run_dir, _ = pipeline_run
    table = (run_dir / "report.md").read_text()
    for title in ("SC-DD (SSL teacher)", "SRe2L-style (supervised teacher)", "SC-DD, real init",
                  "real init, unrefined", "random real subset", "full training data", "teacher: supervised"):
        assert title in table
    for name in ("accuracy_per_epoch.png", "distilled_grids.png", "squeeze/bn_variance.png",
                 "recover/ssl-noise/grid.png", "recover/supervised-noise/grid.png"):
        with Image.open(run_dir / name) as img:
            img.verify()
            assert img.size[0] > 50 and img.size[1] > 50


def test_resume_reuses_finished_rows(pipeline_run):
    from hydra import compose, initialize_config_dir

    from engine.cli import execute

    run_dir, _ = pipeline_run
    before = (run_dir / "evaluate" / "ipc1" / "scdd" / "result.json").stat().st_mtime_ns
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = compose(config_name="config", overrides=[*TINY, "resume=true"])
    result = execute(cfg, run_dir)
    after = (run_dir / "evaluate" / "ipc1" / "scdd" / "result.json").stat().st_mtime_ns
    assert before == after
    assert result["report"]["ipc"]["1"]["scdd"]["top1"] == json.loads(
        (run_dir / "report.json").read_text())["ipc"]["1"]["scdd"]["top1"]
