"""``scdd +method=NAME``: named sets of recover/evaluate overrides (the ``method`` config group).

Each preset only overrides keys of the recover and evaluate groups, on top of their defaults (so a
preset composes with any data=/model= and with command-line overrides after it). ``best`` was chosen by
measurement on MNIST-5k with the default ConvNet (README, "Methods"): a small-scale choice, not an
ImageNet recommendation; the ImageNet presets (configs/experiment/) keep the paper's settings.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class MethodPreset:
    """Overrides of the recover and evaluate sections (key -> value, as on the command line)."""

    recover: dict[str, Any] = field(default_factory=dict)
    evaluate: dict[str, Any] = field(default_factory=dict)
    about: str = ""

    def node(self) -> dict:
        """The config node (package _global_) Hydra merges over the composed config."""
        out: dict[str, Any] = {}
        if self.recover:
            out["recover"] = dict(self.recover)
        if self.evaluate:
            out["evaluate"] = dict(self.evaluate)
        return out


METHOD_PRESETS: dict[str, MethodPreset] = {
    "sc_dd": MethodPreset(about="today's defaults: SC-DD's recover (SSL teacher) with this engine's small-scale values"),
    "sre2l": MethodPreset(evaluate={"label_teacher": "supervised"},
                          about="SRe2L: the supervised teacher gives every row's soft labels"),
    "cda": MethodPreset(recover={"crop_curriculum": 0.5},
                        about="CDA: easy-to-hard crops, the crop scale's lower bound falls from 1 over the "
                              "first half of the iterations"),
    "rded": MethodPreset(recover={"rded_crops": 8, "rded_patches": 1},
                         about="RDED-style starts: the teacher's most confident of 8 random crops of each "
                               "pool image (the unrefined real-init row is the RDED set)"),
    "best": MethodPreset(recover={"real_init_select": "herding"}, evaluate={"label_teacher": "supervised"},
                         about="chosen on MNIST-5k (README, Methods): real starts picked by herding in the "
                               "teacher's feature space, and the supervised teacher's soft labels for every row"),
}
"""The ``method`` group's options (``scdd +method=NAME``)."""
