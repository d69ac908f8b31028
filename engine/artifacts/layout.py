"""The run directory, in one place: every stage asks here where an artifact lives.

    <run>/squeeze/<kind>/teacher.pt          kind: ssl | supervised
    <run>/squeeze/<kind>/state.pt            epoch checkpoint while training (removed when done)
    <run>/squeeze/<kind>/{metrics.json,metrics.csv,bn_stats.json}
    <run>/squeeze/bn_variance.png
    <run>/recover/<kind>-<init>/             a distilled set: images/<class>/ipcNNNN.png + index.json
    <run>/recover/<kind>-<init>/batches/     one record per finished class batch (resume)
    <run>/recover/ssl-real/init/             the unrefined real-init set (same format)
    <run>/external/<name>/                   a set of evaluate.external_sets, imported (same format)
    <run>/evaluate/ipc<n>/<row>/             result.json, student_state.pt, labels/ (stored relabel)
    <run>/evaluate/ipc<n>/<row>@<model>/     the same for each further evaluate.students model
    <run>/evaluate/full/full_data/           the full-data student
    <run>/cache/<split>/                     an image tree's split decoded once: images.u8, table.npy, meta.json
    <run>/report.{md,json}, accuracy_per_epoch.png, distilled_grids.png, cross_arch.png
    <run>/tensorboard/<stage>/<loop>/        event files of each training loop (logger=tensorboard)
    <run>/seed<s>/                           with seeds=[...]: one whole run per seed (this same layout);
                                             <run>/report.{md,json} then holds mean ± sd over them
    <run>/study/<variant>[/s<seed>]/         with +study=NAME: one whole run per variant (and seed, with
                                             study.seeds); <run>/report.md, study.json and the study's PNG
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

TEACHER_KINDS = ("ssl", "supervised")

SET_FOLDERS = {
    "scdd": "ssl-noise",
    "sre2l": "supervised-noise",
    "scdd_real_init": "ssl-real",
    "real_init_unrefined": "ssl-real/init",
    "sre2l_real_init": "supervised-real",
}
"""Report row key -> distilled-set folder under <run>/recover."""


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # squeeze
    def squeeze_dir(self, kind: str) -> Path:
        return self.root / "squeeze" / kind

    def teacher(self, kind: str) -> Path:
        return self.squeeze_dir(kind) / "teacher.pt"

    def squeeze_state(self, kind: str) -> Path:
        return self.squeeze_dir(kind) / "state.pt"

    def bn_stats(self, kind: str) -> Path:
        return self.squeeze_dir(kind) / "bn_stats.json"

    @property
    def bn_variance_plot(self) -> Path:
        return self.root / "squeeze" / "bn_variance.png"

    # recover
    def recover_set(self, teacher_kind: str, init: str) -> Path:
        return self.root / "recover" / f"{teacher_kind}-{init}"

    def set_for_row(self, key: str) -> Path:
        return self.root / "recover" / SET_FOLDERS[key]

    def external_set(self, name: str) -> Path:
        return self.root / "external" / name

    # evaluate
    def evaluate_row(self, ipc: Optional[int], key: str, student: Optional[str] = None) -> Path:
        """A student row's folder; ``student``: a further evaluate.students model (the first, the headline,
        keeps the row's own folder, so a run made before the key existed resumes)."""
        return self.root / "evaluate" / (f"ipc{ipc}" if ipc else "full") / (f"{key}@{student}" if student else key)

    # metrics
    def tensorboard(self, stage: str, *loop: str) -> Path:
        """Event files of one training loop: squeeze/ssl, squeeze/probe, evaluate/ipc10/scdd, ..."""
        return self.root.joinpath("tensorboard", stage, *loop)

    # data
    def decode_cache(self, split: str) -> Path:
        """Folder of a split's decode cache (engine.data.decode_cache), split: train | test."""
        return self.root / "cache" / split

    # seeds
    def seed_run(self, seed: int) -> Path:
        """The run dir of seed ``seed`` of a seeds=[...] pipeline run (a run dir of its own)."""
        return self.root / f"seed{seed}"

    # studies
    def study_variant(self, name: str, seed: int | None = None) -> Path:
        """The run dir of one variant of a +study= run (of one of its seeds when study.seeds is set)."""
        folder = self.root / "study" / name
        return folder if seed is None else folder / f"s{seed}"

    @property
    def study_json(self) -> Path:
        return self.root / "study.json"

    def study_plot(self, name: str) -> Path:
        """A study's figure, ``name`` a file name such as cross_arch.png."""
        return self.root / name

    # report
    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def accuracy_plot(self) -> Path:
        return self.root / "accuracy_per_epoch.png"

    @property
    def grids_plot(self) -> Path:
        return self.root / "distilled_grids.png"

    @property
    def cross_arch_plot(self) -> Path:
        return self.root / "cross_arch.png"
