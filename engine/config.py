"""Turn Hydra/OmegaConf nodes into plain typed dataclasses.

Only the CLI entry point reads Hydra config; library code receives these dataclasses.
Every default lives once, in the dataclasses (and, for groups with variants such as ``model=``, in
the named presets next to them, e.g. ``engine.models.MODEL_PRESETS``); ``engine.config_store``
registers them as Hydra's config groups. configs/ holds only config.yaml (defaults list, hydra
settings) and the experiment presets' overrides.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

from engine.errors import ConfigError

T = TypeVar("T")

MISSING = "???"
"""A preset value the command line must give (OmegaConf's mandatory-value marker), e.g. data.root of
data=imagefolder; ``scdd --cfg job`` shows it as ``???``."""


def from_mapping(cls: type[T], mapping: Any, where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys with a clear message."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(mapping, DictConfig):
            mapping = OmegaConf.to_container(mapping, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf ships with hydra-core
        pass
    mapping = dict(mapping or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} in config '{where or cls.__name__}'; "
            f"valid keys are {sorted(fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in mapping.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}" if where else name)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if value is None:
        return None
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, where)
    if origin is typing.Union or origin is types.UnionType:  # Optional[X] and X | None alike
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _coerce(non_none[0], value, where)
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args else Any
        out = [_coerce(inner, v, where) for v in value]
        return tuple(out) if origin is tuple else out
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool):
        raise ConfigError(f"config '{where}' must be an integer, got {value!r}")
    if hint in (int, float, str, bool) and not isinstance(value, hint):
        raise ConfigError(
            f"config '{where}' must be of type {hint.__name__}, got {value!r}; fix the override"
        )
    return value
