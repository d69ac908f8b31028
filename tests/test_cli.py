"""The `scdd` Hydra app: help, composed config, every group option, and one-line errors."""
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import from_mapping
from omegaconf import OmegaConf

from engine.config_store import group_nodes, group_options
from engine.data import DataConfig
from engine.errors import ConfigError
from engine.models import ModelConfig

REPO = Path(__file__).resolve().parent.parent
GROUPS = {group: sorted(options) for group, options in group_options().items()}


def scdd(*args, cwd):
    exe = Path(sys.executable).parent / "scdd"
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_help_lists_every_group(tmp_path):
    out = scdd("--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for group, options in GROUPS.items():
        assert f"{group}: {', '.join(options)}" in out.stdout


def test_cfg_job_prints_composed_config(tmp_path):
    out = scdd("--cfg", "job", "data=digits", "stage=squeeze", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "name: digits" in out.stdout and "stage: squeeze" in out.stdout


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_group_option_composes(compose, group, option):
    """``group=option`` composes to exactly the node registered for that option (the preset's dataclass
    values; a named preset carries its own name) and parses back into the same typed instance."""
    cfg = compose(f"{group}={option}")
    composed = OmegaConf.to_container(cfg[group], resolve=False)
    registered = {k: v for k, v in group_nodes()[group][option].items() if k != "defaults"}
    assert composed == registered
    if "name" in composed:
        assert composed["name"] == option
    else:  # the one-option groups and deepspeed= (its options are ZeRO stages) carry no name
        assert group in {"squeeze", "recover", "evaluate", "bench", "deepspeed"}
    instance = group_options()[group][option]
    assert from_mapping(type(instance), composed, group) == instance
    if group == "data":
        from_mapping(DataConfig, cfg.data, "data")
    if group == "model":
        from_mapping(ModelConfig, cfg.model, "model")


def test_default_is_the_whole_pipeline_on_mnist5k(compose):
    cfg = compose()
    assert cfg.stage == "pipeline" and cfg.data.name == "mnist5k"


def test_typed_config_rejects_unknown_keys_and_bad_types():
    with pytest.raises(ConfigError, match="unknown key"):
        from_mapping(DataConfig, {"name": "digits", "rooot": "x"}, "data")
    with pytest.raises(ConfigError, match="must be of type int"):
        from_mapping(ModelConfig, {"name": "convnet", "width": "wide"}, "model")


@pytest.mark.parametrize("args,message", [
    (["data=digits", "data.name=nope", "stage=squeeze"], "unknown data 'nope'"),
    (["stage=dance"], "unknown stage 'dance'"),
    (["data=digits", "device=tpu"], "device='tpu'"),
    (["data=imagefolder", "data.root=/does/not/exist", "stage=squeeze"], "does not exist"),
    # a setting only recover reads stops the whole pipeline before squeeze starts
    (["data=digits", "recover.r_bn=abc"], "config 'recover.r_bn' must be of type float, got 'abc'"),
])
def test_bad_input_fails_with_one_line(tmp_path, args, message):
    out = scdd(*args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert out.returncode == 2
    lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], out.stderr
    assert "Traceback" not in out.stderr
    assert not any((tmp_path / "run" / stage).exists() for stage in ("squeeze", "recover", "evaluate"))


def test_resolve_stage_reports_only_a_missing_stage_module_as_unavailable(monkeypatch, tmp_path):
    """A stage module that is absent -> ConfigError; one that imports a missing package -> that error."""
    from engine import cli

    (tmp_path / "scdd_broken_stage.py").write_text("import scdd_no_such_package  # noqa: F401\n\ndef run(ctx):\n    return {}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.STAGES, "broken", "scdd_broken_stage:run")
    monkeypatch.setitem(cli.STAGES, "absent", "engine.scdd_no_such_stage:run")
    with pytest.raises(ModuleNotFoundError) as info:
        cli.resolve_stage("broken")
    assert info.value.name == "scdd_no_such_package"
    monkeypatch.setitem(cli.STAGES, "absent_package", "scdd_no_such_stage_package.stage:run")
    for name in ("absent", "absent_package"):
        with pytest.raises(ConfigError, match=f"stage '{name}' is not available in this build"):
            cli.resolve_stage(name)
