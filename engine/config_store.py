"""Hydra's config groups, registered from the typed dataclasses: the one place defaults live.

Every option of every group is a dataclass instance. A group with one option (squeeze, recover,
evaluate, bench) stores its dataclass built with no arguments as ``default``; a group of variants
stores each named preset of the registry next to its dataclass (``data=`` DATA_PRESETS, ``model=``
MODEL_PRESETS, ``ssl=`` SSL_PRESETS, ``trainer=`` TRAINER_PRESETS, ``deepspeed=`` DEEPSPEED_PRESETS,
``loader=`` LOADER_PRESETS, ``logger=`` LOGGER_PRESETS). Groups that configs/config.yaml does not pick,
added with ``+GROUP=OPTION`` (``+study=`` STUDY_PRESETS), come from ``optional_group_options``; ``+method=``
(engine.recover.methods.METHOD_PRESETS) is a group of overrides of the recover and evaluate keys, stored at
the global package. The top-level keys are RunConfig's fields, the
``run_config`` entry of configs/config.yaml's defaults list. configs/ keeps only config.yaml (defaults list, hydra settings)
and the experiment presets (overrides on top of these defaults).

Nodes are stored as plain dicts, not structured configs, so OmegaConf does no type checking of its
own: ``engine.config.from_mapping`` validates each section with its one-line messages.
"""
from __future__ import annotations

import dataclasses
from typing import Any

RUN_CONFIG = "run_config"
"""ConfigStore name of the top-level keys (RunConfig); listed in configs/config.yaml's defaults."""


def group_options() -> dict[str, dict[str, Any]]:
    """group -> option name -> typed config instance: every option ``scdd GROUP=OPTION`` composes."""
    from engine.bench.settings import BenchConfig
    from engine.data import DATA_PRESETS
    from engine.evaluate.settings import EvaluateConfig
    from engine.loaders.settings import LOADER_PRESETS
    from engine.models import MODEL_PRESETS
    from engine.recover.settings import RecoverConfig
    from engine.squeeze.ssl import SSL_PRESETS
    from engine.squeeze.stage import SqueezeConfig
    from engine.training.tb_logger import LOGGER_PRESETS
    from engine.training.trainers import DEEPSPEED_PRESETS, TRAINER_PRESETS

    return {
        "data": dict(DATA_PRESETS),
        "model": dict(MODEL_PRESETS),
        "ssl": dict(SSL_PRESETS),
        "squeeze": {"default": SqueezeConfig()},
        "recover": {"default": RecoverConfig()},
        "evaluate": {"default": EvaluateConfig()},
        "bench": {"default": BenchConfig()},
        "trainer": dict(TRAINER_PRESETS),
        "deepspeed": dict(DEEPSPEED_PRESETS),
        "loader": dict(LOADER_PRESETS),
        "logger": dict(LOGGER_PRESETS),
    }


def optional_group_options() -> dict[str, dict[str, Any]]:
    """group -> option -> typed config of the groups a run adds with ``+GROUP=OPTION`` (absent otherwise:
    configs/config.yaml's defaults list does not name them)."""
    from engine.studies.settings import STUDY_PRESETS

    return {"study": dict(STUDY_PRESETS)}


def to_node(config: Any) -> Any:
    """A dataclass instance as the plain dict Hydra composes (nested dataclasses and tuples become
    dicts and lists)."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_node(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_node(v) for v in config]
    if isinstance(config, dict):
        return {k: to_node(v) for k, v in config.items()}
    return config


def group_nodes() -> dict[str, dict[str, dict]]:
    """group -> option -> the node registered for it (including any defaults list of its own)."""
    from engine.training.trainers import DEEPSPEED_DEFAULT

    nodes = {group: {name: to_node(cfg) for name, cfg in options.items()}
             for group, options in group_options().items()}
    # trainer=deepspeed picks a ZeRO stage from the deepspeed= group (null otherwise)
    nodes["trainer"]["deepspeed"] = {
        "defaults": [{"override /deepspeed@_global_.deepspeed": DEEPSPEED_DEFAULT}],
        **nodes["trainer"]["deepspeed"],
    }
    return nodes


def register() -> None:
    """Store every group option and the top-level keys in Hydra's ConfigStore (idempotent).

    Call before composing: engine.cli does at import, the tests' compose fixture through conftest.
    """
    from hydra.core.config_store import ConfigStore

    from engine.context import RunConfig

    store = ConfigStore.instance()
    for group, options in group_nodes().items():
        for name, node in options.items():
            store.store(group=group, name=name, node=node, provider="engine")
    for group, options in optional_group_options().items():
        for name, cfg in options.items():
            store.store(group=group, name=name, node=to_node(cfg), provider="engine")
    store.store(name=RUN_CONFIG, node=to_node(RunConfig()), provider="engine")
    register_methods(store)

    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("scdd_run_dir"):
        OmegaConf.register_new_resolver("scdd_run_dir", job_run_dir, use_cache=False)


METHOD_GROUP = "method"
"""``scdd +method=NAME``: engine.recover.methods.METHOD_PRESETS, each a set of recover/evaluate overrides."""


def method_nodes() -> dict[str, dict]:
    """option -> the node of the ``method`` group (overrides of other groups' keys, package _global_)."""
    from engine.recover.methods import METHOD_PRESETS

    return {name: preset.node() for name, preset in METHOD_PRESETS.items()}


def register_methods(store) -> None:
    """The ``method`` group: not in group_options (its options override other groups, they are not a
    section of their own), stored at the global package so ``+method=best`` sets recover.* and evaluate.*."""
    for name, node in method_nodes().items():
        store.store(group=METHOD_GROUP, name=name, node=node, package="_global_", provider="engine")


JOB_ID_VARIABLES = ("SCDD_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_JOB_ID")
"""The job that owns a run dir: set by hand on any scheduler, else SLURM's array job id (shared by every
task of the array), else SLURM's job id (kept when the job is requeued)."""


def job_run_dir(timestamped: str, env=None) -> str:
    """configs/config.yaml's default hydra.run.dir: ``outputs/job-<id>`` inside a job (so a requeued task
    and every task of an array find the same run dir), else ``outputs/<timestamped>``."""
    import os

    env = os.environ if env is None else env
    for name in JOB_ID_VARIABLES:
        if env.get(name):
            return f"outputs/job-{env[name]}"
    return f"outputs/{timestamped}"
