"""`scdd stage=evaluate` and `stage=relabel`: students on each distilled set and the baselines.

Rows, for each ipc: every distilled set under <run_dir>/recover/ (keyed by report name), every set of
evaluate.external_sets (another engine's release, imported into <run_dir>/external/; keyed by its name), a
random real subset with the same images per class; plus (once) a student on the full training split.
Every row uses the same student recipe and the same soft-label teacher, so rows differ only in
their training images; evaluate.students trains one student per listed model on each row.
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from engine.artifacts import soft_labels, student as student_artifacts
from engine.artifacts.distilled import (Codec, DistilledSet, is_complete, real_subset_dataset,
                                        real_subset_indices, real_subset_record)
from engine.artifacts.fingerprint import StaleArtifact, announce_overwrite, digest
from engine.artifacts.layout import SET_FOLDERS, RunLayout
from engine.artifacts.reference_layout import import_set, scan_set
from engine.artifacts.teacher import data_facts, load_teacher, teacher_digest
from engine.config import from_mapping
from engine.context import RunContext
from engine.data import DataBundle
from engine.data.decode_cache import eval_images
from engine.data.views import CropSpec
from engine.distributed import TaskShare, barrier, task_share
from engine.errors import ConfigError
from engine.evaluate.relabel import precompute_soft_labels
from engine.evaluate.report import write_report
from engine.evaluate.settings import EvaluateConfig
from engine.io import save_json
from engine.evaluate.student import StudentJob, StudentRecipe, StudentResult, check_cuda_graphs, train_students
from engine.training.tb_logger import open_logger, parse_logger
from engine.loaders.settings import LoaderConfig, parse_loader
from engine.models import ModelConfig, build_model


def set_codec(sets: dict[str, Path]) -> Codec:
    """The codec the distilled sets were stored with (PNG when there are none or they differ)."""
    codecs = {(index.get("image_format", "png"), index.get("jpeg_quality", 95))
              for index in (DistilledSet.open(path).index for path in sets.values())}
    return Codec(*codecs.pop()) if len(codecs) == 1 else Codec()


@dataclass
class TrainingSet:
    """A row's training images and the digest that names them in the row's fingerprint."""

    dataset: Dataset
    digest: str


def distilled_training_set(folder: Path, bundle: DataBundle, ipc: int, cfg: EvaluateConfig) -> TrainingSet:
    distilled = DistilledSet.open(folder)
    if distilled.num_classes != bundle.num_classes:
        raise ConfigError(f"distilled set {folder} has {distilled.num_classes} classes but the data has "
                          f"{bundle.num_classes}; evaluate it with the data config it was made from")
    return TrainingSet(distilled.dataset(ipc, cfg.cache_mb * 2**20), f"{distilled.digest}/ipc{ipc}")


def real_crops(cfg: EvaluateConfig, bundle: DataBundle, seed: int) -> Optional[CropSpec]:
    """How students crop real images of an image-folder tree: random resized crops of the full files
    in the dataset (the recipe's crop scale; flips and CutMix stay with the student), seeded by the
    row's seed. None for in-memory data (the student crops its image_size images), for stored
    relabeling, which replays crop boxes in image_size images (its real rows read the eval-size
    images), and for a student crop other than random-resized (CIFAR's pad-and-crop windows)."""
    if not hasattr(bundle.train, "crop_views") or (cfg.loss == "kl" and cfg.relabel == "stored"):
        return None
    if cfg.crop != "rrc":
        return None
    return CropSpec(size=bundle.image_size, scale=tuple(make_recipe(cfg, bundle).crop_scale), seed=seed)


def random_real_subset(bundle: DataBundle, ipc: int, seed: int, cfg: Optional[EvaluateConfig] = None,
                       record: Optional[Path] = None, codec: Codec = Codec()) -> TrainingSet:
    """``ipc`` random real training images per class, served through the distilled sets' codec (an
    image-folder tree: crops of the full-resolution files, see ``real_crops``).

    ``record``: where the index list is written (the row folder's real_subset.json)."""
    cfg = cfg or EvaluateConfig()
    train_labels = bundle.labels("train")
    indices = real_subset_indices(train_labels, bundle.num_classes, ipc, seed)
    labels = [train_labels[i] for i in indices]
    crops = real_crops(cfg, bundle, seed)
    fingerprint = {"data": data_facts(bundle), "ipc": ipc, "seed": seed, "codec": dataclasses.asdict(codec)}
    if crops is not None:
        fingerprint["crops"] = dataclasses.asdict(crops)
    subset = real_subset_record(indices, labels, fingerprint)
    if record is not None:
        save_json(subset, record)
    dataset = real_subset_dataset(bundle.train, indices, labels, codec, bundle.channels, bundle.image_size,
                                  cfg.cache_mb * 2**20, crops)
    return TrainingSet(dataset, subset["digest"])


def full_training_set(cfg: EvaluateConfig, bundle: DataBundle, seed: int) -> TrainingSet:
    """The whole training split (streamed): an image-folder tree as full-resolution crops (``real_crops``)."""
    crops = real_crops(cfg, bundle, seed)
    facts = {"data": data_facts(bundle), "split": "train"}
    if crops is None:
        return TrainingSet(bundle.train, digest(facts))
    return TrainingSet(bundle.train.crop_views(crops), digest({**facts, "crops": dataclasses.asdict(crops)}))


def test_split(bundle: DataBundle, cfg: EvaluateConfig, loader: Optional[LoaderConfig] = None) -> Dataset:
    """The test split as every row's test passes read it: an image tree's eval-transform images decoded
    once (from its decode cache when it has one) into memory when they fit evaluate.cache_mb, instead of
    decoding the split at every test pass of every row; the bundle's split as it is otherwise."""
    if loader is not None and loader.external:
        return bundle.test  # loader=ffcv|dali read the split themselves
    return eval_images(bundle.test, cfg.cache_mb * 2**20, cfg.workers)


def build_eval_config(ctx: RunContext, **overrides) -> EvaluateConfig:
    section = dict(ctx.sections.get("evaluate") or {})
    section.update(overrides)
    return from_mapping(EvaluateConfig, section, "evaluate")


def make_recipe(cfg: EvaluateConfig, bundle: DataBundle, epochs: Optional[int] = None) -> StudentRecipe:
    scale = tuple(cfg.crop_scale) if cfg.crop_scale else ((0.08, 1.0) if bundle.image_size >= 64 else (0.5, 1.0))
    flip = cfg.flip if cfg.flip is not None else bundle.channels == 3
    return StudentRecipe(epochs=epochs or cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                         weight_decay=cfg.weight_decay, temperature=cfg.temperature, loss=cfg.loss,
                         crop_scale=scale, flip=flip, cutmix_prob=cfg.cutmix_prob,
                         cutmix_alpha=cfg.cutmix_alpha, eval_every=cfg.eval_every, workers=cfg.workers,
                         crop=cfg.crop, crop_padding=cfg.crop_padding, mix=cfg.mix, mixup_alpha=cfg.mixup_alpha,
                         optimizer=cfg.optimizer, momentum=cfg.momentum, decay_norm_and_bias=cfg.decay_norm_and_bias,
                         warmup_epochs=min(cfg.warmup_epochs, (epochs or cfg.epochs) - 1), lr_floor=cfg.lr_floor,
                         lr_per=cfg.lr_per, temperature_squared=cfg.temperature_squared,
                         precision=cfg.precision, channels_last=cfg.channels_last, compile=cfg.compile)


def student_model_config(cfg: EvaluateConfig, teacher_cfg: ModelConfig) -> ModelConfig:
    return teacher_cfg if cfg.student is None else ModelConfig(name=cfg.student)


@dataclass(frozen=True)
class Student:
    """One model every row trains a student of."""

    model: ModelConfig
    folder: Optional[str] = None
    """Suffix of its row folders (<row>@<folder>); None: the row's own folder (the headline)."""


def student_lineup(cfg: EvaluateConfig, teacher_cfg: ModelConfig) -> list[Student]:
    """evaluate.students in order, the first the headline (each a registry preset, as evaluate.student takes
    a name); without it the one student of ``student_model_config``."""
    if cfg.students is None:
        return [Student(student_model_config(cfg, teacher_cfg))]
    return [Student(ModelConfig(name=name), None if i == 0 else name) for i, name in enumerate(cfg.students)]


STUDENT_KEYS = ("top1", "best_top1", "top5", "seconds")
"""What row["students"][model] keeps of each model's result."""


def with_students(rows: dict[str, dict]) -> dict:
    """The headline (first) model's row, with every model's results under "students"."""
    headline = dict(next(iter(rows.values())))
    headline["students"] = {name: {k: row.get(k) for k in STUDENT_KEYS} for name, row in rows.items()}
    return headline


def mean_over_seeds(seeds: list[dict]) -> dict:
    """The random-real row: seed 0's, with top-1 and best top-1 the mean over the seeds (top1_std their
    spread), seconds their sum; per model as well when the rows have "students"."""
    row = dict(seeds[0])
    row["top1"] = float(np.mean([s["top1"] for s in seeds]))
    row["top1_std"] = float(np.std([s["top1"] for s in seeds]))
    bests = [s.get("best_top1") for s in seeds]
    row["best_top1"] = None if None in bests else float(np.mean(bests))
    row["seconds"] = float(sum(s["seconds"] for s in seeds))
    if "students" in row:
        row["students"] = {name: mean_over_seeds([s["students"][name] for s in seeds]) for name in row["students"]}
    return row


def student_seconds(row: dict) -> float:
    """Training seconds of a row: every model's when it has "students"."""
    return float(sum(s["seconds"] for s in row["students"].values()) if "students" in row else row.get("seconds", 0.0))


@dataclass
class Evaluator:
    """Trains one student per row and model (``student_lineup``) with a fixed recipe, teacher and seed; caches
    results on disk."""

    ctx: RunContext
    cfg: EvaluateConfig
    teacher: Optional[torch.nn.Module]
    loader: Optional[LoaderConfig] = None
    """loader=ffcv|dali: the test split is read through it (loader=torch: in-process batches)."""

    teacher_digest: Optional[str] = None
    share: TaskShare = TaskShare()
    """A job-array task trains only rows k, k+count, ... of the fixed row order (returns None for the others)."""
    gather: bool = False
    """Merge: train nothing; every row's result must exist with its fingerprint, else one line names the task."""
    gather_count: int = 1
    """The array's task count, to name the task that owns a missing row when gathering."""
    position: int = 0
    """Students enumerated so far (ipc ascending; distilled sets, random real seeds; full data last; each row's
    models in lineup order): a job-array task, a row process and merge all count the same positions."""
    test_set: Optional[Dataset] = None
    """The test split every row is tested on (``test_split``); None: the bundle's."""
    assigned: Optional[frozenset] = None
    """Row processes (``row_processes``): the row positions this process trains; None: all (or the share's)."""
    plan: Optional[list] = None
    """Planning: train nothing, append (position, estimated cost) of every row still to train."""
    quiet: bool = False
    """No progress bar; one line per finished row (row processes share the terminal)."""

    def row_fingerprint(self, recipe: StudentRecipe, student_cfg: ModelConfig, seed: int,
                        train: TrainingSet) -> dict:
        stored = ({"topk": self.cfg.stored_topk, "dtype": self.cfg.stored_dtype, "format": soft_labels.FORMAT}
                  if recipe.loss == "kl" and self.cfg.relabel == "stored" else None)
        return {"recipe": dataclasses.asdict(recipe), "student": dataclasses.asdict(student_cfg), "seed": seed,
                "train_set": train.digest, "label_teacher": self.teacher_digest if recipe.loss == "kl" else None,
                "relabel": self.cfg.relabel if recipe.loss == "kl" else None, "stored": stored}

    def labels_folder(self, ipc: Optional[int], key: str, student: Student) -> Path:
        """Where a row's stored soft labels live. Every model of the lineup sees the same crops labelled by the
        same teacher on a row (one recipe, seed and set), so a process that trains all of a row's models
        labels once, in the headline's folder, and the others replay those files (their fingerprint is the
        same). A job-array task or a row process, which may train some of a row's models beside another
        process training the rest, keeps each model's own folder."""
        layout = RunLayout(self.ctx.run_dir)
        if student.folder is None or self.share.is_array or self.assigned is not None:
            return layout.evaluate_row(ipc, key, student.folder) / "labels"
        return layout.evaluate_row(ipc, key) / "labels"

    def run_row(self, key: str, ipc: Optional[int], train: TrainingSet, epochs: Optional[int] = None,
                seed_offset: int = 0) -> Optional[dict]:
        """The row's student of each lineup model, one position each; the headline's result, with every
        model's under "students" when evaluate.students is set. None while any is another task's or process's.

        The models this process trains on the row train in lockstep on one batch stream, so each batch is
        augmented and labelled by the teacher once (``train_students``); with DDP ranks, one after another."""
        prepared = [self._prepare(key, ipc, train, student, epochs, seed_offset)
                    for student in student_lineup(self.cfg, self.ctx.model_cfg)]
        pending = [p for p in prepared if isinstance(p, _Pending)]
        groups = [pending] if self.ctx.dist.world_size == 1 else [[p] for p in pending]
        for group in groups:
            if group:
                self._train(group, train)
        rows = [p.row if isinstance(p, _Pending) else p for p in prepared]
        if any(row is None for row in rows):
            return None
        if self.cfg.students is None:
            return rows[0]
        return with_students(dict(zip(self.cfg.students, rows)))

    def _prepare(self, key: str, ipc: Optional[int], train: TrainingSet, student: Student,
                 epochs: Optional[int] = None, seed_offset: int = 0) -> "Optional[dict] | _Pending":
        """A (row, model) position: its result when done (or merged), None when another task's or process's
        (or when planning), else the ``_Pending`` student to train (stored labels made, old results cleared)."""
        ctx, bundle = self.ctx, self.ctx.data
        if self.test_set is not None:  # the test split as decoded once for every row (test_split)
            bundle = dataclasses.replace(bundle, test=self.test_set)
        folder = RunLayout(ctx.run_dir).evaluate_row(ipc, key + (f"_s{seed_offset}" if seed_offset else ""),
                                                     student.folder)
        label = key + (f"@{student.folder}" if student.folder else "")
        recipe = make_recipe(self.cfg, bundle, epochs)
        seed = ctx.run.seed + seed_offset
        student_cfg = student.model
        fingerprint = self.row_fingerprint(recipe, student_cfg, seed, train)
        result_file, state_file = folder / student_artifacts.RESULT_FILE, folder / student_artifacts.STATE_FILE
        position, self.position = self.position, self.position + 1
        if self.gather:
            owner = (f"job-array task {position % self.gather_count} of {self.gather_count} should have made it; "
                     f"rerun that task with resume=true, then merge again")
            try:
                done = student_artifacts.load_result(result_file, fingerprint)
            except StaleArtifact as exc:
                raise ConfigError(f"merge: evaluate row {label} ipc={ipc}: {exc}; {owner}") from None
            if done is None:
                raise ConfigError(f"merge: evaluate row {label} ipc={ipc} has no result ({result_file}); {owner}")
            return done
        if self.share.is_array and position % self.share.count != self.share.index:
            return None  # another task's row
        if self.assigned is not None and position not in self.assigned:
            return None  # another row process's row
        if self.plan is not None:
            done = ctx.run.resume and student_artifacts.load_result(result_file, fingerprint) is not None
            passes = recipe.epochs // recipe.eval_every + 1
            # ~4 image-forwards per trained image (teacher, student forward and backward), 1 per tested one
            self.plan.append((position, 0 if done else 4 * len(train.dataset) * recipe.epochs
                              + passes * len(bundle.test)))
            return None
        if ctx.run.resume:
            done = student_artifacts.load_result(result_file, fingerprint)
            if done is not None:
                return done
        elif ctx.dist.is_main and (result_file.is_file() or state_file.is_file()):
            announce_overwrite(folder, f"student row {label}")
            result_file.unlink(missing_ok=True)
            state_file.unlink(missing_ok=True)
        barrier()
        stored = storage = None
        if recipe.loss == "kl" and self.cfg.relabel == "stored":
            stored = self.labels_folder(ipc, key + (f"_s{seed_offset}" if seed_offset else ""), student)
            for turn in ("main", "others"):  # rank 0 writes the labels; the others then find them done
                if ctx.dist.is_main == (turn == "main"):
                    storage = precompute_soft_labels(
                        self.teacher, train.dataset, bundle.normalize, recipe, ctx.dist.device, seed, stored,
                        self.cfg.stored_topk, self.cfg.stored_dtype,
                        fingerprint={"train_set": train.digest, "teacher": self.teacher_digest},
                        resume=ctx.run.resume, progress=ctx.run.progress and ctx.dist.is_main)
                barrier()
        torch.manual_seed(seed)
        model = build_model(student_cfg, bundle.num_classes, bundle.channels, bundle.image_size)
        return _Pending(label=label, ipc=ipc, bundle=bundle, recipe=recipe, seed=seed, fingerprint=fingerprint,
                        folder=folder, model=model, stored=stored, storage=storage)

    def _train(self, pending: list["_Pending"], train: TrainingSet) -> None:
        """Train ``pending`` (one row's students: one set, recipe and seed) together; write each result."""
        ctx, lead = self.ctx, pending[0]
        test_loader = None
        if self.loader is not None and self.loader.external:
            test_loader = self.loader.eval_loader(lead.bundle, "test", batch_size=500)
        loggers = [open_logger(parse_logger(ctx.sections), RunLayout(ctx.run_dir).tensorboard(
            "evaluate", p.folder.parent.name, p.folder.name), ctx.dist.is_main) for p in pending]
        jobs = [StudentJob(p.model, p.folder / student_artifacts.STATE_FILE, p.fingerprint, logger)
                for p, logger in zip(pending, loggers)]
        label = " + ".join(p.label for p in pending)
        results = train_students(jobs, train.dataset, lead.bundle.test, lead.bundle.normalize, lead.recipe,
                                 ctx.dist.device, lead.seed, teacher=self.teacher if lead.stored is None else None,
                                 stored_labels=lead.stored, progress=ctx.run.progress and not self.quiet,
                                 desc=f"{label} ipc={lead.ipc}" if lead.ipc else label, dist=ctx.dist,
                                 test_loader=test_loader, cuda_graphs=self.cfg.cuda_graphs)
        for p, logger, result in zip(pending, loggers, results):
            logger.close()
            p.row = self._finish(p, result, len(train.dataset))

    def _finish(self, p: "_Pending", result: StudentResult, images: int) -> dict:
        """Write a trained student's result (rank 0) and return its row."""
        ctx = self.ctx
        row = {"top1": result.top1, "best_top1": result.best_top1, "top5": result.top5,
               "images": images, "epochs": p.recipe.epochs, "seconds": result.seconds,
               "images_per_s": result.images_per_s, "history": result.history}
        if self.share.is_array:
            row["task"] = {"index": self.share.index, "count": self.share.count}
        if p.storage is not None:
            row["stored_labels_bytes_per_image_epoch"] = p.storage["bytes_per_image_epoch"]
        if ctx.dist.is_main:
            student_artifacts.save_result(p.folder / student_artifacts.RESULT_FILE, row, p.fingerprint)
            (p.folder / student_artifacts.STATE_FILE).unlink(missing_ok=True)
        if self.quiet:
            print(f"evaluate: {p.label}{f' ipc={p.ipc}' if p.ipc else ''} top-1 {row['top1']:.4f} "
                  f"({row['seconds']:.0f} s)", flush=True)
        barrier()
        return row


@dataclass
class _Pending:
    """A (row, model) student this process is to train, as ``Evaluator._prepare`` set it up."""

    label: str
    ipc: Optional[int]
    bundle: DataBundle
    """The data, with the test split every row is tested on."""
    recipe: StudentRecipe
    seed: int
    fingerprint: dict
    folder: Path
    model: torch.nn.Module
    stored: Optional[Path]
    """Its stored soft labels (relabel=stored), else None: online labels."""
    storage: Optional[dict]
    row: Optional[dict] = None
    """The result row, once trained."""


def label_teacher(ctx: RunContext, cfg: EvaluateConfig):
    """The soft-label teacher: teacher=PATH when given, else this run's squeeze teacher."""
    path = Path(ctx.run.teacher) if ctx.run.teacher else RunLayout(ctx.run_dir).teacher(cfg.label_teacher)
    model, payload = load_teacher(path, ctx.model_cfg, ctx.data)
    return model, payload


def available_sets(run_dir: Path) -> dict[str, Path]:
    """Report row key -> folder of every complete distilled set in this run dir."""
    layout = RunLayout(run_dir)
    return {key: layout.set_for_row(key) for key in SET_FOLDERS if is_complete(layout.set_for_row(key))}


def external_sets(ctx: RunContext, cfg: EvaluateConfig) -> dict[str, Path]:
    """Report row key -> imported folder of every evaluate.external_sets entry (rank 0 imports, or reuses
    an import of the same files under resume=true; the others wait)."""
    layout, bundle = RunLayout(ctx.run_dir), ctx.data
    if ctx.dist.is_main:
        for name, source in (cfg.external_sets or {}).items():
            import_set(Path(source), layout.external_set(name), what=f"evaluate.external_sets.{name}",
                       class_names=list(bundle.class_names) or [str(c) for c in range(bundle.num_classes)],
                       channels=bundle.channels, image_size=bundle.image_size, ipc=max(ctx.run.ipc),
                       resume=ctx.run.resume)
    barrier()
    return {name: layout.external_set(name) for name in cfg.external_sets or {}}


def _check_external_sets(ctx: RunContext, cfg: EvaluateConfig) -> None:
    bundle = ctx.data
    for name, source in (cfg.external_sets or {}).items():
        scan_set(Path(source), f"evaluate.external_sets.{name}", bundle.num_classes, bundle.image_size,
                 max(ctx.run.ipc))


def evaluate_rows(ctx: RunContext, cfg: EvaluateConfig, sets: dict[str, Path],
                  loader: Optional[LoaderConfig] = None, share: TaskShare = TaskShare(),
                  gather_count: Optional[int] = None) -> dict:
    """Train every row's student; returns the nested result dict the report is built from.

    ``share`` (a job-array task): train only this task's rows; the result then lacks the others'.
    ``gather_count`` (merge): train nothing, read every row's result (made by that many tasks)."""
    bundle = ctx.data
    loader = loader or parse_loader(ctx.sections, ctx.data_cfg, bundle)
    teacher = source = None
    if cfg.loss == "kl":
        teacher, payload = label_teacher(ctx, cfg)
        teacher = teacher.to(ctx.dist.device).eval()
        source = teacher_digest(payload)
    test_set = None if gather_count is not None else test_split(bundle, cfg, loader)

    def evaluator(**fields) -> Evaluator:
        return Evaluator(ctx, cfg, teacher, loader, source, share=share, gather=gather_count is not None,
                         gather_count=gather_count or 1, test_set=test_set, **fields)

    imported = external_sets(ctx, cfg)
    if (ctx.dist.is_main and hasattr(bundle.train, "crop_views") and cfg.loss == "kl" and cfg.relabel == "stored"
            and (cfg.random_real_seeds or cfg.full_data)):
        print("evaluate: relabel=stored replays crop boxes of image_size images, so the real-image rows train on "
              "the eval-size images (Resize + CenterCrop), not on crops of the full-resolution files as "
              "relabel=online does")
    processes = row_processes(ctx, cfg, share, gather_count)
    if processes > 1:
        plan = evaluator(plan=[])
        _rows(plan, ctx, cfg, sets, imported)
        groups = balance(plan.plan, processes)
        if len([g for g in groups if g]) > 1:
            _train_in_processes(groups, lambda group: _rows(evaluator(assigned=frozenset(group), quiet=True),
                                                            ctx, cfg, sets, imported))
            return _rows(Evaluator(ctx, cfg, teacher, loader, source, gather=True, gather_count=processes),
                         ctx, cfg, sets, imported)
    return _rows(evaluator(), ctx, cfg, sets, imported)


def row_processes(ctx: RunContext, cfg: EvaluateConfig, share: TaskShare, gather_count: Optional[int]) -> int:
    """How many processes train rows side by side: evaluate.row_processes, by default (None) one per
    intra-op thread on a one-process CPU run, each then running one thread (a student step on 10-100
    small images keeps one core busy far better than two threads share it, and one-thread rows repeat
    a OMP_NUM_THREADS=1 run bit for bit). 1 on a GPU, with DDP ranks, in a job-array task and in merge."""
    if gather_count is not None or share.is_array or ctx.dist.world_size > 1 or ctx.dist.device.type != "cpu":
        return 1
    return cfg.row_processes if cfg.row_processes is not None else max(1, torch.get_num_threads())


def balance(costs: Sequence[tuple[int, int]], processes: int) -> list[list[int]]:
    """Row positions split into ``processes`` groups of near-equal estimated cost (largest row first, each
    to the least loaded group)."""
    groups: list[list[int]] = [[] for _ in range(processes)]
    load = [0] * processes
    for position, cost in sorted(costs, key=lambda pc: (-pc[1], pc[0])):
        k = load.index(min(load))
        groups[k].append(position)
        load[k] += cost
    return groups


_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """Have Linux SIGKILL this forked row process when ``parent`` dies: a run that is SIGKILLed (kill -9, the
    OOM killer) must not leave its rows training into the run directory that a resumed run trains into."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):  # no libc prctl: the check below still catches a parent already gone
            pass
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _train_in_processes(groups: list[list[int]], train) -> None:
    """``train(group)`` in one forked process per non-empty group, one intra-op thread each; a failure
    or a preemption of any is raised here once all have stopped. A stop request to this process (a signal
    sent to it alone, as a launcher forwards SLURM's) is passed on to the row processes, which stop after
    their epoch in flight as this process would; they die with it if it is killed."""
    import multiprocessing
    from multiprocessing.connection import wait

    from engine import preemption

    parent = os.getpid()

    def child(group: list[int]) -> None:
        _die_with_parent(parent)
        preemption.install()  # a forwarded request sets this process's flag, whatever the parent installed
        torch.set_num_threads(1)
        try:
            train(group)
        except preemption.Preempted as exc:
            print(f"scdd: {exc}", flush=True)
            raise SystemExit(preemption.REQUEUE_EXIT)

    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=child, args=(group,)) for group in groups if group]
    for worker in workers:
        worker.start()
    forwarded = False
    while running := [worker.sentinel for worker in workers if worker.is_alive()]:
        wait(running, timeout=0.2)
        if preemption.requested() and not forwarded:
            for worker in workers:
                if worker.is_alive():
                    os.kill(worker.pid, signal.SIGUSR1)
            forwarded = True
    for worker in workers:
        worker.join()
    codes = [worker.exitcode for worker in workers]
    if preemption.REQUEUE_EXIT in codes:
        raise preemption.Preempted("a stop was requested; finished rows are on disk (resume=true goes on)")
    if any(code != 0 for code in codes):
        raise RuntimeError(f"evaluate: a row process failed (exit codes {codes}); its error is printed above")


def _rows(evaluator: Evaluator, ctx: RunContext, cfg: EvaluateConfig, sets: dict[str, Path],
          imported: dict[str, Path]) -> dict:
    """Every row in the fixed order through ``evaluator``; the nested result dict."""
    bundle = ctx.data
    results: dict = {"ipc": {}}
    for ipc in sorted(set(ctx.run.ipc)):
        rows = {}
        for key, path in {**sets, **imported}.items():
            rows[key] = evaluator.run_row(key, ipc, distilled_training_set(path, bundle, ipc, cfg))
        seeds = []
        for s in range(cfg.random_real_seeds):
            record = RunLayout(ctx.run_dir).evaluate_row(ipc, "random_real" + (f"_s{s}" if s else "")) / "real_subset.json"
            subset = random_real_subset(bundle, ipc, ctx.run.seed + s, cfg,
                                        record=record if ctx.dist.is_main else None, codec=set_codec(sets))
            seeds.append(evaluator.run_row("random_real", ipc, subset, seed_offset=s))
        rows = {k: v for k, v in rows.items() if v is not None}
        results["ipc"][str(ipc)] = rows
        if any(s is None for s in seeds):
            continue
        rows["random_real"] = mean_over_seeds(seeds)
    if cfg.full_data:
        full = full_training_set(cfg, bundle, ctx.run.seed)
        row = evaluator.run_row("full_data", None, full, epochs=cfg.full_data_epochs)
        if row is not None:
            results["full_data"] = row
    return results


def _check_label_teacher(ctx: RunContext, cfg: EvaluateConfig, teachers_from_squeeze: Optional[Sequence[str]]) -> None:
    """The soft-label teacher exists, is a teacher checkpoint and fits model= and data= (or an earlier stage
    of this run, listed in ``teachers_from_squeeze``, will write it)."""
    if not ctx.run.teacher and teachers_from_squeeze is not None:
        if cfg.label_teacher in teachers_from_squeeze:
            return
        if not RunLayout(ctx.run_dir).teacher(cfg.label_teacher).is_file():
            raise ConfigError(f"evaluate.label_teacher={cfg.label_teacher} is not among squeeze.teachers="
                              f"{list(teachers_from_squeeze)}; add it there or pick one of them")
    label_teacher(ctx, cfg)


def _check_sets(ctx: RunContext, sets: dict[str, Path], missing: str) -> None:
    """There are distilled sets, each complete, made for this data and for at least the largest ipc asked."""
    if not sets:
        raise ConfigError(f"no distilled set under {ctx.run_dir / 'recover'}; {missing}")
    bundle, ipc = ctx.data, max(ctx.run.ipc)
    for folder in sets.values():
        index = DistilledSet.open(folder).index
        for key in ("num_classes", "channels", "image_size"):
            if index.get(key) != getattr(bundle, key):
                raise ConfigError(f"distilled set {folder} has {key}={index.get(key)} but the data has "
                                  f"{getattr(bundle, key)}; evaluate it with the data config it was made from")
        if index.get("ipc", 0) < ipc:
            raise ConfigError(f"distilled set {folder} holds {index.get('ipc')} images per class but ipc={ipc} "
                              f"is asked; recover it again with ipc={ipc} (resume=false) or lower ipc")


def validate(ctx: RunContext, *, teachers_from_squeeze: Optional[Sequence[str]] = None, **overrides) -> None:
    """Every check evaluate makes before training students, without training: its settings and the loader,
    ipc against the smallest training class (the random-real baseline), each student model against the data,
    the soft-label teacher, and the distilled sets it will read. ``teachers_from_squeeze`` (the pipeline):
    the teacher kinds squeeze will write; the sets are then recover's, made after this check."""
    cfg = build_eval_config(ctx, **overrides)
    bundle = ctx.data
    parse_loader(ctx.sections, ctx.data_cfg, bundle)
    ctx.require_ipc_fits(max(ctx.run.ipc), "the random-real baseline")
    if cfg.cuda_graphs:
        check_cuda_graphs(ctx.dist.device, ctx.dist.world_size)
    for student in student_lineup(cfg, ctx.model_cfg):
        build_model(student.model, bundle.num_classes, bundle.channels, bundle.image_size)
    if cfg.loss == "kl":
        _check_label_teacher(ctx, cfg, teachers_from_squeeze)
    _check_external_sets(ctx, cfg)
    if teachers_from_squeeze is None and (available_sets(ctx.run_dir) or not cfg.external_sets):
        _check_sets(ctx, available_sets(ctx.run_dir), "run `scdd stage=recover` in this run dir first "
                                                      "(hydra.run.dir=...), or evaluate another engine's set "
                                                      "with evaluate.external_sets={name:/path}")


def validate_relabel(ctx: RunContext) -> None:
    """Every check relabel makes before labelling: settings, the label teacher, the distilled sets."""
    cfg = build_eval_config(ctx, relabel="stored")
    _check_label_teacher(ctx, cfg, None)
    _check_sets(ctx, available_sets(ctx.run_dir), "run `scdd stage=recover` first")


def run(ctx: RunContext, **overrides) -> dict:
    cfg = build_eval_config(ctx, **overrides)
    loader = parse_loader(ctx.sections, ctx.data_cfg, ctx.data)
    sets = available_sets(ctx.run_dir)
    if not sets and not cfg.external_sets:
        raise ConfigError(f"no distilled set under {ctx.run_dir / 'recover'}; run `scdd stage=recover` in this "
                          f"run dir first (hydra.run.dir=...)")
    start = time.time()
    share = task_share()
    results = evaluate_rows(ctx, cfg, sets, loader, share=share)
    results["seconds"] = {"evaluate": time.time() - start}
    if share.is_array:  # a share of the rows: the report waits for `scdd stage=merge`
        if ctx.dist.is_main:
            print(f"evaluate task {share.index} of {share.count}: trained its rows; when every task is done, "
                  f"run `scdd stage=merge` with the same settings to gather them into the report")
        return results
    if ctx.dist.is_main:
        write_report(ctx, results)
    return results


def gather(ctx: RunContext, task_count: Optional[int] = None) -> dict:
    """`scdd stage=merge` for evaluate: every row's result, made by the job-array tasks, checked against its
    fingerprint (a missing or mismatched row is refused with one line naming the task); then the report."""
    cfg = build_eval_config(ctx)
    sets = available_sets(ctx.run_dir)
    if task_count is None:
        counts = {json.loads(f.read_text()).get("task", {}).get("count", 1)
                  for f in (ctx.run_dir / "evaluate").rglob(student_artifacts.RESULT_FILE)}
        task_count = max(counts, default=1)
    results = evaluate_rows(ctx, cfg, sets, share=TaskShare(), gather_count=task_count)
    results["seconds"] = {"evaluate": float(sum(student_seconds(row) for rows in results["ipc"].values()
                                                for row in rows.values()))}
    if ctx.dist.is_main:
        write_report(ctx, results)
    return results


def run_relabel(ctx: RunContext) -> dict:
    """Precompute stored soft labels for every distilled set and ipc of this run dir."""
    cfg = build_eval_config(ctx, relabel="stored")
    sets = available_sets(ctx.run_dir)
    if not sets:
        raise ConfigError(f"no distilled set under {ctx.run_dir / 'recover'}; run `scdd stage=recover` first")
    teacher, payload = label_teacher(ctx, cfg)
    source = teacher_digest(payload)
    out = {}
    items = [(ipc, key, path) for ipc in sorted(set(ctx.run.ipc)) for key, path in sets.items()]
    # Each label folder is written by one rank (items r, r+W, ...); the others wait at the barrier.
    for ipc, key, path in items[ctx.dist.rank::ctx.dist.world_size]:
        train = distilled_training_set(path, ctx.data, ipc, cfg)
        recipe = make_recipe(cfg, ctx.data)
        folder = RunLayout(ctx.run_dir).evaluate_row(ipc, key) / "labels"
        out[f"{key}/ipc{ipc}"] = precompute_soft_labels(
            teacher, train.dataset, ctx.data.normalize, recipe, ctx.dist.device, ctx.run.seed, folder,
            cfg.stored_topk, cfg.stored_dtype, fingerprint={"train_set": train.digest, "teacher": source},
            resume=ctx.run.resume, progress=ctx.run.progress)
        print(f"relabel {key} ipc={ipc}: {out[f'{key}/ipc{ipc}']['bytes_per_image_epoch']:.1f} "
              f"bytes per image-epoch -> {folder}")
    barrier()
    return out
