"""The paper's studies, one command each (``scdd +study=NAME``): several SC-DD runs (variants) compared in one
table and plot. They sit on top of the stages, beside the pipeline (they call squeeze, recover and evaluate
in each variant's run dir); nothing below imports them."""
from __future__ import annotations

import importlib

from engine.context import RunContext
from engine.studies.settings import STUDY_NAMES, STUDY_PRESETS, StudyConfig


def _module(study: StudyConfig):
    return importlib.import_module(f"engine.studies.{study.name}")


def validate(ctx: RunContext) -> None:
    """Every variant's stage checks (and the study's own settings), before the first variant starts."""
    from engine.studies.common import study_config

    study = study_config(ctx)
    _module(study).validate(ctx, study)


def run(ctx: RunContext) -> dict:
    from engine.studies.common import study_config

    study = study_config(ctx)
    return _module(study).run(ctx, study)


__all__ = ["STUDY_NAMES", "STUDY_PRESETS", "StudyConfig", "run", "validate"]
