"""The ``loader=`` config group (``LOADER_PRESETS``) as a typed dataclass, and its use by stages.

loader=torch keeps each stage's own fast paths (in-memory slicing, a DataLoader for trees), so
results do not change; loader=ffcv|dali routes SSL pretraining views, probe feature extraction and
test-set evaluation through ``engine.loaders.build_loader``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from engine.config import from_mapping
from engine.errors import ConfigError
from engine.loaders.common import BatchLoader, LoaderSpec

EVAL_BATCH = 512


@dataclass
class LoaderConfig:
    """Data loader used by the stages (squeeze pretraining + probe, evaluate's test split)."""

    name: str = "torch"
    """torch: the engine's built-in paths (in-memory slicing for built-ins, a DataLoader for trees) |
    ffcv: reads <beton_dir>/{train,val}.beton + meta.json written by
    ``python -m engine.loaders.convert_ffcv --data NAME [--root DIR] --out BETON_DIR`` |
    dali: NVIDIA DALI decodes the data's image files (or in-memory built-ins) itself."""
    num_workers: int = 2
    """ffcv: reader threads; dali: CPU threads (torch: the stages' own worker settings apply)."""
    beton_dir: Optional[str] = None
    """ffcv: folder with train.beton, val.beton, meta.json written by engine.loaders.convert_ffcv."""
    device: str = "auto"
    """dali: auto (decode on this rank's GPU when CUDA is present, else the CPU) | cpu | cuda."""

    def __post_init__(self) -> None:
        from engine.loaders import LOADERS

        if self.name not in LOADERS:
            raise ConfigError(f"unknown loader '{self.name}'; choose loader= one of {sorted(LOADERS)}")
        if self.num_workers < 0:
            raise ConfigError(f"loader.num_workers={self.num_workers} must be >= 0")
        if self.device not in ("cpu", "auto", "cuda"):
            raise ConfigError(f"loader.device={self.device!r} is not one of auto|cpu|cuda")

    @property
    def external(self) -> bool:
        """True when stages read through engine.loaders (ffcv, dali) instead of their own paths."""
        return self.name != "torch"

    def check(self, data_cfg: Any, bundle: Any = None) -> None:
        """Fail in one line, before any training, when loader=ffcv has nothing to read."""
        if self.name != "ffcv":
            return
        name = getattr(data_cfg, "name", "NAME")
        root = getattr(data_cfg, "root", None)
        size = getattr(data_cfg, "image_size", None)
        ratio = getattr(data_cfg, "eval_crop_ratio", None)
        out = self.beton_dir or "DIR"
        command = (f"python -m engine.loaders.convert_ffcv --data {name}"
                   + (f" --root {root}" if root else "") + (f" --image-size {size}" if size else "")
                   + (f" --eval-crop-ratio {ratio}" if name == "imagefolder" and ratio else "")
                   + f" --out {out}")
        if not self.beton_dir:
            raise ConfigError(f"loader=ffcv needs loader.beton_dir=DIR; write it with `{command}`")
        folder = Path(self.beton_dir).expanduser()
        for file in ("train.beton", "val.beton", "meta.json"):
            if not (folder / file).is_file():
                raise ConfigError(f"loader=ffcv: {folder / file} is missing (conversion not run or "
                                  f"unfinished); write it with `{command}`")
        meta = json.loads((folder / "meta.json").read_text())
        if name == "imagefolder" and meta.get("fixed_size", False):
            raise ConfigError(f"loader=ffcv: {folder} holds image-folder images at one fixed size (an older "
                              f"convert_ffcv); training crops need the full-resolution files: rewrite it with "
                              f"`{command}`")
        if name == "imagefolder" and ratio and abs(meta.get("eval_crop_ratio", 1.0) - ratio) > 1e-9:
            raise ConfigError(f"loader=ffcv: {folder} was written for data.eval_crop_ratio="
                              f"{meta.get('eval_crop_ratio', 1.0)} but data.eval_crop_ratio={ratio}; rewrite it "
                              f"with `{command}` or set data.eval_crop_ratio={meta.get('eval_crop_ratio', 1.0)}")
        if bundle is not None and (meta.get("num_train"), meta.get("num_val")) != (len(bundle.train),
                                                                                     len(bundle.test)):
            raise ConfigError(f"loader=ffcv: {folder} holds {meta.get('num_train')}/{meta.get('num_val')} "
                              f"train/val images but data={bundle.name} has {len(bundle.train)}/"
                              f"{len(bundle.test)}; rewrite it with `{command}`")

    def spec(self, **fields) -> LoaderSpec:
        return LoaderSpec(num_workers=self.num_workers, beton_dir=self.beton_dir, device=self.device,
                          **fields)

    def build(self, bundle, split: str, spec: LoaderSpec, rank: Optional[int] = None,
              world_size: Optional[int] = None) -> BatchLoader:
        from engine.loaders import build_loader

        return build_loader(self.name, bundle, split, spec, rank, world_size)

    def eval_loader(self, bundle, split: str, batch_size: int = EVAL_BATCH) -> BatchLoader:
        """Every image of ``split`` once, in dataset order, eval transform, normalized; one process
        (the probe and the test evaluation see the whole split on whichever rank runs them)."""
        return self.build(bundle, split, self.spec(batch_size=batch_size, transform="eval"),
                          rank=0, world_size=1)


LOADER_PRESETS: dict[str, LoaderConfig] = {
    "torch": LoaderConfig(name="torch"),
    "ffcv": LoaderConfig(name="ffcv"),
    "dali": LoaderConfig(name="dali"),
}
"""The ``loader=`` options (``scdd loader=NAME``), registered with Hydra by engine.config_store."""


def parse_loader(sections: dict[str, Any], data_cfg: Any = None, bundle: Any = None) -> LoaderConfig:
    """The loader= section of a RunContext's sections, validated (ffcv files checked when data_cfg)."""
    cfg = from_mapping(LoaderConfig, sections.get("loader") or {}, "loader")
    if data_cfg is not None:
        cfg.check(data_cfg, bundle)
    return cfg
