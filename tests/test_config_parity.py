"""Every default lives once: what Hydra composes equals the typed dataclasses, field by field.

The config groups are registered from the dataclasses and their presets (engine.config_store); a
YAML file reintroduced under configs/<group>/ would shadow them (Hydra reads the config dir first)
and, with a different value, fail here.
"""
import dataclasses
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from engine.bench.settings import BenchConfig
from engine.config import from_mapping
from engine.config_store import RUN_CONFIG, group_options, to_node
from engine.context import RunConfig
from engine.data import DATA_PRESETS, DATASETS, DataConfig
from engine.evaluate.settings import EvaluateConfig
from engine.loaders import LOADERS
from engine.loaders.settings import LOADER_PRESETS, LoaderConfig
from engine.models import MODEL_PRESETS, MODELS, ModelConfig
from engine.recover.settings import RecoverConfig
from engine.squeeze.ssl import (METHODS, SSL_PRESETS, MoCoSettings, SimCLRSettings, SupervisedSettings,
                                TrainSettings)
from engine.squeeze.stage import ProbeConfig, SqueezeConfig, parse_config
from engine.training.trainers import (DEEPSPEED_DEFAULT, DEEPSPEED_PRESETS, TRAINER_PRESETS, TRAINERS,
                                      ZERO_STAGES, DeepSpeedSettings, TrainerConfig)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
OPTIONS = group_options()
PRESET_REGISTRIES = {"data": (DATA_PRESETS, DATASETS), "model": (MODEL_PRESETS, MODELS),
                     "ssl": (SSL_PRESETS, METHODS), "trainer": (TRAINER_PRESETS, TRAINERS),
                     "loader": (LOADER_PRESETS, LOADERS)}
PER_ENTRY_FIELDS = {"data": {"test_per_class"}}
"""Fields a default-option preset may set where the bare dataclass leaves None for "the entry's own"
(mnist5k: test_per_class 100, which is also what None means for mnist5k)."""


def default_options() -> dict[str, str | None]:
    """group -> the option configs/config.yaml's defaults list picks (None: the group is off)."""
    entries = yaml.safe_load((CONFIGS / "config.yaml").read_text())["defaults"]
    return {k: v for entry in entries if isinstance(entry, dict) for k, v in entry.items()}


def overrides_for(group: str, option: str) -> list[str]:
    if group == "deepspeed":  # the deepspeed= group only composes under trainer=deepspeed
        return ["trainer=deepspeed", f"deepspeed={option}"]
    return [f"{group}={option}"]


def composed(compose, *overrides: str) -> dict:
    return OmegaConf.to_container(compose(*overrides), resolve=True)


def assert_matches(section: dict, expected, where: str) -> None:
    """``section`` (a composed, plain section) equals dataclass instance ``expected`` field by field
    (same keys, values and value types) and parses into an equal instance."""
    names = [f.name for f in dataclasses.fields(expected)]
    assert sorted(section) == sorted(names), (
        f"{where}: composed keys {sorted(section)} != {type(expected).__name__} fields {sorted(names)}")
    for name in names:
        want, got = getattr(expected, name), section[name]
        if dataclasses.is_dataclass(want):
            assert_matches(got, want, f"{where}.{name}")
            continue
        want = to_node(want)
        assert got == want and type(got) is type(want), (
            f"{where}.{name}: composed {got!r} != dataclass default {want!r}")
    assert from_mapping(type(expected), section, where) == expected


def test_default_config_matches_dataclasses_field_by_field(compose):
    cfg = composed(compose)
    picks = default_options()
    assert set(picks) == set(OPTIONS), "configs/config.yaml must pick an option (or null) for every group"
    for group, option in picks.items():
        if option is None:
            assert group not in cfg, f"{group}: null in the defaults list but composed"
            continue
        assert_matches(cfg[group], OPTIONS[group][option], group)
    run_keys = {k: v for k, v in cfg.items() if k not in OPTIONS}
    assert_matches(run_keys, RunConfig(), "run")


@pytest.mark.parametrize("group,option", [(g, o) for g, options in OPTIONS.items() for o in options])
def test_every_group_option_matches_its_dataclass(compose, group, option):
    cfg = composed(compose, *overrides_for(group, option))
    assert_matches(cfg[group], OPTIONS[group][option], group)
    if group == "trainer" and option == "deepspeed":
        assert_matches(cfg["deepspeed"], DEEPSPEED_PRESETS[DEEPSPEED_DEFAULT], "deepspeed")
    run_keys = {k: v for k, v in cfg.items() if k not in OPTIONS}
    assert_matches(run_keys, RunConfig(), "run")


def test_top_level_keys_are_run_config():
    node = to_node(RunConfig())
    assert {"stage", "seed", "device", "resume", "ipc", "teacher", "progress"} <= set(node)
    assert RUN_CONFIG in yaml.safe_load((CONFIGS / "config.yaml").read_text())["defaults"]


@pytest.mark.parametrize("group", sorted(OPTIONS))
def test_bare_dataclass_is_the_default_option(group):
    """``Cls()`` equals the default option's preset (except documented per-entry fields)."""
    option = default_options()[group] or (DEEPSPEED_DEFAULT if group == "deepspeed" else None)
    preset = OPTIONS[group][option]
    bare = type(preset)()
    differing = {f.name for f in dataclasses.fields(preset) if getattr(bare, f.name) != getattr(preset, f.name)}
    assert differing <= PER_ENTRY_FIELDS.get(group, set()), f"{group}={option}: {type(preset).__name__}() " \
        f"differs in {sorted(differing)}"


@pytest.mark.parametrize("group", sorted(PRESET_REGISTRIES))
def test_presets_cover_each_registry_and_carry_their_name(group):
    presets, registry = PRESET_REGISTRIES[group]
    assert set(presets) == set(registry)
    for name, preset in presets.items():
        assert preset.name == name
    assert OPTIONS[group] == presets


def test_ssl_presets_are_each_methods_defaults():
    for name, preset in SSL_PRESETS.items():
        assert type(preset) is METHODS[name].settings and preset == METHODS[name].settings()
    assert SqueezeConfig().supervised == SSL_PRESETS["supervised"]


def test_deepspeed_presets_are_the_zero_stages():
    assert sorted(p.zero_stage for p in DEEPSPEED_PRESETS.values()) == list(ZERO_STAGES)
    assert all(name == f"zero{p.zero_stage}" for name, p in DEEPSPEED_PRESETS.items())
    assert DEEPSPEED_PRESETS[DEEPSPEED_DEFAULT] == DeepSpeedSettings()


@pytest.mark.parametrize("cls", [RunConfig, DataConfig, ModelConfig, TrainSettings, MoCoSettings, SimCLRSettings,
                                 SupervisedSettings, ProbeConfig, SqueezeConfig, RecoverConfig, EvaluateConfig,
                                 BenchConfig, TrainerConfig, DeepSpeedSettings, LoaderConfig],
                         ids=lambda cls: cls.__name__)
def test_settings_construct_with_their_defaults(cls):
    instance = cls()
    assert from_mapping(cls, to_node(instance), cls.__name__) == instance


def test_squeeze_config_defaults_parse():
    assert SqueezeConfig().supervised.name == "supervised"
    squeeze, ssl = parse_config(to_node(SqueezeConfig()), to_node(MoCoSettings()))
    assert squeeze == SqueezeConfig() and ssl == MoCoSettings()


def test_configs_hold_no_group_yaml():
    """Group options live in the dataclasses; a YAML under configs/<group>/ would shadow them."""
    files = {p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*") if p.is_file()}
    stray = sorted(f for f in files if f != "config.yaml" and not f.startswith("experiment/"))
    assert not stray, f"configs/ holds {stray}; put defaults in the dataclasses (engine/config_store.py)"
