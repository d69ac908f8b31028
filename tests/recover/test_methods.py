"""Issue 18's run-level pieces: seeds=[...] in one pipeline run (seed dirs, root report with mean ± sd and
the beats-random-real mark) and the ``method`` presets (+method=NAME)."""
import json

import pytest
from omegaconf import OmegaConf

from engine.config import from_mapping
from engine.context import RunConfig
from engine.errors import ConfigError
from engine.evaluate.aggregate import BEATS_MARK, beats_random_real, render_seed_summary, seed_summary
from engine.evaluate.settings import EvaluateConfig
from engine.recover.methods import METHOD_PRESETS
from engine.recover.settings import RecoverConfig

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ("data=digits", "model.width=16", "model.depth=2", "progress=false", "logger=none", "ipc=[1]",
        "squeeze.epochs=1", "squeeze.probe.epochs=1", "squeeze.teachers=[ssl]", "recover.iterations=3",
        "recover.teachers=[ssl]", "evaluate.epochs=2", "evaluate.batch_size=10", "evaluate.eval_every=2",
        "evaluate.full_data=false")


def report(top1: dict[str, float]) -> dict:
    return {"ipc": {"1": {k: {"top1": v, "best_top1": v} for k, v in top1.items()}},
            "teacher": {"ssl_probe_top1": 0.9}}


def test_mark_needs_mean_minus_sd_above_random_real_mean_plus_sd():
    reports = [report({"scdd_real_init": a, "real_init_unrefined": b, "random_real": r})
               for a, b, r in ((0.70, 0.58, 0.50), (0.72, 0.66, 0.54), (0.74, 0.50, 0.52))]
    summary = seed_summary(reports, [0, 1, 2])
    rows = summary["ipc"]["1"]
    assert rows["scdd_real_init"]["values"] == [0.70, 0.72, 0.74]
    assert rows["scdd_real_init"]["mean"] == pytest.approx(0.72) and rows["scdd_real_init"]["sd"] == pytest.approx(0.02)
    assert rows["scdd_real_init"]["beats_random_real"] is True  # 0.70 > 0.52 + 0.02
    # mean 0.58 beats 0.52, but its sd (0.08) overlaps random real's spread
    assert rows["real_init_unrefined"]["mean"] > rows["random_real"]["mean"]
    assert rows["real_init_unrefined"]["beats_random_real"] is False
    assert rows["random_real"]["beats_random_real"] is False
    assert summary["teacher"]["ssl_probe_top1"]["mean"] == pytest.approx(0.9)
    text = render_seed_summary(summary)
    line = next(t for t in text.splitlines() if t.startswith("| SC-DD, real init"))
    assert "72.0 ± 2.0" in line and BEATS_MARK in line
    assert BEATS_MARK not in next(t for t in text.splitlines() if t.startswith("| real init, unrefined"))
    assert "beats random real beyond the spread" in text
    assert beats_random_real([0.6], [0.5]) and not beats_random_real([0.5], [0.5])


def test_bad_seeds_are_one_line_errors():
    for seeds in ([], [0, 0], [-1]):
        with pytest.raises(ConfigError) as err:
            RunConfig(seeds=seeds)
        assert "seeds=" in str(err.value) and "\n" not in str(err.value)
    assert RunConfig().seeds is None
    with pytest.raises(ConfigError, match="stage=pipeline"):
        RunConfig(stage="recover", seeds=[0, 1])


@pytest.mark.parametrize("name", sorted(METHOD_PRESETS))
def test_each_method_preset_composes_to_exactly_its_overrides(compose, name):
    cfg = OmegaConf.to_container(compose(f"+method={name}"), resolve=True)
    preset = METHOD_PRESETS[name]
    recover = from_mapping(RecoverConfig, cfg["recover"], "recover")
    evaluate = from_mapping(EvaluateConfig, cfg["evaluate"], "evaluate")
    for section, got, base in (("recover", recover, RecoverConfig()), ("evaluate", evaluate, EvaluateConfig())):
        changed = {k: getattr(got, k) for k in vars(base) if getattr(got, k) != getattr(base, k)}
        overrides = getattr(preset, section)
        assert set(changed) <= set(overrides), (name, section)
        assert all(getattr(got, k) == v for k, v in overrides.items()), (name, section)
    # the command line still wins over a preset
    cfg = compose(f"+method={name}", "recover.iterations=7")
    assert cfg.recover.iterations == 7
    assert METHOD_PRESETS["sc_dd"].node() == {}


def test_seeds_run_the_pipeline_per_seed_and_report_mean_and_sd(run_scdd, tmp_path):
    run = tmp_path / "run"
    run_scdd(*TINY, "seeds=[0,1]", run_dir=run)
    for s in (0, 1):
        seed_report = json.loads((run / f"seed{s}" / "report.json").read_text())
        assert (run / f"seed{s}" / "squeeze" / "ssl" / "teacher.pt").is_file()
        assert f"seed={s}" in (run / f"seed{s}" / "report.md").read_text()
        assert set(seed_report["ipc"]["1"]) == {"scdd", "scdd_real_init", "real_init_unrefined", "random_real"}
    root = json.loads((run / "report.json").read_text())
    seeds = [json.loads((run / f"seed{s}" / "report.json").read_text()) for s in (0, 1)]
    assert root["seeds"] == [0, 1]
    for key, cell in root["ipc"]["1"].items():
        assert cell["values"] == [r["ipc"]["1"][key]["top1"] for r in seeds]
        assert set(cell) == {"mean", "sd", "values", "beats_random_real"}
    md = (run / "report.md").read_text()
    assert "seeds=[0, 1]" in md and "±" in md and "beats random real beyond the spread" in md
    # resume: every seed's artifacts match their fingerprints, nothing is trained again
    stamp = (run / "seed1" / "evaluate" / "ipc1" / "random_real" / "result.json").stat().st_mtime_ns
    run_scdd(*TINY, "seeds=[0,1]", "resume=true", run_dir=run)
    assert (run / "seed1" / "evaluate" / "ipc1" / "random_real" / "result.json").stat().st_mtime_ns == stamp
