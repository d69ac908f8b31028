"""The `scdd` entry point: compose Hydra config, turn it into typed dataclasses, run one stage.

This is the only module that reads Hydra config. Stages live in their own packages and are
imported lazily so `scdd --help` stays fast.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from engine import config_store, preemption
from engine.config import from_mapping
from engine.context import RunConfig, RunContext
from engine.data import DataConfig
from engine.distributed import init_distributed, read_launch_env
from engine.errors import ConfigError
from engine.models import ModelConfig, build_model

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

# stage name -> "module:function"; each function takes a RunContext and returns a result dict.
STAGES = {
    "squeeze": "engine.squeeze.stage:run",
    "recover": "engine.recover.stage:run",
    "relabel": "engine.evaluate.stage:run_relabel",
    "evaluate": "engine.evaluate.stage:run",
    "pipeline": "engine.pipeline:run",
    "merge": "engine.merge:run",
    "bench": "engine.bench.stage:run",
}

# stage name -> "module:function" that makes every check of that stage (for the pipeline: of every stage
# it runs) without doing any work; execute calls it before the stage starts, so a bad setting costs seconds.
VALIDATORS = {
    "squeeze": "engine.squeeze.stage:validate",
    "recover": "engine.recover.stage:validate",
    "relabel": "engine.evaluate.stage:validate_relabel",
    "evaluate": "engine.evaluate.stage:validate",
    "pipeline": "engine.pipeline:validate",
    "merge": "engine.merge:validate",
    "bench": "engine.bench.stage:validate",
}

STUDY = ("engine.studies:validate", "engine.studies:run")
"""``+study=NAME`` (a ``study`` section in the config): the study runs its variants' stages instead of ``stage``."""

log = logging.getLogger("scdd")

# Every group option and the top-level keys come from the dataclasses; @hydra.main composes from them.
config_store.register()


def resolve_stage(name: str):
    if name not in STAGES:
        raise ConfigError(f"unknown stage '{name}'; choose one of {sorted(STAGES)}")
    return _resolve(name, STAGES[name])


def resolve_validator(name: str):
    """The stage's validate function (None for a stage without one)."""
    return _resolve(name, VALIDATORS[name]) if name in VALIDATORS else None


def _resolve(name: str, target: str):
    module_name, func_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Only the stage module itself (or its package) being absent means "not in this build"; a
        # module it imports that is missing (or any other ImportError) is a real error, raised as is.
        if exc.name and (exc.name == module_name or module_name.startswith(exc.name + ".")):
            raise ConfigError(f"stage '{name}' is not available in this build") from exc
        raise
    return getattr(module, func_name)


def build_context(cfg: DictConfig, run_dir: Path) -> RunContext:
    container = OmegaConf.to_container(cfg, resolve=True)
    data_cfg = from_mapping(DataConfig, container.pop("data"), "data")
    model_cfg = from_mapping(ModelConfig, container.pop("model"), "model")
    run_keys = {k: container.pop(k) for k in list(container) if k in RunConfig.__dataclass_fields__}
    run_cfg = from_mapping(RunConfig, run_keys)  # top-level keys: messages name them as typed (teacher=...)
    dist = init_distributed(run_cfg.device)
    return RunContext(run=run_cfg, data_cfg=data_cfg, model_cfg=model_cfg, run_dir=run_dir,
                      dist=dist, sections=container)


def execute(cfg: DictConfig, run_dir: Path) -> dict:
    """Run the configured stage in ``run_dir``; raises ConfigError on bad input."""
    ctx = build_context(cfg, run_dir)
    if ctx.sections.get("study") is not None:
        return _execute_study(ctx)
    if ctx.run.stage not in STAGES:
        raise ConfigError(f"unknown stage '{ctx.run.stage}'; choose one of {sorted(STAGES)}")
    # Validate everything before any work: data and model (a bad tree or size), then every section, file and
    # teacher each stage of this run will read; a bad setting fails here, in seconds, with nothing written.
    bundle = ctx.data
    build_model(ctx.model_cfg, bundle.num_classes, bundle.channels, bundle.image_size)
    stage = resolve_stage(ctx.run.stage)
    validator = resolve_validator(ctx.run.stage)
    if validator is not None:
        validator(ctx)
    return stage(ctx)


def _execute_study(ctx: RunContext) -> dict:
    """Validate every variant of the study (settings, data, models, each stage's checks), then run it."""
    bundle = ctx.data
    build_model(ctx.model_cfg, bundle.num_classes, bundle.channels, bundle.image_size)
    validate, run = (_resolve("study", target) for target in STUDY)
    validate(ctx)
    return run(ctx)


@hydra.main(version_base=None, config_path=str(CONFIG_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    run_dir = Path(hydra.core.hydra_config.HydraConfig.get().runtime.output_dir)
    if read_launch_env(os.environ)["world_size"] == 1:
        # SIGTERM / SIGUSR1: stop at the next safe point, progress saved. A torchrun/srun world keeps the
        # default (killed; resume=true continues from the last checkpoint): ranks would not stop together.
        preemption.install()
    try:
        execute(cfg, run_dir)
    except ConfigError as exc:
        print(f"scdd: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except preemption.Preempted as exc:
        print(f"scdd: preempted: {exc}; exit {preemption.REQUEUE_EXIT} (requeue, then resume=true in "
              f"{run_dir})", file=sys.stderr)
        sys.exit(preemption.REQUEUE_EXIT)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
