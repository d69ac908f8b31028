import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
# Tests run on 2 cores; keep torch from oversubscribing them when pytest-xdist is not used.
os.environ.setdefault("OMP_NUM_THREADS", "2")
# Triton reads this when a kernel is decorated, and any earlier test may import the kernels
# (directly or through deepspeed/torch), so it is set before anything else is imported. CPU CI
# runs the Triton kernels in the interpreter; on CUDA the dispatcher still picks them for GPU tensors.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True, scope="session")
def _config_store():
    """The config groups come from the dataclasses (engine.config_store), as `scdd` registers them at
    import; every Hydra compose in the suite, through the fixture below or directly, needs them."""
    from engine.config_store import register

    register()


@pytest.fixture
def compose():
    """Compose the real Hydra config with overrides, as `scdd` would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
            return hydra_compose(config_name="config", overrides=list(overrides))

    return _compose


@pytest.fixture
def run_scdd(compose, tmp_path):
    """Run a stage in-process on a composed config; returns the stage's result dict."""
    from engine.cli import execute

    def _run(*overrides: str, run_dir: Path | None = None):
        cfg = compose(*overrides)
        return execute(cfg, run_dir or tmp_path / "run")

    return _run
