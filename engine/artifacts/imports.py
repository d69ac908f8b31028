"""Public checkpoints as teachers: find the ResNet backbone (and a linear head) in a released file, map its
keys onto this engine's ClassifierNet (``backbone.*`` + ``fc``), and refuse one that does not fit.

Files are read, never downloaded: ``torchvision:<arch>`` names the file torchvision's own loader would
cache (torch.hub.get_dir()/checkpoints/<file name of the weights URL>), so a machine without internet
uses what was fetched elsewhere. Every refusal is one ConfigError line naming the file and the fix.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional
from urllib.parse import urlparse

import torch
from torch import nn

from engine.artifacts.teacher import FORMAT as TEACHER_FORMAT
from engine.errors import ConfigError

log = logging.getLogger("scdd.artifacts")

TORCHVISION = "torchvision:"

UNDERSTOOD = ("MoCo v1/v2 (state_dict: module.encoder_q.*), MoCo v3 (module.base_encoder.*), DINO (torchvision "
              "keys, or teacher/student: backbone.*), SwAV (module.*; projection_head/prototypes dropped), "
              "BYOL-style (online_network.encoder.*, online_encoder.net.*, backbone.*, encoder.*), torchvision "
              "(conv1.weight ... fc.weight, with or without module.), SC-DD teacher files")
"""The layouts read, as the errors list them."""

HEADS_UNDERSTOOD = ("MoCo lincls (state_dict: module.fc.*), fc.*, DINO linear (module.linear.*, "
                    "module.linear.linear.*), SC-DD teacher files")


@dataclass(frozen=True)
class _Layout:
    family: str
    prefix: str
    dropped: tuple[str, ...] = ()
    """Keys under ``prefix`` that are pretraining heads, not part of the backbone (MoCo's fc is its MLP)."""


_LAYOUTS = (
    _Layout("MoCo v1/v2", "module.encoder_q.", ("fc.",)),
    _Layout("MoCo v1/v2", "encoder_q.", ("fc.",)),
    _Layout("MoCo v3", "module.base_encoder.", ("fc.", "head.")),
    _Layout("MoCo v3", "base_encoder.", ("fc.", "head.")),
    _Layout("BYOL-style", "module.online_network.encoder.", ("fc.",)),
    _Layout("BYOL-style", "online_network.encoder.", ("fc.",)),
    # lucidrains' byol-pytorch wraps the whole torchvision net; its fc is never trained
    _Layout("BYOL-style", "online_encoder.net.", ("fc.",)),
    _Layout("DINO / BYOL-style", "module.backbone.", ()),
    _Layout("DINO / BYOL-style", "backbone.", ()),
    _Layout("BYOL-style", "module.encoder.", ()),
    _Layout("BYOL-style", "encoder.", ()),
    _Layout("torchvision", "module.", ("projection_head.", "prototypes.")),
    _Layout("torchvision", "", ("projection_head.", "prototypes.")),
)

_WRAPPERS = ("state_dict", "model", "teacher", "online_network_state_dict", "network", "params", "module",
             "student", "target_encoder")
"""Keys released files nest their weights under, in the order tried (DINO's teacher before its student)."""

_HEAD_NAMES = ("module.fc.", "fc.", "module.linear.linear.", "module.linear.", "linear.linear.", "linear.",
               "module.head.", "head.", "classifier.")


@dataclass(frozen=True)
class Imported:
    """Weights read from ``path``: ``backbone`` keyed like ``model.backbone.state_dict()``, ``fc`` = (weight,
    bias) of a linear classifier, each None when not taken from this file."""

    source: str
    path: Path
    sha256: str
    layout: str
    backbone: Optional[dict[str, torch.Tensor]]
    fc: Optional[tuple[torch.Tensor, torch.Tensor]]

    def record(self) -> dict[str, str]:
        """What a teacher's fingerprint keeps: the file's content and how it was read (not where it lies)."""
        return {"sha256": self.sha256, "layout": self.layout}


def torchvision_file(name: str, setting: str) -> tuple[Path, str]:
    """(cache path, URL) of ``torchvision:<arch>[.<WEIGHTS>]``: torchvision's default weights of the arch
    unless a weights enum member (e.g. resnet50.IMAGENET1K_V1) is named."""
    import torchvision

    arch, _, member = name.partition(".")
    try:
        weights = torchvision.models.get_model_weights(arch)
        chosen = weights[member] if member else weights.DEFAULT
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"{setting}={TORCHVISION}{name} is not a torchvision weights name; use e.g. "
                          f"{TORCHVISION}resnet18 or {TORCHVISION}resnet50.IMAGENET1K_V1") from exc
    url = chosen.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path), url


def resolve(source: str, setting: str) -> Path:
    """The local file ``source`` names; one line saying where to put it when it is absent."""
    if source.startswith(TORCHVISION):
        path, url = torchvision_file(source[len(TORCHVISION):], setting)
        if not path.is_file():
            raise ConfigError(f"{setting}={source}: {path} is not in the local torch hub cache; on a machine with "
                              f"internet download {url} into {path.parent} (or set TORCH_HOME to a folder whose "
                              f"hub/checkpoints/ holds it); weights are never downloaded")
        return path
    path = Path(source).expanduser()
    if not path.is_file():
        raise ConfigError(f"{setting}={source}: no such file; put the checkpoint there or point {setting} at it "
                          f"(checkpoints are never downloaded)")
    return path.resolve()


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """SHA-256 of the file's bytes (remembered per path, size and mtime: validate and run both ask)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def _load(path: Path, setting: str, source: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - releases pickle argparse Namespaces etc.; the user named this file
        pass
    log.warning("%s holds Python objects besides tensors; reading it with weights_only=False (import only "
                "files you trust)", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure has the same fix
        raise ConfigError(f"{setting}={source}: {path} could not be read by torch.load ({type(exc).__name__}); "
                          f"give a PyTorch checkpoint file") from exc


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and any(isinstance(v, torch.Tensor) for v in obj.values())


def _state_dicts(obj: Any) -> Iterator[tuple[str, Mapping[str, torch.Tensor], bool]]:
    """(where, tensors, is_teacher_file) for the file itself and the dicts it nests its weights under."""
    if isinstance(obj, nn.Module):  # a whole pickled model
        obj = obj.state_dict()
    if isinstance(obj, Mapping) and obj.get("format") == TEACHER_FORMAT and _is_state_dict(obj.get("state_dict")):
        yield "SC-DD teacher", obj["state_dict"], True
        return
    if _is_state_dict(obj):
        yield "", obj, False
    if not isinstance(obj, Mapping):
        return
    for key in (*_WRAPPERS, *sorted(k for k in obj if isinstance(k, str) and k not in _WRAPPERS)):
        inner = obj.get(key)
        if _is_state_dict(inner):
            yield key, inner, False
        elif isinstance(inner, Mapping):
            for sub in _WRAPPERS:
                if _is_state_dict(inner.get(sub)):
                    yield f"{key}/{sub}", inner[sub], False


def _shape(t: torch.Tensor) -> str:
    return str(list(t.shape))


def _listed(items: list[str], limit: int = 3) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


@dataclass
class _Reading:
    where: str
    layout: _Layout
    teacher_file: bool
    mapped: dict[str, torch.Tensor]
    covered: int
    swav: bool
    """SwAV's projection head / prototypes were among the dropped keys."""

    def name(self) -> str:
        if self.teacher_file:
            return "SC-DD teacher"
        family = self.layout.family
        if family == "torchvision":
            if self.swav:
                family = "SwAV"
            elif "fc.weight" not in self.mapped:
                family = "ResNet backbone (DINO / SwAV / BYOL release)"
        keys = f"{self.layout.prefix}*" if self.layout.prefix else ""
        inside = ": ".join(part for part in (self.where, keys) if part)
        return f"{family} ({inside})" if inside else family


def _readings(obj: Any, wanted: Mapping[str, torch.Tensor]) -> Iterator[_Reading]:
    required = [k for k in wanted if not k.endswith("num_batches_tracked")]
    for where, tensors, teacher_file in _state_dicts(obj):
        layouts = (_Layout("SC-DD teacher", "backbone."),) if teacher_file else _LAYOUTS
        for layout in layouts:
            p = layout.prefix
            mapped = {k[len(p):]: v for k, v in tensors.items() if isinstance(k, str) and k.startswith(p)
                      and isinstance(v, torch.Tensor) and not k[len(p):].startswith(layout.dropped)}
            if teacher_file:
                mapped.update({k: v for k, v in tensors.items() if k.startswith("fc.")})
            swav = any(isinstance(k, str) and k.startswith((p + "projection_head.", p + "prototypes."))
                       for k in tensors)
            yield _Reading(where, layout, teacher_file, mapped, sum(k in mapped for k in required), swav)


_RESNETS = {("basic", (2, 2, 2, 2)): "resnet18", ("basic", (3, 4, 6, 3)): "resnet34",
            ("bottleneck", (3, 4, 6, 3)): "resnet50", ("bottleneck", (3, 4, 23, 3)): "resnet101",
            ("bottleneck", (3, 8, 36, 3)): "resnet152"}


def _resnet_name(keys: Any) -> Optional[str]:
    """Which torchvision ResNet the (mapped) keys describe, for the mismatch line."""
    blocks = tuple(len({k.split(".")[1] for k in keys if k.startswith(f"layer{i}.")}) for i in range(1, 5))
    kind = "bottleneck" if "layer1.0.conv3.weight" in keys else "basic"
    return _RESNETS.get((kind, blocks))


def read_backbone(source: str, model: nn.Module, setting: str, model_name: str, *,
                  classifier: bool = False) -> Imported:
    """The backbone of ``model`` (a ClassifierNet) from ``source``, and with ``classifier`` its fc too.

    The first layout whose keys name every backbone weight is taken; then every shape must agree and no
    other backbone weight may be left over (resnet50 weights name all of resnet18's keys, with other shapes).
    """
    if source.startswith(TORCHVISION):
        arch = source[len(TORCHVISION):].partition(".")[0]
        if arch != model_name:
            other = f" or use {TORCHVISION}{model_name}" if model_name in ("resnet18", "resnet50") else ""
            raise ConfigError(f"{setting}={source} holds {arch} weights but model={model_name}; set model={arch}"
                              f"{other}")
    path = resolve(source, setting)
    obj = _load(path, setting, source)
    wanted = model.backbone.state_dict()
    required = [k for k in wanted if not k.endswith("num_batches_tracked")]
    readings = list(_readings(obj, wanted))
    full = [r for r in readings if r.covered == len(required)]
    reading = full[0] if full else max(readings, key=lambda r: r.covered, default=None)
    does_not_fit = f"{setting}={source} does not fit model={model_name}"
    if reading is None or reading.covered == 0:
        keys = [str(k) for k in (obj.keys() if isinstance(obj, Mapping) else [])][:4]
        raise ConfigError(f"{does_not_fit}: no layout names its backbone weights (conv1.weight, layer1.0.*, ...; "
                          f"the file's first keys: {', '.join(keys) or type(obj).__name__}); layouts understood: "
                          f"{UNDERSTOOD}")
    problems = [f"{k} is {_shape(reading.mapped[k])} in the file but {_shape(wanted[k])} in the model"
                for k in wanted if k in reading.mapped and reading.mapped[k].shape != wanted[k].shape]
    problems += [f"{k} is missing" for k in required if k not in reading.mapped]
    problems += [f"{k} is not in the model" for k in reading.mapped
                 if k not in wanted and not k.startswith("fc.")]
    if problems:
        arch = _resnet_name(reading.mapped)
        holds = f", a {arch}" if arch and arch != model_name else ""
        raise ConfigError(f"{does_not_fit} (read as {reading.name()}{holds}): {_listed(problems)}; layouts "
                          f"understood: {UNDERSTOOD}")
    # Files saved before BatchNorm counted its batches lack num_batches_tracked; it affects nothing here.
    backbone = {k: reading.mapped.get(k, wanted[k]).detach().clone() for k in wanted}
    fc = None
    if classifier:
        fc = _classifier(reading, model, setting, source, model_name)
    return Imported(source, path, file_sha256(path), reading.name(), backbone, fc)


def _classifier(reading: _Reading, model: nn.Module, setting: str, source: str,
                model_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    weight, bias = reading.mapped.get("fc.weight"), reading.mapped.get("fc.bias")
    if weight is None or bias is None:
        raise ConfigError(f"{setting}={source} has no classifier (fc.weight, fc.bias; read as {reading.name()}); "
                          f"a backbone-only checkpoint goes in ssl.init_from (the linear probe trains its head)")
    return _fit_head(weight, bias, model, setting, source, model_name, reading.name())


def _fit_head(weight: torch.Tensor, bias: torch.Tensor, model: nn.Module, setting: str, source: str,
              model_name: str, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    classes, features = model.fc.out_features, model.fc.in_features
    if weight.dim() != 2 or weight.shape[1] != features or bias.shape != weight.shape[:1]:
        raise ConfigError(f"{setting}={source} does not fit model={model_name} (read as {layout}): its linear "
                          f"layer is {_shape(weight)} (+ bias {_shape(bias)}) but the model's features have "
                          f"{features} dimensions; layouts understood: {UNDERSTOOD}")
    if weight.shape[0] != classes:
        if setting.endswith("probe.init_from"):
            fix = "drop squeeze.probe.init_from to train the probe on the imported backbone"
        else:
            fix = (f"use the file as ssl.init_from={source} (backbone only; the probe trains a {classes}-class "
                   f"head), or run on data with {weight.shape[0]} classes")
        raise ConfigError(f"{setting}={source} has a classifier for {weight.shape[0]} classes but the data has "
                          f"{classes}; {fix}")
    return weight.detach().clone(), bias.detach().clone()


def read_head(source: str, model: nn.Module, setting: str, model_name: str) -> Imported:
    """A released linear classifier for ``model``'s features (MoCo lincls, DINO linear, plain fc files)."""
    path = resolve(source, setting)
    obj = _load(path, setting, source)
    for where, tensors, teacher_file in _state_dicts(obj):
        for name in _HEAD_NAMES:
            weight, bias = tensors.get(name + "weight"), tensors.get(name + "bias")
            if isinstance(weight, torch.Tensor) and isinstance(bias, torch.Tensor) and weight.dim() == 2:
                layout = "SC-DD teacher (fc.*)" if teacher_file else f"{where + ': ' if where else ''}{name}*"
                fc = _fit_head(weight, bias, model, setting, source, model_name, layout)
                return Imported(source, path, file_sha256(path), layout, None, fc)
    raise ConfigError(f"{setting}={source} holds no linear head (a weight + bias pair); heads understood: "
                      f"{HEADS_UNDERSTOOD}")


@torch.no_grad()
def install(model: nn.Module, *imports: Imported) -> None:
    """Copy the imported backbone and classifier into ``model`` (a ClassifierNet)."""
    for imported in imports:
        if imported.backbone is not None:
            model.backbone.load_state_dict(imported.backbone, strict=True)
        if imported.fc is not None:
            model.fc.weight.copy_(imported.fc[0])
            model.fc.bias.copy_(imported.fc[1])
